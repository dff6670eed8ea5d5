#!/usr/bin/env bash
# .ci/container-check.sh: build the project's Dockerfile, unchanged, and run the image and compose.yaml
# on a Debian 12 machine that has no Docker engine and reaches no container registry (only the Debian
# archive and PyPI), with podman. .ci/run calls it with --compose after the test suite; any failure
# fails CI.
#
#   bash .ci/container-check.sh [--compose] [--keep-base]
#
#   --compose    also run compose.yaml with podman-compose, next to a `db` PostgreSQL container on an
#                external `supabase_default` network (adds iptables and a bridge network; see below)
#   --keep-base  keep the stand-in base image for the next run (saves the debootstrap, ~45 s)
#
# Environment: REPO (default: the checkout this script is in, read only),
#              WORK (default: $TMPDIR/sms-container-check, or /tmp/sms-container-check).
#
# What it does, each step printed as "==> [NN] ...", any failure printed as "FAILED at step NN":
#   1. installs podman, runc, netavark, conmon, debootstrap (Debian packages; --compose adds iptables);
#   2. writes a private containers.conf and points CONTAINERS_CONF at it (no system file is changed):
#      runtime runc (crun 1.8 refuses a cgroup v1 + populated cgroup2 "hybrid" layout) and
#      nofile/nproc ulimits podman can set without CAP_SYS_RESOURCE (its defaults, 1048576, can fail);
#   3. builds a stand-in for the Dockerfile's FROM image (python:3.11-slim) with debootstrap: Debian
#      bookworm's Python 3.11 as a venv at /usr/local (so /usr/local/bin/python, pip and
#      /usr/local/lib/python3.11/site-packages are where the official image has them), pip 24.0,
#      setuptools 79.0.1 and wheel 0.45.1 as the official image installs, plus this machine's extra CA
#      certificates and the cert line of its pip.conf so pip in the build reaches PyPI as the host's does;
#   4. builds the Dockerfile unchanged (podman build --network host --format docker --pull=never),
#      fails on a useradd/groupadd warning, and records the image size;
#   5. checks what the image holds: exactly the distributions pinned in requirements/runtime.txt plus
#      the project's own, no pip/setuptools/wheel, and every installed top-level module imports;
#   6. starts a throwaway PostgreSQL 15 on 127.0.0.1 (as the postgres OS user) with the project's
#      Supabase stand-in (sidecar/standin.sql) and password authentication;
#   7. runs `migrate` twice (second must apply nothing) and the image's default command, both with
#      compose.yaml's hardening (read-only root, tmpfs /tmp, cap-drop ALL, no-new-privileges), and checks
#      /healthz, /readyz, /metrics, a Standard-Webhooks-signed Send SMS hook (200 {}), a badly signed one
#      (401), `sms-sidecar check`, the image's HEALTHCHECK, uid 10001, the read-only root and a clean
#      SIGTERM stop;
#   8. (--compose) podman-compose (hash-checked, .ci/podman-compose.txt) config/up/down against
#      compose.yaml with a .env: migrate exits 0, the sidecar starts only after migrate's first run
#      has finished and answers signed hooks on the published port, also from another container on
#      supabase_default through the network's gateway as `host.docker.internal` (the path Supabase's
#      `auth` takes with Docker's `host-gateway`), and passes `check` and the compose healthcheck;
#   9. removes every container, image, network, process and file it created (also those of an earlier,
#      interrupted run, from $WORK/created.list) and restores net.ipv4.ip_forward and iptables chains.
#
# Not covered here, because podman differs from Docker: podman-compose waits for the migrate container
# to stop but starts the sidecar even when migrate failed (Docker Compose does not), and podman 4.3
# has no `host-gateway`. tests/test_deploy.py checks that compose.yaml asks for both.
set -Eeuo pipefail
# (With pipefail, `producer | grep -q` can fail when grep exits first; the script uses grep -c.)

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
REPO=$(cd "$REPO" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/sms-container-check}
COMPOSE=0
KEEP_BASE=0
for arg in "$@"; do
    case "$arg" in
        --compose) COMPOSE=1 ;;
        --keep-base) KEEP_BASE=1 ;;
        -h|--help) sed -n '2,47p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

TAG=localhost/sms-sidecar:ci
# compose.yaml's top-level `name:` and its (first) service `image:`, unquoted; an image name without a
# registry is podman's localhost/<name>.
COMPOSE_PROJECT=$(awk '/^name:/ { v = $2; gsub(/["\047]/, "", v); print v; exit }' "$REPO/compose.yaml" 2>/dev/null || true)
COMPOSE_IMAGE=$(awk '/^[ \t]+image:/ { v = $2; gsub(/["\047]/, "", v); print v; exit }' "$REPO/compose.yaml" 2>/dev/null || true)
case "$COMPOSE_IMAGE" in ""|*/*) ;; *) COMPOSE_IMAGE=localhost/$COMPOSE_IMAGE ;; esac
PGBIN=/usr/lib/postgresql/15/bin
STATE=$WORK/created.list
LOGS=$WORK/logs
CONF=$WORK/containers.conf
# compose.yaml's read_only/tmpfs/cap_drop/security_opt, with Docker's meaning of read_only: podman would
# also mount tmpfs on /run and /var/tmp (--read-only-tmpfs), Docker does not.
HARDEN=(--read-only --read-only-tmpfs=false --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)

T_START=$(date +%s.%N)
STEP_NO=0
CURRENT="start"
LOG=""
declare -a TIMES=()
declare -A RESULT=()

# ------------------------------------------------------------------------------------------------ helpers

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() {
    [ "$STEP_NO" -gt 0 ] && TIMES+=("$(printf '%02d %-58s %6ss' "$STEP_NO" "$CURRENT" "$(elapsed "$STEP_T0")")")
    STEP_NO=$((STEP_NO + 1)); CURRENT="$*"; LOG=""; STEP_T0=$(now)
    printf '\n==> [%02d] %s\n' "$STEP_NO" "$*"
}
ok() { printf '    ok: %s\n' "$*"; }
note() { printf '    note: %s\n' "$*"; }
die() {
    printf '\nFAILED at step %02d (%s): %s\n' "$STEP_NO" "$CURRENT" "$*" >&2
    if [ -n "$LOG" ] && [ -s "$LOG" ]; then
        printf -- '---- last lines of %s ----\n' "$LOG" >&2; tail -n 40 "$LOG" >&2
    fi
    if [ -s "$LOGS/podman-stderr.log" ]; then
        printf -- '---- podman stderr (last lines, systemd timer noise left out) ----\n' >&2
        grep -v -e 'systemd connection' -e 'failed to connect to syslog' "$LOGS/podman-stderr.log" | tail -n 10 >&2 || true
    fi
    exit 1
}
on_err() {
    local rc=$? line=$1 cmd=$2
    [ "$BASH_SUBSHELL" -eq 0 ] || return 0
    die "command failed (exit $rc) at line $line: $cmd"
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR

# podman with the private configuration. pmq sends podman's stderr to a log: for images with a
# HEALTHCHECK podman complains on every start that it cannot reach systemd to schedule the timers (there is
# no systemd here; `podman healthcheck run` still works). A file, not a pipe: conmon keeps it open.
pm() { CONTAINERS_CONF=$CONF podman "$@"; }
pmq() { CONTAINERS_CONF=$CONF podman "$@" 2>> "$LOGS/podman-stderr.log"; }

record() { echo "$*" >> "$STATE"; }
images_now() { pm images -a -q --no-trunc 2>/dev/null | sort -u; }
record_new_images() {  # $1 kind, $2 file with the image ids from before
    local id
    for id in $(comm -13 "$2" <(images_now)); do record "$1 $id"; done
}

free_port() {
    # Below the kernel's ephemeral range, where no outgoing connection or bind(port 0) of another
    # process on this machine (a test suite, say) takes the port between this check and our bind.
    local p lo=20000 hi
    hi=$(awk '{ print $1 - 1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32767)
    [ "$hi" -gt $((lo + 1000)) ] || { lo=20000; hi=59999; }
    for _ in $(seq 1 100); do
        p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
        if [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]; then echo "$p"; return 0; fi
    done
    return 1
}

wait_http() {  # url, seconds; also fails early when container $3 (optional) is no longer running
    local url=$1 limit=$2 cid=${3:-} t0
    t0=$(now)
    while ! curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null; do
        if [ -n "$cid" ] && [ "$(pm inspect -f '{{.State.Running}}' "$cid" 2>/dev/null)" != "true" ]; then
            return 2
        fi
        if awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then return 1; fi
        sleep 0.05
    done
}

# ------------------------------------------------------------------------------------------------ cleanup

netavark_flush() {  # remove netavark's iptables chains (only called when there were none before us)
    command -v iptables >/dev/null || return 0
    local t rule c
    for t in nat filter; do
        iptables -t "$t" -S 2>/dev/null | grep -E '^-A (PREROUTING|INPUT|OUTPUT|POSTROUTING|FORWARD) .*NETAVARK' \
            | sed 's/^-A/-D/' | while read -r rule; do eval iptables -t "$t" "$rule" || true; done
        for c in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N NETAVARK/ { print $2 }'); do iptables -t "$t" -F "$c" || true; done
        for c in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N NETAVARK/ { print $2 }'); do iptables -t "$t" -X "$c" || true; done
    done
}

cleanup() {
    [ -f "$STATE" ] || return 0
    command -v podman >/dev/null || { rm -f "$STATE"; return 0; }
    [ -f "$CONF" ] || write_conf
    local kind arg rest failed=0 keep=()
    # Newest first: containers before the images and networks they use.
    while read -r kind arg rest; do
        case "$kind" in
            compose)
                if [ -x "$WORK/venv-compose/bin/podman-compose" ] && [ -d "$arg" ]; then
                    (cd "$arg" && CONTAINERS_CONF=$CONF "$WORK/venv-compose/bin/podman-compose" down >/dev/null 2>&1) || true
                fi
                for c in $(pm ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT" 2>/dev/null); do
                    pmq rm -f -t 0 "$c" >/dev/null || failed=1
                done ;;
            container) pmq rm -f -i -t 0 "$arg" >/dev/null 2>&1 || failed=1 ;;
            network) pm network rm -f "$arg" >/dev/null 2>&1 || true ;;
            tag) pm rmi "$arg" >/dev/null 2>&1 || true ;;  # a second name: rmi only untags
            image) pm rmi -f "$arg" >/dev/null 2>&1 || true ;;
            baseimage)
                if [ "$KEEP_BASE" = 1 ]; then keep+=("$kind $arg"); else pm rmi -f "$arg" >/dev/null 2>&1 || true; fi ;;
            pgdata)
                if [ -f "$arg/postmaster.pid" ]; then
                    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$arg" -m fast -w -t 30 stop >/dev/null 2>&1 || failed=1
                fi ;;
            dir)
                if grep -q " ${arg}[/ ]" /proc/mounts; then echo "    cleanup: $arg has mounts; not removed" >&2; failed=1
                else rm -rf "$arg"; fi ;;
            sysctl) sysctl -q -w "$arg=$rest" >/dev/null 2>&1 || true ;;
            netavark-chains-absent) netavark_flush ;;
        esac
    done < <(tac "$STATE")
    # Images that only our runs used, left untagged (build cache layers of a removed image).
    rm -f "$STATE"
    local k
    for k in "${keep[@]}"; do record "$k"; done
    return $failed
}

on_exit() {
    local rc=$?
    [ "$BASHPID" = "$MAIN_PID" ] || exit "$rc"  # a subshell: the main shell reports and cleans up
    trap - ERR
    set +e
    if [ "$STEP_NO" -gt 0 ] && [ "$rc" -eq 0 ]; then
        TIMES+=("$(printf '%02d %-58s %6ss' "$STEP_NO" "$CURRENT" "$(elapsed "$STEP_T0")")")
    fi
    printf '\n==> cleanup: removing what this run created\n'
    if cleanup; then echo "    ok: containers, images, networks, PostgreSQL and work files removed"
    else echo "    cleanup had problems (see above)" >&2; [ "$rc" -eq 0 ] && rc=3; fi
    if [ "$rc" -eq 0 ]; then
        printf '\n==> summary\n'
        printf '    %s\n' "${TIMES[@]}"
        for k in "${!RESULT[@]}"; do printf '    %-28s %s\n' "$k" "${RESULT[$k]}"; done | sort
        printf '    %-28s %ss\n' "total" "$(elapsed "$T_START")"
        printf '\nCONTAINER CHECK PASSED\n'
    else
        printf '\nCONTAINER CHECK FAILED (exit %d) after %ss\n' "$rc" "$(elapsed "$T_START")" >&2
    fi
    exit "$rc"
}
MAIN_PID=$BASHPID
trap on_exit EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "terminated" >&2; exit 143' TERM

write_conf() {
    mkdir -p "$WORK"
    local nofile nproc
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] && nproc=4194304
    # podman lowers its own hard nproc to 32768 here; a container may not exceed it.
    [ "$nproc" -gt 32768 ] && nproc=32768
    cat > "$CONF" <<EOF
# Private podman configuration of .ci/container-check.sh (used through CONTAINERS_CONF only).
[containers]
# podman's defaults (nofile 1048576, nproc 4194304) need CAP_SYS_RESOURCE, which this machine lacks.
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
# crun refuses cgroup v1 next to a cgroup2 mount holding a controller ("hybrid mode"); runc copes.
runtime = "runc"
EOF
}

# ------------------------------------------------------------------------------------------------ 1. checks
step "preflight: root, Debian 12, the project"
[ "$(id -u)" = 0 ] || die "run as root"
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "written for Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}"
[ -f "$REPO/Dockerfile" ] && [ -f "$REPO/compose.yaml" ] && [ -f "$REPO/sidecar/standin.sql" ] \
    && [ -f "$REPO/requirements/runtime.txt" ] || die "$REPO has no Dockerfile, compose.yaml, sidecar/standin.sql or requirements/runtime.txt"
[ -n "$COMPOSE_PROJECT" ] && [ -n "$COMPOSE_IMAGE" ] || die "compose.yaml names no project (name:) or no image (image:)"
mkdir -p "$WORK" "$LOGS"
# The single external base image of the Dockerfile (FROM lines that name no earlier stage).
BASE_REF=$(awk '
    toupper($1) == "FROM" {
        img = ""; for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
        for (j = i + 1; j <= NF; j++) if (toupper($j) == "AS") stages[tolower($(j + 1))] = 1
        if (!(tolower(img) in stages)) print img
    }' "$REPO/Dockerfile" | sort -u)
[ "$(printf '%s\n' "$BASE_REF" | wc -l)" = 1 ] || die "expected one external FROM image, found: $BASE_REF"
case "$BASE_REF" in
    python:3.11*|docker.io/library/python:3.11*) ;;
    *) die "the stand-in base only knows python:3.11-*, the Dockerfile wants $BASE_REF" ;;
esac
case "$BASE_REF" in */*) BASE_FQ=$BASE_REF ;; *) BASE_FQ=docker.io/library/$BASE_REF ;; esac
ok "project $REPO, base image $BASE_REF (stand-in tagged $BASE_FQ)"

# ------------------------------------------------------------------------------------------------ 2. packages
step "install podman & co from the Debian archive"
LOG=$LOGS/apt.log
PKGS=(podman runc conmon netavark aardvark-dns catatonit debootstrap curl ca-certificates iproute2)
[ "$COMPOSE" = 1 ] && PKGS+=(iptables)
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}"; } \
    > "$LOG" 2>&1 || die "apt-get install failed"
if [ ! -x "$PGBIN/initdb" ]; then
    # Keep the package from starting its own cluster (there is no init system to stop it again).
    own_policy=0
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 >> "$LOG" 2>&1 \
        || { [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install postgresql-15 failed"; }
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
id postgres >/dev/null 2>&1 || die "no postgres OS user (initdb refuses to run as root)"
ok "$(podman --version), $(runc --version | head -1), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')"

# ------------------------------------------------------------------------------------------------ 3. config
step "private podman configuration (CONTAINERS_CONF), leftovers of an earlier run"
write_conf
export CONTAINERS_CONF=$CONF
cleanup || die "could not remove what an earlier run left (see above)"
LOG=$LOGS/podman-info.log
pm info > "$LOG" 2>&1 || die "podman info failed"
ok "$(awk '/graphDriverName/ {d=$2} /cgroupVersion/ {c=$2} /cgroupManager/ {m=$2} END {print "storage " d ", cgroups " c " (" m ")"}' "$LOG"), runtime $(pm info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null)"
sed -n '/^default_ulimits/p' "$CONF" | sed 's/^/    /'

# ------------------------------------------------------------------------------------------------ 4. base
step "stand-in base image $BASE_FQ (debootstrap bookworm, Python 3.11 at /usr/local)"
LOG=$LOGS/base.log
: > "$LOG"
if pm image exists "$BASE_FQ" && grep -q "^baseimage " "$STATE" 2>/dev/null; then
    ok "kept from an earlier run (--keep-base): $(pm image inspect -f '{{.Id}}' "$BASE_FQ" | cut -c1-12)"
elif pm image exists "$BASE_FQ"; then
    note "$BASE_FQ already exists and is not this script's; using it as it is"
else
    ROOTFS=$WORK/rootfs
    if grep -q " ${ROOTFS}[/ ]" /proc/mounts; then die "$ROOTFS has mounts; unmount them first"; fi
    rm -rf "$ROOTFS"
    record "dir $ROOTFS"
    # The Debian mirror apt already uses.
    MIRROR=$(awk 'BEGIN { RS = ""; FS = "\n" }
        { u = ""; s = ""
          for (i = 1; i <= NF; i++) { if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, a, " "); u = a[1] }
                                      if ($i ~ /^Suites:/) s = $i }
          if (u != "" && s ~ /[ \t]bookworm([ \t]|$)/ && u !~ /security/) { print u; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    [ -n "$MIRROR" ] || die "no Debian bookworm mirror found in the apt sources"
    debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata,python3,python3-venv \
        bookworm "$ROOTFS" "$MIRROR" >> "$LOG" 2>&1 || die "debootstrap from $MIRROR failed"
    chroot "$ROOTFS" python3 -m venv /usr/local >> "$LOG" 2>&1
    rm -f "$ROOTFS"/usr/local/bin/activate* "$ROOTFS"/usr/local/bin/Activate.ps1
    # This machine's extra CA certificates (TLS to PyPI may be intercepted here), as local CAs.
    tmpca=$(mktemp -d)
    mkdir -p "$tmpca/host" "$tmpca/img"
    awk -v d="$tmpca/host" '/BEGIN CERT/ { n++; f = sprintf("%s/%04d.pem", d, n) } f { print > f } /END CERT/ { close(f); f = "" }' /etc/ssl/certs/ca-certificates.crt
    awk -v d="$tmpca/img" '/BEGIN CERT/ { n++; f = sprintf("%s/%04d.pem", d, n) } f { print > f } /END CERT/ { close(f); f = "" }' "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    ( cd "$tmpca/img" && for f in *.pem; do tr -d ' \r\n' < "$f" | sha256sum | cut -d' ' -f1; done ) | sort -u > "$tmpca/img.sums"
    extra=0
    for f in "$tmpca"/host/*.pem; do
        sum=$(tr -d ' \r\n' < "$f" | sha256sum | cut -d' ' -f1)
        if ! grep -qx "$sum" "$tmpca/img.sums"; then
            extra=$((extra + 1)); cp "$f" "$ROOTFS/usr/local/share/ca-certificates/host-extra-$extra.crt"
        fi
    done
    rm -rf "$tmpca"
    chroot "$ROOTFS" update-ca-certificates >> "$LOG" 2>&1
    # pip reaches PyPI the way the host's does: the system bundle, and any http(s) index the host sets.
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        for key in index-url extra-index-url trusted-host; do
            val=$(pip config get "global.$key" 2>/dev/null || true)
            env_name="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
            val="$val ${!env_name:-}"
            urls=$(for w in $val; do case "$key:$w" in *:http://*|*:https://*|trusted-host:*) echo -n "$w ";; esac; done)
            if [ -n "${urls// /}" ]; then echo "$key = ${urls% }"; fi
        done
    } > "$ROOTFS/etc/pip.conf"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    # What the official python:3.11-slim installs next to its Python (docker-library/python).
    chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        /usr/local/bin/pip install --disable-pip-version-check --no-cache-dir --no-compile \
        'pip==24.0' 'setuptools==79.0.1' 'wheel==0.45.1' >> "$LOG" 2>&1 || die "pip in the stand-in could not reach PyPI"
    PYVER=$(chroot "$ROOTFS" /usr/local/bin/python -c 'import platform; print(platform.python_version())')
    chroot "$ROOTFS" apt-get clean
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/usr/share/doc/* \
        "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log "$ROOTFS"/root/.cache "$ROOTFS"/tmp/*
    : > "$ROOTFS/etc/resolv.conf"
    echo localhost > "$ROOTFS/etc/hostname"
    BASE_ID=$(tar --numeric-owner --xattrs -C "$ROOTFS" -c . | pm import \
        --message ".ci/container-check.sh stand-in for $BASE_REF (Debian bookworm, Python $PYVER)" \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change "ENV PYTHON_VERSION=$PYVER" --change 'CMD ["python3"]' \
        - "$BASE_FQ" 2>> "$LOG" | tail -1)
    record "baseimage $BASE_ID"
    rm -rf "$ROOTFS"
    ok "$(pm run --rm --pull=never --network none "$BASE_FQ" sh -c 'python --version; pip --version | cut -d" " -f1-2' | tr '\n' ' ')(${extra} extra CA certificate(s), $(( $(pm image inspect -f '{{.Size}}' "$BASE_FQ") / 1000000 )) MB)"
fi

# ------------------------------------------------------------------------------------------------ 5. build
step "podman build of the Dockerfile, unchanged"
LOG=$LOGS/build.log
SRC=$WORK/src
rm -rf "$SRC"; mkdir -p "$SRC"; record "dir $SRC"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./venv -c . | tar -C "$SRC" -x
record "dir $WORK/images.before"
record "dir $WORK/iid"
images_now > "$WORK/images.before"
T0=$(now)
if ! pm build --pull=never --network host --format docker -f "$SRC/Dockerfile" -t "$TAG" \
        --iidfile "$WORK/iid" "$SRC" > "$LOG" 2>&1; then
    record_new_images image "$WORK/images.before"
    die "podman build failed"
fi
record_new_images image "$WORK/images.before"
RESULT["image build"]="$(elapsed "$T0")s"
SIZE=$(pm image inspect -f '{{.Size}}' "$TAG")
BASE_SIZE=$(pm image inspect -f '{{.Size}}' "$BASE_FQ")
RESULT["image size"]="$((SIZE / 1000000)) MB = base $((BASE_SIZE / 1000000)) MB + $(((SIZE - BASE_SIZE) / 1000000)) MB of the Dockerfile's layers"
[ "$(pm image inspect -f '{{.Config.User}}' "$TAG")" = "10001:10001" ] || die "image USER is not 10001:10001"
pm image inspect -f '{{.Config.Healthcheck}}' "$TAG" | grep -c healthz > /dev/null || die "image has no HEALTHCHECK"
grep -q 'Successfully tagged' "$LOG" || die "no 'Successfully tagged' in the build log"
ok "$TAG, $((SIZE / 1000000)) MB, built in ${RESULT["image build"]}, user 10001:10001, HEALTHCHECK kept"
grep -i -E '^(warning|.*level=warn)' "$LOG" | sort -u | sed 's/^/    build warning: /' || true
warned=$(grep -E '^(useradd|groupadd|usermod|groupmod)( warning|:)' "$LOG" | sort -u || true)
[ -z "$warned" ] || { printf '    %s\n' "$warned"; die "the user/group set-up in the Dockerfile warns (see the lines above)"; }
ok "no useradd/groupadd warning"

# ------------------------------------------------------------------------------------------------ 5b. contents
step "image contents: the locked distributions, no pip/setuptools/wheel, every module imports"
LOG=$LOGS/contents.log
cat > "$WORK/contents.py" <<'PY'
"""Run inside the image: compare its distributions with requirements/runtime.txt, import them all."""
import importlib
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import sys

MARKER_ENV = {
    "sys_platform": sys.platform,
    "os_name": os.name,
    "platform_system": platform.system(),
    "platform_machine": platform.machine(),
    "platform_python_implementation": platform.python_implementation(),
    "implementation_name": sys.implementation.name,
}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_holds(marker):
    """The `name ==/!= 'value'` comparisons joined by and/or/not that the lock uses; else ValueError."""
    def compare(m):
        if m[1] not in MARKER_ENV:
            raise ValueError(f"unknown marker variable in: {marker}")
        return str((MARKER_ENV[m[1]] == m[3]) == (m[2] == "=="))
    expr = re.sub(r"([a-z_]+)\s*(==|!=)\s*['\"]([^'\"]*)['\"]", compare, marker)
    if not re.fullmatch(r"[\s()]*(?:(?:True|False|and|or|not)[\s()]*)*", expr):
        raise ValueError(f"cannot evaluate the marker: {marker}")
    return eval(expr)  # only True/False/and/or/not/parentheses are left


problems = []
locked = {}
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?", line)
    if not m:
        continue
    try:
        if m[3] is None or marker_holds(m[3].strip()):
            locked[norm(m[1])] = m[2]
    except ValueError as exc:
        problems.append(f"requirements/runtime.txt: {exc}")
installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
project = installed.pop("supabase-aliyun-sms", None)
if project is None:
    problems.append("the project (supabase-aliyun-sms) is not installed")
for name in sorted(installed.keys() - locked.keys()):
    problems.append(f"installed but not in requirements/runtime.txt: {name} {installed[name].version}")
for name in sorted(locked.keys() - installed.keys()):
    problems.append(f"in requirements/runtime.txt but not installed: {name}=={locked[name]}")
for name in sorted(locked.keys() & installed.keys()):
    if installed[name].version != locked[name]:
        problems.append(f"{name}: {installed[name].version} installed, {locked[name]} locked")
for module in ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack"):
    if importlib.util.find_spec(module) is not None:
        problems.append(f"module {module} is importable")
tops = set()
for dist in [*installed.values(), *([project] if project else [])]:
    for f in dist.files or []:
        top = f.parts[0]
        if top == ".." or top.endswith((".dist-info", ".data")) or not f.name.endswith((".py", ".so")):
            continue
        tops.add(top.split(".")[0] if len(f.parts) == 1 else top)
for module in sorted(tops):
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        problems.append(f"import {module}: {type(exc).__name__}: {exc}")
print(f"{len(locked)} locked distributions installed as pinned, project {project.version if project else '-'}, "
      f"{len(tops)} top-level modules import")
for problem in problems:
    print("PROBLEM:", problem)
sys.exit(1 if problems else 0)
PY
record "dir $WORK/contents.py"
record "container sms-ci-contents"
pm run --rm --pull=never --name sms-ci-contents --network none --no-healthcheck "${HARDEN[@]}" --entrypoint python \
    -v "$WORK/contents.py:/contents.py:ro" -v "$SRC/requirements/runtime.txt:/runtime.txt:ro" \
    "$TAG" /contents.py /runtime.txt > "$LOG" 2>&1 || { sed 's/^/    /' "$LOG"; die "the image does not hold what requirements/runtime.txt locks"; }
ok "$(tail -1 "$LOG")"
in_image() { pm run --rm --pull=never --name sms-ci-contents --network none --no-healthcheck --entrypoint sh "$TAG" -c "$1"; }
left=$(in_image 'ls /usr/local/bin | grep -E "^(pip|wheel|easy_install)" || true')
[ -z "$left" ] || die "installer scripts left in /usr/local/bin: $left"
ok "no pip/wheel scripts in /usr/local/bin; $(in_image 'getent passwd 10001; getent group 10001' | tr '\n' ' ')"

# ------------------------------------------------------------------------------------------------ 6. postgres
step "throwaway PostgreSQL 15 on 127.0.0.1 with the Supabase stand-in"
LOG=$LOGS/postgres.log
PGDIR=$WORK/pg
rm -rf "$PGDIR"; mkdir -p "$PGDIR/data" "$PGDIR/sock"; record "dir $PGDIR"
chown -R postgres:postgres "$PGDIR"; chmod 700 "$PGDIR/data"
PGPORT=$(free_port) || die "no free port"
PG_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
SIDECAR_DB_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDIR/data" -U supabase_admin --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 > "$LOG" 2>&1 || die "initdb failed"
record "pgdata $PGDIR/data"
for attempt in 1 2 3; do
    if runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" -w -t 60 -l "$PGDIR/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGDIR/sock -c fsync=off" start >> "$LOG" 2>&1; then
        break
    fi
    # Another process took the port after free_port looked: try another one.
    if [ "$attempt" -lt 3 ] && grep -q 'Address already in use' "$PGDIR/server.log"; then
        note "port $PGPORT was taken meanwhile; trying another"
        PGPORT=$(free_port) || die "no free port"
        continue
    fi
    LOG=$PGDIR/server.log; die "PostgreSQL did not start"
done
PSQL=("$PGBIN/psql" -h "$PGDIR/sock" -p "$PGPORT" -U supabase_admin -d postgres -v ON_ERROR_STOP=1 -q)
"${PSQL[@]}" -f "$REPO/sidecar/standin.sql" >> "$LOG" 2>&1 || die "sidecar/standin.sql failed"
"${PSQL[@]}" -c "alter role postgres password '$PG_PASSWORD'" >> "$LOG" 2>&1
ok "port $PGPORT, pid $(head -1 "$PGDIR/data/postmaster.pid"), roles: $("${PSQL[@]}" -At -c "select string_agg(rolname, ' ' order by rolname) from pg_roles where rolname in ('anon','authenticated','service_role','supabase_auth_admin','postgres')")"

# ------------------------------------------------------------------------------------------------ 7. migrate
step "sms-sidecar migrate (as postgres, hardened like compose), twice"
LOG=$LOGS/migrate.log
OWNER_URL="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PGPORT/postgres"
record "container sms-ci-migrate"
pm run --rm --pull=never --name sms-ci-migrate --network host --no-healthcheck "${HARDEN[@]}" \
    -e DATABASE_URL="$OWNER_URL" -e SMS_SIDECAR_DB_PASSWORD="$SIDECAR_DB_PASSWORD" "$TAG" migrate > "$LOG" 2>&1 \
    || die "migrate failed"
grep -q '^applied ' "$LOG" || die "migrate applied nothing on an empty database"
grep -q 'sms_sidecar may log in' "$LOG" || die "migrate did not give sms_sidecar its login"
pm run --rm --pull=never --name sms-ci-migrate --network host --no-healthcheck "${HARDEN[@]}" \
    -e DATABASE_URL="$OWNER_URL" "$TAG" migrate > "$LOG.2" 2>&1 || { LOG=$LOG.2; die "second migrate failed"; }
grep -q '(0 applied)' "$LOG.2" || { LOG=$LOG.2; die "second migrate was not a no-op"; }
ok "$(grep -c '^applied ' "$LOG") migration(s) applied, second run: $(tail -1 "$LOG.2")"

# ------------------------------------------------------------------------------------------------ 8. serve
step "default command (serve) as sms_sidecar, hardened, --network host"
LOG=$LOGS/serve.log
SIDECAR_PORT=$(free_port) || die "no free port"
SECRET="v1,whsec_$(head -c 32 /dev/urandom | base64)"
BASE_URL=http://127.0.0.1:$SIDECAR_PORT
record "container sms-ci-serve"
T0=$(now)
CID=$(pmq run -d --pull=never --name sms-ci-serve --network host "${HARDEN[@]}" --stop-timeout 15 \
    -e PORT="$SIDECAR_PORT" -e SMS_PROVIDER=console -e SEND_SMS_HOOK_SECRETS="$SECRET" \
    -e DATABASE_URL="postgresql://sms_sidecar:$SIDECAR_DB_PASSWORD@127.0.0.1:$PGPORT/postgres" "$TAG")
rc=0; wait_http "$BASE_URL/readyz" 30 "$CID" || rc=$?
pm logs "$CID" > "$LOG" 2>&1 || true
[ "$rc" = 0 ] || die "not ready within 30 s (wait status $rc)"
RESULT["start to /readyz 200"]="$(elapsed "$T0")s"
ok "container ${CID:0:12} ready in ${RESULT["start to /readyz 200"]} on port $SIDECAR_PORT"

step "HTTP checks: /healthz, /readyz, /metrics, signed Send SMS hook"
LOG=$LOGS/serve.log
body=$(curl -fsS -m 5 "$BASE_URL/healthz"); [[ "$body" == *'"ok"'* ]] || die "/healthz said $body"
ok "/healthz $body"
body=$(curl -fsS -m 5 "$BASE_URL/readyz"); [[ "$body" == *'"ready"'* ]] || die "/readyz said $body"
ok "/readyz $body"
curl -fsS -m 5 "$BASE_URL/metrics" | grep -c '^# HELP' > /dev/null || die "/metrics has no Prometheus text"
ok "/metrics serves Prometheus text"
cat > "$WORK/signed_hook.py" <<'PY'
"""POST one Standard-Webhooks-signed Send SMS hook request; print 'STATUS BODY'. Stdlib only."""
import base64, hashlib, hmac, json, sys, time, urllib.error, urllib.request, uuid

url, secret, phone, otp = sys.argv[1:5]
body = json.dumps({"user": {"id": str(uuid.uuid4()), "phone": phone},
                   "sms": {"otp": otp, "phone": phone}}, separators=(",", ":")).encode()
msg_id, ts = "msg_" + uuid.uuid4().hex, int(time.time())
key = base64.b64decode(secret.split("|")[0].removeprefix("v1,").removeprefix("whsec_"))
sig = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
req = urllib.request.Request(url, data=body, method="POST", headers={
    "content-type": "application/json", "webhook-id": msg_id,
    "webhook-timestamp": str(ts), "webhook-signature": "v1," + sig})
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
PY
record "dir $WORK/signed_hook.py"
hook() {  # url secret phone otp
    if command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
        python3 "$WORK/signed_hook.py" "$@"
    else  # no usable Python on the host: the image's own
        pm run --rm --pull=never --network host --no-healthcheck --entrypoint python \
            -v "$WORK/signed_hook.py:/signed_hook.py:ro" "$TAG" /signed_hook.py "$@"
    fi
}
OTP=$(printf '%06d' $((RANDOM % 1000000)))
out=$(hook "$BASE_URL/hooks/send-sms" "$SECRET" 8613800138000 "$OTP")
[ "$out" = "200 {}" ] || die "signed hook answered: $out"
ok "signed POST /hooks/send-sms -> $out"
out=$(hook "$BASE_URL/functions/v1/supabase-aliyun-sms-sender" "$SECRET" 8613800138001 "$OTP")
[ "$out" = "200 {}" ] || die "signed hook on the Deno path answered: $out"
ok "signed POST /functions/v1/supabase-aliyun-sms-sender -> $out"
out=$(hook "$BASE_URL/hooks/send-sms" "v1,whsec_$(head -c 32 /dev/urandom | base64)" 8613800138000 "$OTP")
[ "${out%% *}" = 401 ] || die "a hook signed with another secret answered: $out"
ok "wrongly signed hook -> ${out%% *}"
sleep 0.3
pm logs "$CID" > "$LOG" 2>&1 || true
grep -q "\[console SMS\].*code $OTP" "$LOG" || die "the console provider did not print code $OTP"
ok "console provider printed: $(grep -m1 '\[console SMS\]' "$LOG")"

step "container checks: sms-sidecar check, HEALTHCHECK, non-root, read-only root"
LOG=$LOGS/check.log
pmq exec "$CID" sms-sidecar check > "$LOG" 2>&1 || die "sms-sidecar check failed"
sed 's/^/    /' "$LOG"
pmq healthcheck run "$CID" >> "$LOG" 2>&1 || die "the image's HEALTHCHECK failed"
ok "HEALTHCHECK command passes"
[ "$(pm exec "$CID" id -u)" = 10001 ] || die "the process does not run as uid 10001"
ok "runs as $(pm exec "$CID" id | cut -d' ' -f1-2), pid 1: $(pm top "$CID" args | sed -n 2p)"
if pm exec "$CID" sh -c 'touch /probe' 2>/dev/null; then die "the root file system is writable"; fi
ok "root file system read-only, capabilities: $(pm exec "$CID" grep CapEff /proc/1/status | awk '{print $2}')"

step "SIGTERM: podman stop"
LOG=$LOGS/serve.log
T0=$(now)
pmq stop -t 15 "$CID" > /dev/null
RESULT["stop on SIGTERM"]="$(elapsed "$T0")s"
pm logs "$CID" > "$LOG" 2>&1 || true
code=$(pm inspect -f '{{.State.ExitCode}}' "$CID")
[ "$code" = 0 ] || die "exit code $code after SIGTERM (137 would mean it had to be killed)"
awk -v s="${RESULT["stop on SIGTERM"]%s}" 'BEGIN { exit !(s < 10) }' || die "stop took ${RESULT["stop on SIGTERM"]}"
grep -q 'sidecar stopped' "$LOG" || die "no 'sidecar stopped' in the log"
pmq rm "$CID" > /dev/null
ok "stopped in ${RESULT["stop on SIGTERM"]}, exit 0, 'sidecar stopped' logged"

# ------------------------------------------------------------------------------------------------ 9. compose
if [ "$COMPOSE" = 1 ]; then
    step "compose: podman-compose, supabase_default network, a db container"
    LOG=$LOGS/compose-setup.log
    : > "$LOG"
    record "dir $WORK/venv-compose"
    if [ ! -x "$WORK/venv-compose/bin/podman-compose" ]; then
        rm -rf "$WORK/venv-compose"
        PY=python3
        $PY -m venv "$WORK/venv-compose" >> "$LOG" 2>&1 || {
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >> "$LOG" 2>&1
            PY=/usr/bin/python3; rm -rf "$WORK/venv-compose"; $PY -m venv "$WORK/venv-compose" >> "$LOG" 2>&1; }
        "$WORK/venv-compose/bin/pip" install -q --disable-pip-version-check --require-hashes \
            -r "$REPO/.ci/podman-compose.txt" >> "$LOG" 2>&1 || die "pip install -r .ci/podman-compose.txt failed"
    fi
    PC=("$WORK/venv-compose/bin/podman-compose")
    if [ -n "$(pm ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT")" ]; then
        die "containers of compose project $COMPOSE_PROJECT exist already; not touching them"
    fi
    if pm image exists "$COMPOSE_IMAGE"; then die "$COMPOSE_IMAGE exists already; not touching it"; fi
    if pm network exists supabase_default; then die "network supabase_default exists already; not touching it"; fi
    record "sysctl net.ipv4.ip_forward $(sysctl -n net.ipv4.ip_forward)"
    iptables -t nat -S 2>/dev/null | grep -c NETAVARK > /dev/null || record "netavark-chains-absent"
    record "network supabase_default"
    pm network create supabase_default >> "$LOG" 2>&1
    DBDIR=$WORK/db
    rm -rf "$DBDIR"; mkdir -p "$DBDIR"; record "dir $DBDIR"
    cp "$REPO/sidecar/standin.sql" "$DBDIR/standin.sql"
    cat > "$DBDIR/db-entry.sh" <<'EOF'
#!/bin/sh
# A throwaway Supabase-like PostgreSQL 15: superuser supabase_admin, the project's stand-in roles and
# schemas (sidecar/standin.sql), role postgres with POSTGRES_PASSWORD, scram over TCP.
set -eu
export PATH=/usr/lib/postgresql/15/bin:$PATH
D=/var/lib/postgresql/data
if [ ! -s "$D/PG_VERSION" ]; then
    initdb -D "$D" -U supabase_admin --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >/dev/null
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$D/pg_hba.conf"
    pg_ctl -D "$D" -w -o "-c listen_addresses='' -k /tmp" start >/dev/null
    psql -h /tmp -U supabase_admin -d postgres -v ON_ERROR_STOP=1 -q -f /standin.sql
    psql -h /tmp -U supabase_admin -d postgres -v ON_ERROR_STOP=1 -q -c "alter role postgres password '$POSTGRES_PASSWORD'"
    pg_ctl -D "$D" -w -m fast stop >/dev/null
fi
exec postgres -D "$D" -c listen_addresses='*' -c fsync=off -k /tmp
EOF
    chmod +x "$DBDIR/db-entry.sh"
    cat > "$DBDIR/Containerfile" <<EOF
FROM $BASE_FQ
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
COPY standin.sql db-entry.sh /
USER postgres
CMD ["/db-entry.sh"]
EOF
    images_now > "$WORK/images.before"
    T0=$(now)
    pm build --pull=never --network host -t localhost/sms-ci-db:15 "$DBDIR" >> "$LOG" 2>&1 \
        || { record_new_images image "$WORK/images.before"; die "building the db image failed"; }
    record_new_images image "$WORK/images.before"
    DB_BUILD="$(elapsed "$T0")s"
    T0=$(now)
    DB_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
    record "container sms-ci-db"
    pmq run -d --pull=never --name sms-ci-db --network supabase_default --network-alias db \
        -e POSTGRES_PASSWORD="$DB_PASSWORD" localhost/sms-ci-db:15 >> "$LOG"
    for _ in $(seq 1 300); do
        pm logs sms-ci-db 2>&1 | grep -c 'listening on IPv4 address "0.0.0.0"' > /dev/null && break
        [ "$(pm inspect -f '{{.State.Running}}' sms-ci-db)" = true ] || { pm logs sms-ci-db >> "$LOG" 2>&1; die "db container exited"; }
        sleep 0.1
    done
    pm exec sms-ci-db /usr/lib/postgresql/15/bin/pg_isready -h 127.0.0.1 -q || die "db not ready"
    ok "podman-compose $("${PC[@]}" --version 2>/dev/null | awk '/podman-compose/ {print $NF}'), network supabase_default ($(pm network inspect -f '{{range .Subnets}}{{.Subnet}}{{end}}' supabase_default)), db image built in $DB_BUILD, db ready in $(elapsed "$T0")s"

    step "compose: config, up -d (image tagged from the build above), checks, down"
    LOG=$LOGS/compose.log
    CSRC=$WORK/compose-src
    rm -rf "$CSRC"; mkdir -p "$CSRC"; record "dir $CSRC"
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./venv -c . | tar -C "$CSRC" -x
    rm -f "$CSRC/.env"
    if (cd "$CSRC" && "${PC[@]}" config > "$LOG" 2>&1); then die "config passed without a .env (the :? checks should stop it)"; fi
    grep -q 'POSTGRES_PASSWORD' "$LOG" || die "config without .env did not name POSTGRES_PASSWORD"
    ok "without .env: refused, naming POSTGRES_PASSWORD"
    COMPOSE_PORT=$(free_port) || die "no free port"
    cat > "$CSRC/.env" <<EOF
POSTGRES_PASSWORD=$DB_PASSWORD
POSTGRES_HOST=db
POSTGRES_PORT=5432
POSTGRES_DB=postgres
SMS_SIDECAR_DB_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
SEND_SMS_HOOK_SECRETS=$SECRET
SMS_SIDECAR_PORT=$COMPOSE_PORT
SMS_PROVIDER=console
EOF
    (cd "$CSRC" && "${PC[@]}" config > "$LOG" 2>&1) || die "podman-compose config failed"
    ok "config with .env resolves"
    record "tag $COMPOSE_IMAGE"
    pm tag "$TAG" "$COMPOSE_IMAGE"
    record "compose $CSRC"
    T0=$(now)
    (cd "$CSRC" && "${PC[@]}" up -d --no-build >> "$LOG" 2>&1) || die "podman-compose up -d failed"
    MIG=$(pm ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT" --filter "label=io.podman.compose.service=sms-sidecar-migrate")
    SVC=$(pm ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT" --filter "label=io.podman.compose.service=sms-sidecar")
    [ -n "$MIG" ] && [ -n "$SVC" ] || die "podman-compose did not create both services"
    rc=0; wait_http "http://127.0.0.1:$COMPOSE_PORT/readyz" 60 "$SVC" || rc=$?
    pm logs "$MIG" >> "$LOG" 2>&1 || true; pm logs "$SVC" >> "$LOG" 2>&1 || true
    [ "$rc" = 0 ] || die "compose sms-sidecar not ready on published port $COMPOSE_PORT (wait status $rc)"
    RESULT["compose up to /readyz 200"]="$(elapsed "$T0")s"
    [ "$(pm inspect -f '{{.State.ExitCode}}' "$MIG")" = 0 ] || die "sms-sidecar-migrate exited $(pm inspect -f '{{.State.ExitCode}}' "$MIG")"
    pm logs "$MIG" 2>&1 | grep -c 'sms_sidecar may log in' > /dev/null || die "compose migrate did not set the sms_sidecar login"
    ok "sms-sidecar-migrate exited 0; sms-sidecar ready on 127.0.0.1:$COMPOSE_PORT in ${RESULT["compose up to /readyz 200"]}"
    # depends_on: condition: service_completed_successfully. podman-compose waits for migrate to stop
    # (it does not look at the exit code, Docker Compose does), then starts the sidecar, and podman
    # starts migrate once more with it (podman-compose creates the sidecar with --requires). So: the
    # sidecar's first log line comes after the end of migrate's first run, and it did not restart.
    # (Logs to files first: with pipefail, an early-exiting reader would fail the producer.)
    pm logs -t "$MIG" > "$LOGS/migrate-timed.log" 2>&1 || true
    pm logs -t "$SVC" > "$LOGS/sidecar-timed.log" 2>&1 || true
    first_run_end=$(awk '/migrations up to date/ { print $1; exit }' "$LOGS/migrate-timed.log")
    svc_first=$(awk '!/systemd connection/ { print $1; exit }' "$LOGS/sidecar-timed.log")
    [ -n "$first_run_end" ] && [ -n "$svc_first" ] || die "no timestamps in the logs of migrate or the sidecar"
    gap=$(awk -v a="$(date -d "$first_run_end" +%s.%N)" -v b="$(date -d "$svc_first" +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
    awk -v g="$gap" 'BEGIN { exit !(g >= 0) }' || die "sms-sidecar logged ${gap#-}s before sms-sidecar-migrate had finished"
    restarts=$(pm inspect -f '{{.RestartCount}}' "$SVC")
    [ "$restarts" = 0 ] || die "sms-sidecar restarted $restarts time(s) while coming up"
    ok "sms-sidecar started ${gap}s after migrate's first run had finished, no restarts"
    out=$(hook "http://127.0.0.1:$COMPOSE_PORT/hooks/send-sms" "$SECRET" 8613800138000 "$OTP")
    [ "$out" = "200 {}" ] || die "signed hook through the published port answered: $out"
    ok "signed hook through the published port -> $out"
    # The default wiring: Supabase's `auth`, on supabase_default, calls http://host.docker.internal:8090,
    # a host address (Docker's host-gateway) where the port is published. podman 4.3 has no
    # host-gateway: name the network's gateway, an address of this host, instead.
    GW=$(pm network inspect -f '{{range .Subnets}}{{.Gateway}}{{end}}' supabase_default)
    [ -n "$GW" ] || die "supabase_default has no gateway address"
    record "container sms-ci-auth-probe"
    out=$(pm run --rm --pull=never --name sms-ci-auth-probe --network supabase_default --no-healthcheck \
        --add-host "host.docker.internal:$GW" --entrypoint python -v "$WORK/signed_hook.py:/signed_hook.py:ro" \
        "$TAG" /signed_hook.py "http://host.docker.internal:$COMPOSE_PORT/hooks/send-sms" "$SECRET" 8613800138002 "$OTP" 2>&1) \
        || die "a container on supabase_default could not reach host.docker.internal:$COMPOSE_PORT ($GW): $out"
    [ "$out" = "200 {}" ] || die "signed hook from supabase_default through host.docker.internal answered: $out"
    ok "signed hook from a container on supabase_default to host.docker.internal ($GW):$COMPOSE_PORT -> $out"
    pmq exec "$SVC" sms-sidecar check >> "$LOG" 2>&1 || die "sms-sidecar check in the compose service failed"
    ok "sms-sidecar check passes as sms_sidecar over db:5432"
    pmq healthcheck run "$SVC" >> "$LOG" 2>&1 || die "compose healthcheck failed"
    ok "compose healthcheck passes"
    [ "$(pm inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$SVC")" = "true 10001:10001" ] \
        || die "compose service is not read-only / uid 10001"
    ok "read_only, cap_drop, no-new-privileges applied: $(pm inspect -f '{{.HostConfig.SecurityOpt}}' "$SVC")"
    T0=$(now)
    (cd "$CSRC" && "${PC[@]}" down >> "$LOG" 2>&1) || die "podman-compose down failed"
    RESULT["compose down"]="$(elapsed "$T0")s"
    [ -z "$(pm ps -a -q --filter "label=io.podman.compose.project=$COMPOSE_PROJECT")" ] || die "containers left after down"
    ok "down in ${RESULT["compose down"]}, no project containers left"
fi

step "done; cleaning up"
