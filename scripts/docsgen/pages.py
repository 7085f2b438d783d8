"""The generated pages: path under docs/ -> its text. One place lists them, for
scripts/docs_gen.py (write, --check) and tests/test_docs.py."""

from __future__ import annotations

from collections.abc import Callable

from docsgen import advice_ref, cli_ref, config_ref, http_ref
from docsgen.markdown import GENERATED


def providers() -> str:
    """The provider table: postroom.diagnostics.api_providers renders it (its one source)."""
    from postroom.diagnostics import api_providers

    return "\n".join([
        "# HTTPS API providers", "",
        GENERATED.format(source="the transports' registry (`postroom.transports`)"), "",
        "Every provider Postroom sends through over its HTTPS API, with the API host per "
        "region (what `postroom probe --https` checks), the keys each connection takes "
        "besides the API key, and whether the provider posts delivery events. Gmail and "
        "Microsoft Graph sign in with OAuth instead of a key: see "
        "[their keys](configuration.md#connections-gmail). Every key is in the "
        "[configuration reference](configuration.md#connections).", "",
        api_providers.readme_section(), ""])


def _http() -> dict[str, str]:
    doc = http_ref.document()
    return {"reference/http-api.md": http_ref.render(doc),
            "reference/openapi.json": http_ref.openapi_json(doc)}


BUILDERS: tuple[Callable[[], dict[str, str]], ...] = (
    lambda: {"reference/configuration.md": config_ref.render()},
    lambda: {"reference/cli.md": cli_ref.render()},
    _http,
    lambda: {"reference/advice.md": advice_ref.render()},
    lambda: {"reference/providers.md": providers()},
)


def generate() -> dict[str, str]:
    """Every generated file, path relative to docs/ -> its content."""
    out: dict[str, str] = {}
    for build in BUILDERS:
        out.update(build())
    return out
