#!/usr/bin/env bash
# PostgreSQL for Postroom's store/queue tests (issue 4). Only the packages: the tests start
# their own throw-away server (tests/pgserver.py: initdb in a temporary folder, a free
# loopback port, stopped at the end of the session); the Debian cluster is never started.
#   bash tests/peers/postgres.sh install
RECIPE=postgres
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
. "$HERE/common.sh"

case "${1:-}" in
  install) apt_install postgresql ;;
  check)
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || die "postgresql is not installed"
    log "ok: $(ls -d /usr/lib/postgresql/*/bin | tail -1)" ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
