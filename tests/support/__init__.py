"""What the tests run against, kept apart from the tests: the database (database.py), PostgREST's request
semantics (postgrest.py), GoTrue's hook caller (gotrue.py), a fake Alibaba Cloud SMS (fake_aliyun.py),
the sidecar under test in and out of process (servers.py), and input builders (builders.py).

tests/conftest.py registers the modules that define fixtures; bench/ imports the rest."""
