#!/usr/bin/env bash
# WordPress + MariaDB for the WordPress must-use plugin test (issue 17). Only the packages:
# tests/test_wordpress.py starts its own MariaDB (a temporary datadir, a private socket, no
# TCP) and PHP's built-in web server on a free loopback port; the Debian services (mariadb,
# apache2, which wordpress pulls in) are never started: apt_install keeps their maintainer
# scripts from starting them (policy-rc.d).
#   bash tests/peers/wordpress.sh install|check
RECIPE=wordpress
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
. "$HERE/common.sh"

case "${1:-}" in
  install) apt_install wordpress mariadb-server php-cli php-mysql ;;
  check)
    [ -f /usr/share/wordpress/wp-includes/version.php ] || die "wordpress is not installed"
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || die "mariadb-server is not installed"
    php -m | grep -qi '^mysqli$' || die "php-mysql (mysqli) is not installed"
    log "ok: $(php -r 'include "/usr/share/wordpress/wp-includes/version.php"; echo "WordPress $wp_version";')" ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
