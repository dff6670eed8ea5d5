"""`sms-sidecar dev`: the whole flow on a laptop, with nothing to set up.

Without DATABASE_URL it starts a throwaway PostgreSQL from the server binaries, loads the Supabase
stand-in, migrates, and serves as the least-privileged `sms_sidecar` role, with the console
provider unless Aliyun credentials are in the environment. Ctrl-C, SIGTERM and SIGHUP remove
everything it created.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from types import FrameType

import psycopg

from sidecar.config import Config, ConfigError
from sidecar.errors import CommandFailed
from sidecar.localpg import LocalCluster
from sidecar.migrate import migrate
from sidecar.process import serve

__all__ = ["run_dev"]

DEMO_USER = "5f0b6d6e-2f5e-4c36-9f3a-6f0d2b8c1a10"
DEMO_PHONE = "+8613800138000"
HOOK_DEMO_PHONE = "8613900139000"  # another number, so the hook example does not start DEMO_PHONE's cooldown


def generate_secret() -> str:
    return "v1,whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@contextmanager
def _database(env: MutableMapping[str, str]) -> Iterator[tuple[str, str]]:
    """Yields (owner URL for migrations and examples, URL the sidecar serves with)."""
    if env.get("DATABASE_URL"):
        yield env["DATABASE_URL"], env["DATABASE_URL"]
        return
    from sidecar import standin

    with LocalCluster() as cluster:
        standin.load(cluster.url())
        owner = cluster.url("postgres")
        migrate(owner)
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute("alter role sms_sidecar with login")  # the cluster trusts local connections
        print(f"Started a throwaway PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.datadir})")
        yield owner, cluster.url("sms_sidecar")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _hang_up(signum: int, frame: FrameType | None) -> None:
    # A closed terminal: stop as for SIGTERM, so that a running server shuts down gracefully first
    # (an exception raised inside its event loop would wait on blocked executor threads).
    signal.raise_signal(signal.SIGTERM)


def run_dev(env: MutableMapping[str, str] | None = None) -> int:
    # While serving, uvicorn handles SIGTERM itself (graceful shutdown) and then re-raises it; with the
    # default action the process would die there, before the throwaway cluster is stopped and its
    # directory removed. As an exception it unwinds through LocalCluster's cleanup like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _hang_up)
    return _run_dev(env)


def _run_dev(env: MutableMapping[str, str] | None) -> int:
    """Raises PostgresNotFound or MigrationError (the command line prints them)."""
    env = dict(os.environ if env is None else env)
    try:
        with _database(env) as (owner_url, sidecar_url):
            if env.get("DATABASE_URL"):
                migrate(owner_url)
            env["DATABASE_URL"] = sidecar_url
            env.setdefault("SEND_SMS_HOOK_SECRETS", generate_secret())
            if not env.get("ALIYUN_ACCESS_KEY_ID"):
                env["SMS_PROVIDER"] = "console"
            try:
                config = Config.from_env(env)
            except ConfigError as exc:
                raise CommandFailed(f"sms-sidecar dev: {exc}", exit_code=2) from None
            secret = env["SEND_SMS_HOOK_SECRETS"]
            serve(config, on_started=lambda: _print_welcome(config, owner_url, secret))
    except KeyboardInterrupt:
        pass
    print("Stopped; the throwaway database is gone.")
    return 0


def _print_welcome(config: Config, owner_url: str, secret: str) -> None:
    base = f"http://{config.host}:{config.port}"
    key = secret.split("|")[0].removeprefix("v1,whsec_")
    hook_one_liner = (
        'python3 -c "import base64,hashlib,hmac,json,time,uuid,urllib.request as r;'
        f"k=base64.b64decode('{key}');"
        "b=json.dumps({'metadata':{'uuid':str(uuid.uuid4()),'name':'send-sms'},'user':{'phone':''},"
        f"'sms':{{'otp':'123456','phone':'{HOOK_DEMO_PHONE}'}}}}).encode();"
        "i=str(uuid.uuid4());t=str(int(time.time()));"
        "s=base64.b64encode(hmac.new(k,f'{i}.{t}.'.encode()+b,hashlib.sha256).digest()).decode();"
        f"print(r.urlopen(r.Request('{base}/hooks/send-sms',b,{{'content-type':'application/json',"
        "'webhook-id':i,'webhook-timestamp':t,'webhook-signature':'v1,'+s})).read().decode())\""
    )
    claims = f'{{\\"role\\":\\"authenticated\\",\\"sub\\":\\"{DEMO_USER}\\"}}'  # escaped for the shell

    def as_user(call: str) -> str:
        return (f"psql '{owner_url}' -c \"begin; set local role authenticated; "
                f"select set_config('request.jwt.claims', '{claims}', true); select {call}; commit;\"")  # fmt: skip

    note = "; codes are printed below" if config.provider == "console" else ""
    print(
        f"""
supabase-aliyun-sms is running ({config.provider} provider{note}).

  Hook URL     {base}/hooks/send-sms
  Hook secret  {secret}
  Health       {base}/healthz   {base}/readyz   {base}/metrics

Point Supabase Auth at it (GoTrue environment):
  GOTRUE_HOOK_SEND_SMS_ENABLED=true
  GOTRUE_HOOK_SEND_SMS_URI=http://host.docker.internal:{config.port}/hooks/send-sms
  GOTRUE_HOOK_SEND_SMS_SECRETS={secret}
{_reachability_note(config.host)}
Send a signed test hook, exactly as GoTrue would:
  {hook_one_liner}

Request and verify a code as a signed-in user, the way supabase.rpc does through PostgREST:
  {as_user(f"public.request_phone_code('{DEMO_PHONE}')")}
  {as_user(f"public.verify_phone_code('{DEMO_PHONE}', '<code printed below>')")}

From supabase-js:
  const {{ data, error }} = await supabase.rpc('request_phone_code', {{ phone: '{DEMO_PHONE}' }})
  const {{ data: check }} = await supabase.rpc('verify_phone_code', {{ phone: '{DEMO_PHONE}', code: '123456' }})

Ctrl-C stops the sidecar and deletes the throwaway database.
""",
        flush=True,
    )


def _reachability_note(host: str) -> str:
    """host.docker.internal is the Docker host as a container sees it: only reachable beyond loopback."""
    linux = '  (on Linux, give the auth container `extra_hosts: ["host.docker.internal:host-gateway"]`)\n'
    if host in ("0.0.0.0", "::"):
        return linux
    return (
        f"  This sidecar listens on {host} only, which a container cannot reach: restart it with\n"
        "  `HOST=0.0.0.0 sms-sidecar dev` for GoTrue in Docker to reach it.\n" + linux
    )
