"""Write the manual's generated reference pages (docs/reference/) and the code generated from
the settings models, or check they are current.

    python scripts/docs_gen.py            write every generated file
    python scripts/docs_gen.py --check    exit 1 naming each file that is stale (CI, tests)

Run it after changing a settings model or its comments, a command, the HTTP API,
advice.toml or a transport: tests/test_docs.py fails while a file is stale. The files and
where each comes from: scripts/docsgen/ (docsgen.sendmail_spec writes the generated block
of src/postroom/ingress/sendmail_settings.py, postroom-sendmail's view of the models).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsgen import sendmail_spec
from docsgen.pages import generate

ROOT = Path(__file__).resolve().parents[1]


def files() -> dict[str, str]:
    """Every generated file by its path in the checkout: the pages, then the code."""
    pages = {f"docs/{rel}": text for rel, text in generate().items()}
    return pages | sendmail_spec.files()


def stale(pages: dict[str, str], root: Path = ROOT) -> list[str]:
    """The files (paths relative to ``root``) that differ from what the code generates now."""
    out = []
    for rel, text in pages.items():
        path = root / rel
        if not path.is_file() or path.read_text("utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/docs_gen.py",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each stale file")
    args = parser.parse_args(argv)
    pages = files()
    old = stale(pages)
    if args.check:
        for rel in old:
            print(f"{rel} is stale: run `python scripts/docs_gen.py`", file=sys.stderr)
        return 1 if old else 0
    for rel in old:
        path = ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[rel], "utf-8")
        print(f"{rel}: written")
    print(f"{len(pages)} generated files, {len(old)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
