#!/usr/bin/env bash
# Prometheus for the /metrics test (issue 15). Only the package: tests/test_metrics.py starts
# its own server (a temporary config and data folder, a free loopback port, stopped at the
# end of the test); the Debian service is never started by this recipe.
#   bash tests/peers/prometheus.sh install|check
RECIPE=prometheus
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
. "$HERE/common.sh"

case "${1:-}" in
  install) apt_install prometheus ;;
  check)
    command -v prometheus >/dev/null 2>&1 || die "prometheus is not installed"
    log "ok: $(prometheus --version 2>&1 | head -1)" ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
