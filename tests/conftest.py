"""Every fixture is defined once, in the tests/support module named for what it provides."""

pytest_plugins = (
    "tests.support.database",
    "tests.support.builders",
    "tests.support.aliyun",
)
