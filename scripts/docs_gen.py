"""Write the manual's generated reference pages (docs/reference/), or check they are current.

    python scripts/docs_gen.py            write every generated page
    python scripts/docs_gen.py --check    exit 1 naming each page that is stale (CI, tests)

Run it after changing a settings model or its comments, a command, the HTTP API,
advice.toml or a transport: tests/test_docs.py fails while a page is stale. The pages and
where each comes from: scripts/docsgen/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsgen.pages import generate

DOCS = Path(__file__).resolve().parents[1] / "docs"


def stale(pages: dict[str, str], docs: Path = DOCS) -> list[str]:
    """The pages whose file differs from what the code generates now."""
    out = []
    for rel, text in pages.items():
        path = docs / rel
        if not path.is_file() or path.read_text("utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/docs_gen.py",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each stale page")
    args = parser.parse_args(argv)
    pages = generate()
    old = stale(pages)
    if args.check:
        for rel in old:
            print(f"docs/{rel} is stale: run `python scripts/docs_gen.py`", file=sys.stderr)
        return 1 if old else 0
    for rel in old:
        path = DOCS / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[rel], "utf-8")
        print(f"docs/{rel}: written")
    print(f"{len(pages)} generated pages, {len(old)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
