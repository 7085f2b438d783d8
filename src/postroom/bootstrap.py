"""First run: the commented configuration file, the data folder, a self-signed certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from postroom.exceptions import ConfigError
from postroom.fsperm import open_private, private_dir

CONFIG_TEMPLATE = '''\
# postroom.toml — written by Postroom on first run. Every key is optional; the values shown
# commented out are the defaults. Environment variables override this file:
# POSTROOM_SERVER__SMTP_LISTEN=127.0.0.1:2600, POSTROOM_DELIVERY__CONCURRENCY=20, ...

[server]
# data_dir = "postroom-data"            # database, key, certificate (relative to this file)
# database = ""                         # default sqlite:///<data_dir>/postroom.db
# smtp_listen = "127.0.0.1:2525"        # where apps hand mail in (STARTTLS offered)
# smtps_listen = ""                     # optional implicit-TLS port, e.g. "127.0.0.1:4465"
# http_listen = "127.0.0.1:8025"        # HTTP API (/api/v1, Bearer API keys) and /healthz; "" = off
# hostname = "<this machine's name>"    # banner and EHLO name
# tls_cert = ""                         # PEM certificate + key; default: self-signed
# tls_key = ""
# max_message_size = 36700160           # bytes; larger messages get 552
# max_recipients = 1000                 # per message; more get 452
# trusted_networks = ["127.0.0.1/32", "::1/128"]
# trusted_without_auth = true           # trusted clients may send without AUTH; others must
#                                       # authenticate (`postroom app add NAME`), over TLS
# auth_failure_delay = 2.0              # seconds before answering a failed AUTH
# max_auth_failures = 3                 # then the session is closed
# worker = true                         # deliver from inside `postroom serve`

[delivery]
# concurrency = 100                     # messages in flight per worker
# min_backoff = 300                     # first retry after 5 min, doubling...
# max_backoff = 4000                    # ...up to about 67 min between tries
# max_lifetime = 432000                 # give up after 5 days
# lease_seconds = 600                   # a crashed worker's mail is picked up after this

# [retention]                           # what the log keeps; finished mail only, never waiting
# keep_bodies_days = 30                 # then message bodies and transcripts are removed
# keep_rows_days = 90                   # then the log rows themselves (0 = keep forever)
# max_size = "2GB"                      # stored bodies in all; oldest finished go first

# [log]                                 # what serve and worker write to stderr (journald)
# format = "text"                       # text | json | logfmt: one line per event
# level = "info"                        # info: a line per accepted and finished message

# [admin]                               # the web admin, under /admin on http_listen
# enabled = true                        # served to server.admin_networks only
# bodies = "admin"                      # lowest role that may read message bodies: admin|viewer
# session_idle = 1800                   # seconds without a request before a session ends
# session_max = 43200                   # seconds after login a session ends anyway
# secure_cookies = "auto"               # auto: over TLS or a proxy saying https; always; never
# login_failures = 5                    # failed logins in a row, then the account is locked
# lockout = 900                         # ...for this many seconds
# sso_header = ""                       # e.g. "X-Forwarded-User": single sign-on by a proxy,
# sso_proxies = []                      # trusted only from these addresses (required with it)
# sso_role = ""                         # "": the account must exist; viewer|admin: created
# language = ""                         # "": the browser's; else "en" or "fr"
# process_idle = 300                    # seconds without an admin request, then its process stops

# Add the provider you deliver through. Until a connection exists, mail is accepted and
# kept in the queue; it is delivered once you add one and restart.
#
# [[connections]]
# name = "primary"
# transport = "smtp"
# host = "smtp.example.com"
# port = 587
# security = "starttls"                 # none | starttls | smtps
# auth = "plain"                        # none|auto|plain|login|cram-md5|xoauth2|oauthbearer
# username = "me@example.com"
# password_env = "PRIMARY_PASSWORD"     # or password_file = "/run/secrets/smtp",
#                                       # or `postroom connection set-password primary`
# ca_file = "/etc/ssl/my-ca.pem"        # a private CA; verification is always on unless
#                                       # tls_verify = false
'''


def write_config_template(path: Path) -> None:
    """The commented template, 0600: the user will add credentials (or secret file paths)
    to it. O_EXCL: never over a file that appeared meanwhile."""
    try:
        private_dir(path.parent)
        with open_private(path, "x", encoding="utf-8") as f:
            f.write(CONFIG_TEMPLATE)
    except FileExistsError:
        return  # another process wrote it first: theirs is as good
    except OSError as err:
        raise ConfigError(
            f"cannot create the configuration file {path}: {err.strerror or err}; create it "
            "yourself (any content, even empty) or pass --config with a path this user may "
            "write", code="config.write") from err


def ensure_certificate(cert: Path, key: Path, hostname: str, *, apart: bool = False) -> bool:
    """Make a self-signed certificate for STARTTLS if there is none. True if made. With
    ``apart`` (the long-running processes) a child process makes it (postroom.apart): this
    one then never imports cryptography's X.509 and key modules."""
    if cert.exists() and key.exists():
        return False
    if apart:
        from postroom import apart as child

        if child.available():
            args = {"cert": str(cert), "key": str(key), "hostname": hostname}
            return bool(child.run("certificate", args)["made"])
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_dir(cert.parent)
    private_dir(key.parent)
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [
        x509.DNSName(hostname or "localhost"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(pkey, hashes.SHA256())
    )
    # Both 0600. The key is the server's identity. The certificate is public, but it lives
    # in the 0700 data folder anyway (copy it out to pin it in a client), and one rule for
    # every file Postroom writes keeps it from being world-writable under umask 000.
    with open_private(key, "wb") as f:
        f.write(
            pkey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open_private(cert, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return True


def certificate_job(args: dict[str, Any]) -> dict[str, Any]:
    """postroom.apart's ``certificate``: :func:`ensure_certificate` in the child."""
    made = ensure_certificate(Path(args["cert"]), Path(args["key"]), str(args["hostname"]))
    return {"made": made}
