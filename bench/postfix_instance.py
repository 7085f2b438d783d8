"""A private, throw-away Postfix relay instance for the benchmark (never the system one).

Everything lives under one root directory: ``ROOT/conf`` (main.cf, master.cf, used with
``postfix -c ROOT/conf``), ``ROOT/queue``, ``ROOT/data`` and ``ROOT/maillog``. The system
Postfix and /etc/postfix are never written to (/etc/postfix is only read, as
``meta_directory``, for the list of files Postfix installs).

The instance listens on 127.0.0.1:<port> only, accepts mail from 127.0.0.0/8 only and
relays everything to ``relayhost = [127.0.0.1]:<relay_port>``. Apart from what that needs
it keeps Postfix's defaults, including the durable queue (cleanup fsyncs every queue file
before smtpd answers 250) and logging through postlogd to a file, like the measurements
of the machine's reference benchmarks. Differences from a stock Debian install: chroot is
off (a chroot would need copies of /etc files under the queue directory) and the
concurrency limits are set explicitly to 20 (the Postfix default, as in those benchmarks).

Usage as a script (handy for poking at it by hand)::

    python bench/postfix_instance.py start ROOT PORT RELAY_PORT
    python bench/postfix_instance.py stop ROOT
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _main_cf(root: Path, relay_port: int, overrides: Mapping[str, str] | None = None) -> str:
    """main.cf; ``overrides`` replace (or add) parameters (tests/test_dsn_real.py: local
    delivery of its own domain, so that an unknown user is bounced)."""
    lines = _MAIN_CF.format(root=root, relay_port=relay_port).splitlines()
    extra = dict(overrides or {})
    out = [f"{key} = {extra.pop(key)}" if (key := line.partition(" =")[0]) in extra else line
           for line in lines]
    return "\n".join([*out, *(f"{k} = {v}" for k, v in extra.items())]) + "\n"


_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
# maillog_file must start with one of these prefixes (default: /var, /dev/stdout only)
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
myhostname = relay.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{relay_port}
mynetworks = 127.0.0.0/8
mynetworks_style = host
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks reject
smtpd_client_restrictions = permit_mynetworks reject
default_destination_concurrency_limit = 20
smtp_destination_concurrency_limit = 20
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 10240000
biff = no
"""


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2 :].split()  # fields from #3 (state) on


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user+system, all threads) of a process; with ``children``, plus the
    CPU of the children it has reaped."""
    f = _stat(pid)
    ut, st, cut, cst = map(int, f[11:15])
    return (ut + st + ((cut + cst) if children else 0)) / CLK


def children_of(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(_stat(int(d))[1]) == ppid:
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def mem(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and Pss of one process, in KiB (missing keys if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


class PostfixInstance:
    def __init__(self, root: str | Path, port: int, relay_port: int,
                 overrides: Mapping[str, str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "conf"
        self.queue = self.root / "queue"
        self.port = port
        self.relay_port = relay_port
        self.overrides = overrides
        self.started = False

    # -- set-up ----------------------------------------------------------------------------
    def configure(self) -> None:
        for d in (self.conf, self.queue, self.root / "data"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        subprocess.run(["chown", "postfix:postfix", str(self.root / "data")], check=True)
        (self.conf / "main.cf").write_text(_main_cf(self.root, self.relay_port, self.overrides))
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        # creates the queue sub-directories and sets their owners and modes
        self._postfix("set-permissions", check=False)
        self._postfix("check")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                           text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed: {r.stdout}{r.stderr}")
        return r

    def start(self, timeout: float = 20.0) -> None:
        self.configure()
        self._postfix("start")
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"private postfix did not answer on 127.0.0.1:{self.port}; see "
                           f"{self.root}/maillog")

    def stop(self, timeout: float = 20.0) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)  # only our own master, by pid

    # -- observation -----------------------------------------------------------------------
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        m = self.master_pid()
        return [] if m is None else [m, *children_of(m)]

    def cpu(self) -> float:
        """CPU seconds of the whole instance: master, live children, reaped children."""
        m = self.master_pid()
        if m is None:
            return 0.0
        total = proc_cpu(m, children=True)
        for c in children_of(m):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += proc_cpu(c)
        return total

    def memory(self) -> dict[str, int]:
        """Sum of VmRSS and of Pss over all processes of the instance (KiB)."""
        rss = pss = n = 0
        for pid in self.pids():
            m = mem(pid)
            if "VmRSS" in m:
                rss += m["VmRSS"]
                pss += m.get("Pss", 0)
                n += 1
        return {"rss_kb": rss, "pss_kb": pss, "procs": n}

    def queued(self) -> int:
        """Messages still in the queue (files in incoming/active/deferred/maildrop/hold)."""
        n = 0
        for q in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _, _, files in os.walk(self.queue / q):
                n += len(files)
        return n

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.05)
        return False


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "start":
        pf = PostfixInstance(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        pf.start()
        print(f"postfix master pid {pf.master_pid()} on 127.0.0.1:{pf.port}")
    elif len(sys.argv) == 3 and sys.argv[1] == "stop":
        PostfixInstance(sys.argv[2], 0, 0).stop()
    else:
        sys.exit(__doc__)
