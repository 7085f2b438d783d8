#!/usr/bin/env python3
"""How long the `postroom` command takes to answer: `--help`, `log`, `show`, `queue list`.

    .venv/bin/python bench/cli_bench.py                # 15 runs of each, after 2 warm-ups
    .venv/bin/python bench/cli_bench.py --runs 30 --json
    .venv/bin/python bench/cli_bench.py --src /tmp/before/src   # another checkout's code
    .venv/bin/python bench/cli_bench.py --serve both   # also with a `postroom serve` running

A user types these all day; nearly all of their time is Python importing modules. In a
fresh instance (a temporary folder with a default postroom.toml and three queued messages)
each command runs as a whole process, one after the other; reported per command: wall and
CPU seconds (min and median; CPU from wait4, user + system), the modules the process
imported and the sum of their own import times (both from ``python -X importtime``; the
module count does not depend on the machine's load, the times do), and for scale the same
figures for `python -c pass` (Python's own start-up) and for importing the libraries the
database commands cannot do without (SQLAlchemy, pydantic, Typer, Rich).

`log`, `show` and `queue list` are answered by a running `postroom serve` of the instance
when there is one (postroom.control). ``--serve without`` (the default) measures them with
none running, ``--serve with`` with one running (SMTP on a free port, no HTTP), ``--serve
both`` one after the other, labelled. A serve is waited for until its socket answers; the
rows marked "(serve)" also check that the answer was serve's (no SQLAlchemy imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

FLOOR = "import typer, pydantic, sqlalchemy, rich.console, rich.table"


def run_once(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of ``argv``, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def imports(python_args: list[str], cwd: Path) -> tuple[int, float]:
    """(modules imported, sum of their own import times in ms) for ``python ARGS``."""
    res = subprocess.run([sys.executable, "-X", "importtime", *python_args], cwd=cwd,
                         capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split("|") for line in res.stderr.splitlines()
            if line.startswith("import time:") and "self [us]" not in line]
    return len(rows), sum(int(r[0].rsplit(":", 1)[1]) for r in rows) / 1000


def measure(label: str, argv: list[str], python_args: list[str], cwd: Path,
            runs: int, warmup: int) -> dict[str, object]:
    for _ in range(warmup):
        run_once(argv, cwd)
    walls, cpus = zip(*(run_once(argv, cwd) for _ in range(runs)), strict=True)
    modules, import_ms = imports(python_args, cwd)
    return {"command": label, "wall_min": min(walls), "wall_median": statistics.median(walls),
            "cpu_min": min(cpus), "cpu_median": statistics.median(cpus),
            "modules": modules, "import_ms": import_ms}


def instance(folder: Path) -> str:
    """A default instance in ``folder`` with three queued messages; the id of the first."""
    postroom = [sys.executable, "-m", "postroom.cli"]
    ids = []
    for n in range(3):
        out = subprocess.run([*postroom, "send", "--from", "a@example.com", "--to",
                              "b@example.org", "--subject", f"bench {n}", "--text", "hello"],
                             cwd=folder, capture_output=True, text=True, timeout=120,
                             check=True, stdin=subprocess.DEVNULL)
        ids.append(out.stdout.split()[-1])
    return ids[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_serve(folder: Path, exe: Path) -> Iterator[None]:
    """`postroom serve` in ``folder`` until the block ends; ready when its socket is."""
    sock = folder / "postroom-data" / "cli.sock"
    proc = subprocess.Popen([str(exe), "serve"], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("postroom serve did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def answered_by_serve(argv: list[str], cwd: Path) -> bool:
    """True when ``postroom ARGV`` got its answer from serve (imported no SQLAlchemy)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "postroom.cli", *argv],
                         cwd=cwd, capture_output=True, text=True, timeout=120, check=True)
    return "| sqlalchemy\n" not in res.stderr and "postroom.control" in res.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="counted runs of each command")
    parser.add_argument("--warmup", type=int, default=2, help="runs not counted, first")
    parser.add_argument("--json", action="store_true", help="one JSON object per command")
    parser.add_argument("--serve", choices=("without", "with", "both"), default="without",
                        help="measure log/show/queue list with a `postroom serve` running, "
                        "without, or both (--help is measured once)")
    parser.add_argument("--src", type=Path, help="run the postroom package of this src folder "
                        "(e.g. `git archive` of an older commit) instead of the installed one")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    if args.src is not None:
        if not (args.src / "postroom" / "cli.py").is_file():
            parser.error(f"--src {args.src}: no postroom/cli.py in it")
        os.environ["PYTHONPATH"] = str(args.src.resolve())  # before the editable install
    exe = Path(sys.executable).with_name("postroom")
    if not exe.exists():
        parser.error(f"{exe} not found: install Postroom in this environment (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="cli-bench-") as tmp:
        folder = Path(tmp)
        # no HTTP and a free SMTP port: `--serve with` must not collide with anything
        (folder / "postroom.toml").write_text(
            f'[server]\nsmtp_listen = "127.0.0.1:{free_port()}"\nhttp_listen = ""\n',
            encoding="utf-8")
        msg_id = instance(folder)
        reads = [("postroom log --limit 1", ["log", "--limit", "1"]),
                 ("postroom show ID", ["show", msg_id]),
                 ("postroom queue list", ["queue", "list"])]
        cases = [("postroom --help", ["--help"])]
        if args.serve in ("without", "both"):
            cases += reads
        results = [measure(label, [str(exe), *cli], ["-m", "postroom.cli", *cli], folder,
                           args.runs, args.warmup) for label, cli in cases]
        if args.serve in ("with", "both"):
            with running_serve(folder, exe):
                for label, cli in reads:
                    if not answered_by_serve(cli, folder):
                        raise SystemExit(f"{label}: not answered by the running serve")
                    results.append(measure(f"{label} (serve)", [str(exe), *cli],
                                           ["-m", "postroom.cli", *cli], folder, args.runs,
                                           args.warmup))
        results.append(measure("python -c pass", [sys.executable, "-c", "pass"],
                               ["-c", "pass"], folder, args.runs, args.warmup))
        results.append(measure(f"python -c '{FLOOR}'", [sys.executable, "-c", FLOOR],
                               ["-c", FLOOR], folder, args.runs, args.warmup))
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    print(f"{'command':<70} {'wall min':>9} {'median':>7} {'cpu min':>8} {'median':>7} "
          f"{'modules':>8} {'import ms':>9}")
    for r in results:
        print(f"{r['command']:<70} {r['wall_min']:9.3f} {r['wall_median']:7.3f} "
              f"{r['cpu_min']:8.3f} {r['cpu_median']:7.3f} {r['modules']:8d} "
              f"{r['import_ms']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
