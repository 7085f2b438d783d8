"""Fail on a known vulnerability in Postroom's venv; warn when no advisory service answers.

    python scripts/audit_deps.py VENV_PYTHON [pip-audit options...]

Run it with an interpreter that has pip-audit (scripts/test.sh keeps one in a venv of its
own, so that pip-audit's dependencies are neither installed beside Postroom nor audited as
its own). The packages audited are those of VENV_PYTHON's environment, found through
pip-audit's PIPAPI_PYTHON_LOCATION; options after it go to pip-audit (the tests point
``--vulnerability-service osv --osv-url`` at a local fake).

Exit status:
  0  no known vulnerability; or the advisory service could not be asked (unreachable, or it
     knew none of the packages), which is printed as a WARNING: an outage of a service
     outside the project must not fail every run of unchanged code. The dependency floors
     in pyproject.toml are the lasting protection; this is the tripwire where it can run.
  1  known vulnerabilities: each package, version, advisory and fixed versions is listed,
     with what to do.
  2  POSTROOM_AUDIT_STRICT=1 and some package could not be audited (for a machine that
     must prove the audit ran, such as a release build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TIMEOUT = 240  # seconds for pip-audit as a whole (scripts/test.sh bounds this script too)
EDITABLE = "distribution marked as editable"  # pip-audit's skip reason for postroom itself


def say(text: str) -> None:
    print(f"[audit_deps] {text}", file=sys.stderr, flush=True)


def run_pip_audit(target: str, extra: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--skip-editable",
           "--format", "json", "--output", str(out), "--desc", "off", "--aliases", "on",
           *extra]
    env = {**os.environ, "PIPAPI_PYTHON_LOCATION": target}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)


def could_not_audit(why: str, strict: bool) -> int:
    if strict:
        say(f"FAILED: {why} (POSTROOM_AUDIT_STRICT=1)")
        return 2
    say(f"WARNING: no vulnerability audit this time: {why}. The dependency floors in "
        "pyproject.toml still apply; set POSTROOM_AUDIT_STRICT=1 to make this a failure")
    return 0


def report(deps: list[dict[str, Any]], strict: bool) -> int:
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d and d["skip_reason"] != EDITABLE]
    audited = [d for d in deps if "skip_reason" not in d]
    if vulnerable:
        say(f"FAILED: known vulnerabilities in {len(vulnerable)} installed package(s):")
        for d in vulnerable:
            for v in d["vulns"]:
                ids = ", ".join([v["id"], *v.get("aliases", [])])
                fixed = ", ".join(v.get("fix_versions") or []) or "none yet"
                say(f"  {d['name']} {d['version']}: {ids} (fixed in: {fixed})")
        say("fix: raise the package's floor in pyproject.toml to a fixed version (a "
            "dependency of a dependency gets its own floor there too), then run "
            "scripts/test.sh again: it reinstalls the venv when pyproject.toml changes")
        return 1
    if not audited:
        return could_not_audit(f"the advisory service knew none of the {len(skipped)} "
                               f"package(s) (first: {skipped[0]['name']}: "
                               f"{skipped[0]['skip_reason']})" if skipped
                               else "pip-audit found no packages", strict)
    say(f"no known vulnerability in {len(audited)} package(s)")
    if skipped:
        names = ", ".join(f"{d['name']} ({d['skip_reason']})" for d in skipped)
        return could_not_audit(f"{len(skipped)} package(s) not audited: {names}", strict)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        say("usage: python scripts/audit_deps.py VENV_PYTHON [pip-audit options...]")
        return 64
    target, extra = argv[0], argv[1:]
    if not os.access(target, os.X_OK):
        say(f"FAILED: {target} is not an executable Python; give the project venv's "
            "bin/python")
        return 64
    strict = os.environ.get("POSTROOM_AUDIT_STRICT") == "1"
    with tempfile.TemporaryDirectory(prefix="postroom-audit-") as tmp:
        out = Path(tmp) / "audit.json"
        try:
            proc = run_pip_audit(target, extra, out)
        except subprocess.TimeoutExpired:
            return could_not_audit(f"pip-audit did not finish in {TIMEOUT}s", strict)
        except FileNotFoundError as err:
            say(f"FAILED: cannot run pip-audit ({err}); run this script with the "
                "interpreter of a venv that has pip-audit installed")
            return 64
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # No report: pip-audit stopped before auditing (service unreachable, DNS...).
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip-audit exited {proc.returncode}"
            if "No module named pip_audit" in why:
                say(f"FAILED: {why}; run this script with a venv that has pip-audit")
                return 64
            return could_not_audit(f"pip-audit could not reach its advisory service "
                                   f"({why.strip()[:300]})", strict)
    return report(data.get("dependencies", []), strict)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
