"""One-time work of a long-running process, done in a child Python process.

Some start-up work needs a large library once: alembic (and mako and pygments through it)
to migrate the database, cryptography to make the self-signed certificate. A module that
Python has imported is never given back (its classes and functions stay referenced from
the libraries it registered with), so `postroom serve` or `postroom worker` would carry
them for as long as it runs; a child process pays for them and exits.

The child is ``python -m postroom.apart JOB``: the job's arguments as JSON on stdin (never
on the command line, where other users can read a database password in ``ps``), its
result as JSON on stdout. A Postroom error in the child comes back as the same kind of
error, with its code and message; anything else as a :class:`StoreError` naming the job.
Jobs are listed in :data:`JOBS`; each is a function of one JSON object returning one.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from postroom.exceptions import ConfigError, PostroomError, StoreError

# job -> "module:function"; imported in the child only.
JOBS: dict[str, str] = {
    "migrate": "postroom.store.db:migrate_job",
    "certificate": "postroom.bootstrap:certificate_job",
}
_KINDS: dict[str, type[PostroomError]] = {"ConfigError": ConfigError, "StoreError": StoreError}


def available() -> bool:
    """Whether a child Python can be started the way this one was (an embedding program
    may have no interpreter path); the caller then does the work in-process."""
    return bool(sys.executable)


def run(job: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` in a child process and return its result. No time limit: a migration
    of a large PostgreSQL log may take minutes, as it would in-process."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    try:
        done = subprocess.run([sys.executable, "-m", "postroom.apart", job],
                              input=json.dumps(args).encode(), capture_output=True,
                              check=False)
    except OSError as err:
        raise StoreError(f"cannot start a Python process for the {job} step: {err}; check "
                         f"that {sys.executable} can be run", code=f"apart.{job}") from err
    try:  # the last line: a library may have printed before it
        answer = json.loads((done.stdout.strip().splitlines() or [b"null"])[-1])
    except ValueError:
        answer = None
    if done.returncode == 0 and isinstance(answer, dict) and "result" in answer:
        result: dict[str, Any] = answer["result"]
        return result
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        kind = _KINDS.get(str(error.get("kind")), PostroomError)
        raise kind(str(error.get("message")), code=str(error.get("code")),
                   permanent=bool(error.get("permanent")))
    tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
    raise StoreError(f"the {job} step failed (exit status {done.returncode}): "
                     + (" / ".join(tail) or "no output")
                     + "; run `postroom serve` again, and report the error if it stays",
                     code=f"apart.{job}")


def _function(job: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    module, _, name = JOBS[job].partition(":")
    fn: Callable[[dict[str, Any]], dict[str, Any]] = getattr(
        importlib.import_module(module), name)
    return fn


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in JOBS:
        print(f"usage: python -m postroom.apart {{{'|'.join(JOBS)}}} < ARGS.json",
              file=sys.stderr)
        return 2
    args = json.loads(sys.stdin.buffer.read() or b"{}")
    try:
        result = _function(argv[0])(args)
    except PostroomError as err:
        print(json.dumps({"error": {"kind": type(err).__name__, "message": err.message,
                                    "code": err.code, "permanent": err.permanent}}))
        return 1
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
