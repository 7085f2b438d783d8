#!/usr/bin/env python3
"""How long the `postroom` command takes to answer: `--help`, `log`, `show`, `queue list`.

    .venv/bin/python bench/cli_bench.py                # 15 runs of each, after 2 warm-ups
    .venv/bin/python bench/cli_bench.py --runs 30 --json
    .venv/bin/python bench/cli_bench.py --src /tmp/before/src   # another checkout's code

A user types these all day; nearly all of their time is Python importing modules. In a
fresh instance (a temporary folder with a default postroom.toml and three queued messages)
each command runs as a whole process, one after the other; reported per command: wall and
CPU seconds (min and median; CPU from wait4, user + system), the modules the process
imported and the sum of their own import times (both from ``python -X importtime``; the
module count does not depend on the machine's load, the times do), and for scale the same
figures for `python -c pass` (Python's own start-up) and for importing the libraries the
database commands cannot do without (SQLAlchemy, pydantic, Typer, Rich).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="counted runs of each command")
    parser.add_argument("--warmup", type=int, default=2, help="runs not counted, first")
    parser.add_argument("--json", action="store_true", help="one JSON object per command")
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
        (folder / "postroom.toml").write_text("", encoding="utf-8")
        msg_id = instance(folder)
        cases = [("postroom --help", ["--help"]),
                 ("postroom log --limit 1", ["log", "--limit", "1"]),
                 ("postroom show ID", ["show", msg_id]),
                 ("postroom queue list", ["queue", "list"])]
        results = [measure(label, [str(exe), *cli], ["-m", "postroom.cli", *cli], folder,
                           args.runs, args.warmup) for label, cli in cases]
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
