# supabase-aliyun-sms sidecar image.
#
#   docker build -t supabase-aliyun-sms .
#   docker run --rm --env-file sidecar.env -p 8090:8090 supabase-aliyun-sms
#
# sidecar.env holds at least DATABASE_URL and SEND_SMS_HOOK_SECRETS, plus either the four
# ALIYUN_ACCESS_KEY_ID, ALIYUN_ACCESS_KEY_SECRET, ALIYUN_SMS_SIGN_NAME, ALIYUN_SMS_TEMPLATE_CODE or
# SMS_PROVIDER=console: without provider settings the container exits at once, naming the first
# missing variable.
#
# `serve` (the default command) runs the Send SMS hook target, /healthz, /readyz, /metrics and the
# delivery worker (and the gRPC API when GRPC_PORT is set); `migrate` applies the bundled SQL
# migrations. The HEALTHCHECK asks /healthz, which only `serve` answers: for gRPC in a container run
# `serve` with GRPC_PORT, not `grpc` (or use --no-healthcheck). See compose.yaml for the wiring next
# to Supabase's self-hosted docker-compose.yml.

############################################################################################
# Builder: the locked dependencies and the project's wheel, installed into /install.
# Every dependency has a manylinux or pure-Python wheel (or a pure-Python sdist), so no
# compiler is needed even here.
############################################################################################
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Only what the wheel is built from (pyproject force-includes supabase/migrations as
# sidecar/migrations; README.md is the package's readme), and the locks it is built and installed with.
COPY requirements/runtime.txt requirements/build.txt ./requirements/
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY supabase/migrations ./supabase/migrations

# Dependencies exactly as locked (hash-checked; the lock includes the [grpc] extra, so the image
# can also run `sms-sidecar grpc`), then the project's own wheel on top, built by the locked
# backend (in the builder only), without re-resolving anything.
RUN pip install --prefix /install --require-hashes -r requirements/runtime.txt \
 && pip install --require-hashes -r requirements/build.txt \
 && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && pip install --no-index --no-deps --prefix /install /wheels/supabase_aliyun_sms-*.whl \
 && test -n "$(ls /install/lib/python3.11/site-packages/sidecar/migrations/*.sql)" \
 && test -f /install/lib/python3.11/site-packages/sidecar/standin.sql

############################################################################################
# Runtime: the installed packages only; no build tools, no wheels, no source tree.
############################################################################################
FROM python:3.11-slim

LABEL org.opencontainers.image.title="supabase-aliyun-sms" \
      org.opencontainers.image.description="Supabase Auth Send SMS hook target and verification-code delivery through Alibaba Cloud SMS" \
      org.opencontainers.image.licenses="MIT"

# The unprivileged user, uid/gid 10001: a regular account, since 10001 lies in the regular range
# (UID_MIN 1000 to UID_MAX 60000) and `useradd --system` warns that it is above SYS_UID_MAX 999;
# --no-log-init keeps it out of lastlog and faillog. Then the base image's pip, setuptools and wheel
# go: nothing at run time uses them (the HEALTHCHECK below is stdlib Python). Their files stay in
# the base image's layers, so this hides them rather than making the image smaller.
RUN groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --no-log-init \
        --shell /usr/sbin/nologin sidecar \
 && python -m pip uninstall --yes --no-input --disable-pip-version-check --root-user-action=ignore \
        pip setuptools wheel

COPY --from=builder /install /usr/local

# Fail the build, not the first start, if the package or its bundled migrations are missing, if a
# lazily imported module (the Aliyun SDK, gRPC) does not import, or if an installer came back.
RUN python -c "import sidecar.app, sidecar.cli; from sidecar.migrate import bundled; assert bundled(), 'no migrations'" \
 && python -c "import alibabacloud_dysmsapi20170525.client, aiohttp, grpc, sidecar.grpc_api.server" \
 && python -c "import importlib.util as u; left = [m for m in ('pip', 'setuptools', 'wheel', 'pkg_resources') if u.find_spec(m)]; assert not left, left" \
 && sms-sidecar --help > /dev/null

ENV HOST=0.0.0.0 \
    PORT=8090 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /tmp

EXPOSE 8090

# Liveness through python's stdlib (the slim image has no curl); urlopen raises on any non-2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8090') + '/healthz', timeout=4)"]

ENTRYPOINT ["sms-sidecar"]
CMD ["serve", "--host", "0.0.0.0"]
