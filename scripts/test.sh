#!/usr/bin/env bash
# Run Postroom's whole test suite. This is the one command to use, on a fresh Debian 12 machine
# as root with Python 3.11+:
#
#   bash scripts/test.sh [pytest args...]        e.g.  bash scripts/test.sh -k harness -x
#   bash scripts/test.sh tests/test_routing.py   one file (or file::test) against the real peers
#
# What it does (each step is idempotent and bounded in time):
#   1. installs the Debian and PyPI packages the real-peer tests need, through the recipes in
#      tests/peers (mailserver: postfix dovecot-core swaks ...; clients: msmtp php-cli
#      libphp-phpmailer ...; wordpress: wordpress mariadb-server php-mysql; oauth:
#      django-oauth-toolkit in $PEERS/venv), plus python3-venv
#      if the interpreter cannot create venvs;
#   2. creates or reuses the venv ${POSTROOM_VENV:-.venv} and runs pip install -e '.[test]';
#      then runs pip-audit (from a venv of its own) on that venv: a known vulnerability in an
#      installed package fails the run (scripts/audit_deps.py says which and what to do);
#   3. starts Postfix+Dovecot and the OAuth2 server (tests/peers/mailserver.sh, oauth.sh) unless
#      they are already running for $PEERS;
#   4. runs  python -m pytest -q tests "$@" (or only the tests/... paths given);
#   5. runs  ruff check  and  mypy --strict src/postroom  (POSTROOM_LINT=1, the default);
#   and on exit stops only the servers it started.
#
# Exit code: pytest's (exit 5, "no tests collected", counts as a failure); if pytest passed,
# 1 when pip-audit found a known vulnerability or a lint step failed.
#
# Environment:
#   PEERS                    state directory of the peers (default /tmp/peers)
#   POSTROOM_VENV            project venv (default .venv, relative to the repo root)
#   PYTHON                   interpreter that creates the venv (default python3, must be 3.11+)
#   POSTROOM_LINT            1 (default) runs ruff + mypy after pytest; 0 skips them
#   POSTROOM_INSTALL_PEERS   1 (default) installs packages for the peers; 0 skips (not root?)
#   POSTROOM_PYTEST_TIMEOUT  seconds for the whole pytest run (default 2700; CI stops a run at 90 minutes)
#   POSTROOM_AUDIT           1 (default) runs pip-audit on the venv; 0 skips it
#   POSTROOM_AUDIT_VENV      pip-audit's own venv (default $PEERS/pip-audit-venv)
#   POSTROOM_AUDIT_STRICT    1: also fail when no advisory service answered (default: warn;
#                            this machine's PyPI serves packages but not their advisories)
set -euo pipefail
exec </dev/null

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$ROOT"
RECIPES=$ROOT/tests/peers
export PEERS=${PEERS:-/tmp/peers}
mkdir -p "$PEERS"
PEERS=$(cd "$PEERS" && pwd)          # postfix -c needs absolute paths
export HERE=$RECIPES                 # tests/peers/common.sh finds the recipe files through HERE
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
OAUTH_PORT=${OAUTH_PORT:-9000}
VENV=${POSTROOM_VENV:-.venv}
PY=${PYTHON:-python3}
LOG=$PEERS/test-sh.log               # output of configure/start/stop (see below for why)
T_START=$EPOCHREALTIME

say() { echo "[test.sh $(date +%T)] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# step LABEL SECONDS CMD...: run CMD under a time limit and report how long it took.
step() {
  local label=$1 secs=$2 t0=$EPOCHREALTIME rc=0
  shift 2
  timeout -k 10 "$secs" "$@" || rc=$?
  say "$label: $(elapsed "$t0")s (rc=$rc)"
  [ "$rc" = 124 ] && say "$label timed out after ${secs}s"
  return "$rc"
}
# quiet_step LABEL SECONDS CMD...: like step, but CMD's output goes to $LOG. Server start/stop
# must not write to our stdout: dovecot daemonizes and keeps the descriptors it inherited, which
# would hold a pipe (`bash .ci/run | tee ci.log`) open for as long as it runs. Descriptor 9 (our
# lock, see step 3) is closed for the same reason.
quiet_step() {
  local label=$1 secs=$2 t0=$EPOCHREALTIME rc=0
  shift 2
  echo "=== $(date +%T) $label" >>"$LOG"
  timeout -k 10 "$secs" "$@" >>"$LOG" 2>&1 9>&- || rc=$?
  say "$label: $(elapsed "$t0")s (rc=$rc)"
  [ "$rc" = 0 ] || { say "$label failed; last lines of $LOG:"; tail -n 30 "$LOG" >&2; }
  return "$rc"
}

pid_alive() { local pid; pid=$(tr -dc 0-9 2>/dev/null <"$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
port_open() { timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
mail_up() {
  pid_alive "$PEERS/mailserver/queue/pid/master.pid" && pid_alive "$PEERS/mailserver/run/dovecot/master.pid" || return 1
  local p; for p in 10025 10587 10465 10588; do port_open "$p" || return 1; done
}
oauth_up() { pid_alive "$PEERS/oauth/server.pid" && curl -fsS -m 3 "http://127.0.0.1:$OAUTH_PORT/healthz" >/dev/null 2>&1; }

# ---- stop only what we started, whatever happens -------------------------------------------
STARTED=()
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    quiet_step "stop:${STARTED[i]}" 120 bash "$RECIPES/${STARTED[i]}.sh" stop || say "WARNING: could not stop ${STARTED[i]} (see $LOG)"
  done
  say "total $(elapsed "$T_START")s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 0. sanity ----------------------------------------------------------------------------------
[ -d "$RECIPES" ] || die "$RECIPES missing"
command -v "$PY" >/dev/null || die "$PY not found (set PYTHON to a Python 3.11+ interpreter)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is $("$PY" -V 2>&1); Python 3.11+ is required (set PYTHON)"
[ -f pyproject.toml ] || die "pyproject.toml missing in $ROOT: cannot pip install -e '.[test]'"

# ---- 1. packages for the real peers -------------------------------------------------------------
if [ "${POSTROOM_INSTALL_PEERS:-1}" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "not root: skipping package installation (POSTROOM_INSTALL_PEERS=0 silences this)"
  else
    if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
      # Debian's python3 cannot create venvs without python3-venv (tests/peers uses python3 -m venv too)
      step install:python3-venv 960 bash -c 'RECIPE=test.sh; . "$HERE/common.sh"; apt_install python3-venv' \
        || die "installing python3-venv failed"
    fi
    # mailserver: postfix (also smtp-source/smtp-sink) dovecot-core swaks + perl TLS modules
    step install:mailserver 1900 bash "$RECIPES/mailserver.sh" install || die "installing the mailserver packages failed"
    # clients: swaks msmtp php-cli php-mbstring libphp-phpmailer
    step install:clients 1900 bash "$RECIPES/clients.sh" install || die "installing the client packages failed"
    # postgres: the server binaries; the tests start a throw-away cluster (tests/pgserver.py)
    step install:postgres 1900 bash "$RECIPES/postgres.sh" install || die "installing postgresql failed"
    # dns: dnsmasq + dig; the doctor/DKIM tests start their own dnsmasq through dns.sh
    step install:dns 1900 bash "$RECIPES/dns.sh" install || die "installing the DNS server failed"
    # oauth: curl + $PEERS/venv with django-oauth-toolkit 3.4.1, oauthlib<4
    step install:oauth 1900 bash "$RECIPES/oauth.sh" install || die "installing the OAuth server failed"
    # browser: chromium (Debian) + playwright in $PEERS/venv (never `playwright install`)
    step install:browser 1900 bash "$RECIPES/browser.sh" install || die "installing the browser failed"
    # prometheus: the Debian server; tests/test_metrics.py starts its own on a free port
    step install:prometheus 1900 bash "$RECIPES/prometheus.sh" install || die "installing prometheus failed"
    # wordpress: wordpress mariadb-server php-cli php-mysql; tests/test_wordpress.py starts its
    # own MariaDB (private socket) and PHP's built-in server; apt never starts their services
    step install:wordpress 1900 bash "$RECIPES/wordpress.sh" install || die "installing wordpress failed"
    # systemd: systemd-analyze verify and systemd-sysusers check what `postroom install-service`
    # writes (tests/test_service_install.py; nothing is started). update-alternatives: dpkg.
    step install:systemd 960 bash -c 'RECIPE=test.sh; . "$HERE/common.sh"; apt_install systemd' \
      || die "installing systemd failed"
  fi
fi

# ---- 2. the project's venv ------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  step venv:create 300 "$PY" -m venv "$VENV" || die "could not create the venv $VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$VENV uses $("$VENV/bin/python" -V 2>&1); Python 3.11+ is required (delete it or set POSTROOM_VENV)"
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || die "$VENV has no pip (a half-created venv?): delete it and run again"
STAMP=$VENV/.postroom-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VENV/bin/python" -c 'import postroom' 2>/dev/null; then
  # (drop this machine's harmless "Location 'file:///...' is ignored" pip warning)
  # The venv's own pip and setuptools come from the interpreter's ensurepip (Debian 12: pip
  # 23.0.1, setuptools 66.1), both with known vulnerabilities that pip-audit (2b) reports.
  step "pip:upgrade pip setuptools" 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U 'pip>=26.1.2' 'setuptools>=83' \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || die "upgrading pip and setuptools in $VENV failed"
  step "pip:install -e .[test]" 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || die "pip install -e '.[test]' failed"
  echo "$WANT" >"$STAMP"
else
  say "venv $VENV is up to date with pyproject.toml"
fi

# ---- 2b. known vulnerabilities in the installed set (pip-audit) --------------------------------
# pip-audit has a venv of its own: its dependencies (requests, cachecontrol, cyclonedx...) are
# then neither installed beside Postroom nor audited as Postroom's. It audits $VENV through
# PIPAPI_PYTHON_LOCATION (scripts/audit_deps.py). No advisory service answering is a warning,
# not a failure (see audit_deps.py), unless POSTROOM_AUDIT_STRICT=1.
audit_rc=0
if [ "${POSTROOM_AUDIT:-1}" = 1 ]; then
  AUDIT_VENV=${POSTROOM_AUDIT_VENV:-$PEERS/pip-audit-venv}
  if ! "$AUDIT_VENV/bin/python" -c 'import pip_audit' 2>/dev/null; then
    if [ -x "$AUDIT_VENV/bin/python" ] || step venv:create-audit 300 "$PY" -m venv "$AUDIT_VENV"; then
      step "pip:install pip-audit" 600 "$AUDIT_VENV/bin/python" -m pip install -q --disable-pip-version-check 'pip-audit>=2.7' \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || say "installing pip-audit into $AUDIT_VENV failed"
    fi
  fi
  if "$AUDIT_VENV/bin/python" -c 'import pip_audit' 2>/dev/null; then
    export POSTROOM_AUDIT_PYTHON=$AUDIT_VENV/bin/python   # tests/test_hostile_defaults.py uses it too
    step pip-audit 300 "$AUDIT_VENV/bin/python" scripts/audit_deps.py "$VENV/bin/python" || audit_rc=$?
    [ "$audit_rc" = 1 ] && say "pip-audit: known vulnerabilities in $VENV (listed above): the run will fail after the tests"
  elif [ "${POSTROOM_AUDIT_STRICT:-0}" = 1 ]; then
    say "ERROR: pip-audit is not available in $AUDIT_VENV (POSTROOM_AUDIT_STRICT=1)"; audit_rc=2
  else
    say "WARNING: pip-audit is not available in $AUDIT_VENV: no vulnerability audit this time"
  fi
fi

# ---- 3. start the peers (mailserver + OAuth server) unless they are running ------------------
exec 9>>"$PEERS/.harness.lock"       # the same lock as tests/conftest.py (another session starting them?)
flock -w 300 9 || die "$PEERS/.harness.lock stayed locked for 300 s"
if mail_up; then
  say "mailserver already running for $PEERS: reusing it"
else
  [ -s "$PEERS/mailserver/postfix/main.cf" ] || quiet_step configure:mailserver 300 bash "$RECIPES/mailserver.sh" configure || exit 1
  STARTED+=(mailserver)
  quiet_step start:mailserver 120 bash "$RECIPES/mailserver.sh" start || exit 1
fi
[ -s "$PEERS/clients/msmtprc" ] || quiet_step configure:clients 60 bash "$RECIPES/clients.sh" configure || exit 1
if oauth_up; then
  say "OAuth server already running for $PEERS: reusing it"
else
  [ -s "$PEERS/oauth/db.sqlite3" ] || quiet_step configure:oauth 300 bash "$RECIPES/oauth.sh" configure || exit 1
  STARTED+=(oauth)
  quiet_step start:oauth 120 bash "$RECIPES/oauth.sh" start || exit 1
fi
mail_up || die "mailserver is not answering on 10025/10587/10465/10588 (see $LOG, $PEERS/mailserver/log/)"
oauth_up || die "OAuth server is not answering on $OAUTH_PORT (see $PEERS/oauth/server.log)"
flock -u 9
exec 9>&-

# ---- 4. pytest -----------------------------------------------------------------------------------
TO=(timeout -k 30 "${POSTROOM_PYTEST_TIMEOUT:-2700}")
[ -t 1 ] && TO=(timeout --foreground -k 30 "${POSTROOM_PYTEST_TIMEOUT:-2700}")   # keep Ctrl-C working
rc=0
t0=$EPOCHREALTIME
# Test paths among the arguments (tests/test_x.py, tests/test_x.py::name) replace the whole
# suite; anything else (-k, -x...) is passed on.
TARGET=(tests)
for a in "$@"; do case $a in tests|tests/*) TARGET=(); break ;; esac; done
"${TO[@]}" "$VENV/bin/python" -m pytest -q --durations=25 "${TARGET[@]}" "$@" || rc=$?
say "pytest: $(elapsed "$t0")s (rc=$rc)"
case $rc in
  0) ;;
  5) say "pytest collected no tests (exit 5): treated as a failure" ;;
  124) say "pytest was stopped after ${POSTROOM_PYTEST_TIMEOUT:-2700}s (POSTROOM_PYTEST_TIMEOUT)" ;;
esac

# ---- 5. lint ---------------------------------------------------------------------------------------
lint_rc=0
if [ "${POSTROOM_LINT:-1}" = 1 ]; then
  for tool in ruff mypy; do
    [ -x "$VENV/bin/$tool" ] || { say "$tool missing in $VENV (it belongs in the 'test' extra)"; lint_rc=1; }
  done
  # tests/peers holds third-party recipe files, kept as they were written: not linted.
  [ -x "$VENV/bin/ruff" ] && { step "ruff check" 300 "$VENV/bin/ruff" check --extend-exclude tests/peers . || lint_rc=1; }
  [ -x "$VENV/bin/mypy" ] && { step "mypy --strict src/postroom" 900 "$VENV/bin/mypy" --strict src/postroom || lint_rc=1; }
fi

say "result: pytest rc=$rc, pip-audit rc=$audit_rc$([ "${POSTROOM_AUDIT:-1}" = 1 ] || echo ' (skipped)'), lint rc=$lint_rc$([ "${POSTROOM_LINT:-1}" = 1 ] || echo ' (skipped)')"
if [ "$rc" = 0 ] && { [ "$audit_rc" != 0 ] || [ "$lint_rc" != 0 ]; }; then rc=1; fi
exit "$rc"
