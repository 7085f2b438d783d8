"""The text of Postroom's systemd units: `postroom.service` (`postroom serve`) and the
template `postroom-worker@.service` (`postroom worker`, one instance per extra delivery
process: `systemctl enable --now postroom-worker@1`).

Both are hardened the same way: the whole file system read-only but the data directory,
no privileges to gain, no capabilities unless a listener needs a port below 1024, private
/tmp and devices, no home directories, system calls limited to what a service uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SERVICE_NAME = "postroom.service"
WORKER_NAME = "postroom-worker@.service"
# systemd restarts the service when the event loop has not pinged for this long
# (postroom.system.notify pings every half of it). A loop blocked a whole minute is stuck.
WATCHDOG_SEC = 60
# A first start after an upgrade migrates the database, after a backup of an SQLite one:
# minutes on a large log, all before READY=1.
START_TIMEOUT_SEC = 600
# The stop timeout is [delivery] shutdown_grace plus this, to close the store after it.
STOP_MARGIN_SEC = 30
# Never below this: a later config raising smtp_max_sessions should not need the unit
# reinstalled; a descriptor costs the kernel nothing until it is open.
MIN_OPEN_FILES = 65536
# Characters systemd takes as they are in an ExecStart= word; any other gets the word quoted.
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


@dataclass(frozen=True)
class UnitSpec:
    """What the units say about this installation."""

    executable: Path  # the `postroom` entry point of the installation (its venv's bin/)
    config: Path  # postroom.toml on the target system
    user: str  # the service user, and its group of the same name
    data_dir: Path  # the one writable path
    open_files: int  # LimitNOFILE
    low_ports: bool  # a listener on a port below 1024: CAP_NET_BIND_SERVICE
    stop_timeout: int  # seconds for SIGTERM to finish deliveries in flight
    protect_home: str = "yes"  # "read-only" when the installation lives in a home folder


def exec_word(word: str) -> str:
    """``word`` written for a systemd command line: quoted when it must be, with '%'
    (specifiers) and '$' (variables) doubled so that they reach the program as typed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command(spec: UnitSpec, subcommand: str) -> str:
    return " ".join(exec_word(w) for w in
                    [str(spec.executable), subcommand, "--config", str(spec.config)])


def _hardening(spec: UnitSpec) -> str:
    capability = "CAP_NET_BIND_SERVICE" if spec.low_ports else ""
    lines = [
        f"User={spec.user}",
        f"Group={spec.user}",
        f"WorkingDirectory={exec_word(str(spec.data_dir))}",
        # Passwords named by password_env, client_secret_env..., POSTROOM_SECRET_KEY:
        # a root-only file, optional ('-').
        f"EnvironmentFile=-{exec_word(str(spec.config.parent / 'environment'))}",
        f"LimitNOFILE={spec.open_files}",
        "UMask=0077",
        # The data directory is the only path written: database, key, certificate.
        "ProtectSystem=strict",
        f"ReadWritePaths={exec_word(str(spec.data_dir))}",
        f"ProtectHome={spec.protect_home}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        f"CapabilityBoundingSet={capability}",
    ]
    if capability:  # listening on 25, 465 or 587 as a user that is not root
        lines.append(f"AmbientCapabilities={capability}")
    lines += [
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        # AF_UNIX: sd_notify and the sendmail hand-off; AF_NETLINK: glibc's getaddrinfo
        # asks the kernel which address families are configured.
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        # Not MemoryDenyWriteExecute: cffi and ctypes callbacks (argon2, cryptography's
        # bindings) may need writable executable memory.
    ]
    return "\n".join(lines)


def _unit(spec: UnitSpec, *, header: str, description: str, after: str, subcommand: str) -> str:
    return f"""\
# Written by `postroom install-service`; running it again rewrites it. {header}
[Unit]
Description={description}
After=network-online.target{after}
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={_command(spec, subcommand)}
ExecReload=/bin/kill -HUP $MAINPID
WatchdogSec={WATCHDOG_SEC}
TimeoutStartSec={START_TIMEOUT_SEC}
TimeoutStopSec={spec.stop_timeout}
Restart=on-failure
RestartSec=5
{_hardening(spec)}

[Install]
WantedBy=multi-user.target
"""


def service_unit(spec: UnitSpec) -> str:
    """postroom.service: the listeners, the HTTP API, the web admin and a worker; SIGHUP
    reloads the configuration."""
    return _unit(spec, header="Change settings\n# with `systemctl edit postroom` (a drop-in "
                 "that survives), not in this file.", description="Postroom mail gateway",
                 after="", subcommand="serve")


def worker_unit(spec: UnitSpec) -> str:
    """postroom-worker@.service: one more delivery process per instance, after the server
    (which migrates the database first); SIGHUP reloads its configuration too (postroom.hup)."""
    return _unit(spec, header="One delivery\n# process per instance: `systemctl enable --now "
                 "postroom-worker@1 postroom-worker@2`.",
                 description="Postroom delivery worker %i", after=f" {SERVICE_NAME}",
                 subcommand="worker")
