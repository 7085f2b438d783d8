"""docs/reference/http-api.md and docs/reference/openapi.json, from the OpenAPI document the
HTTP app serves at /api/v1/openapi.json: the app as `postroom serve` builds it with the
whole web admin (postroom.ingress.http_api.create_app with admin="all", what the front
mounts to answer that path). Building the app reads no configuration and opens nothing.
"""

from __future__ import annotations

import json
from typing import Any, cast

from docsgen.markdown import GENERATED, cell, code, heading, paragraphs, slug
from postroom.ingress.http_api import PREFIX, create_app
from postroom.ingress.http_front import Context

METHODS = ("get", "post", "put", "patch", "delete")


def document() -> dict[str, Any]:
    # The context is what requests are served with; producing the schema never touches it.
    ctx = Context(queue=cast(Any, None), apps=cast(Any, None), settings=cast(Any, None))
    doc: dict[str, Any] = create_app(ctx, admin="all").openapi()
    return doc


def openapi_json(doc: dict[str, Any]) -> str:
    """The document as downloaded from the manual: keys sorted, so it is reproducible."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render(doc: dict[str, Any]) -> str:
    ops = [(path, method, op) for path, item in doc["paths"].items()
           for method, op in item.items() if method in METHODS]
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, method, op in ops:
        groups.setdefault((op.get("tags") or ["messages"])[0], []).append((path, method, op))
    schemes = doc.get("components", {}).get("securitySchemes", {})
    lines = [
        "# HTTP API", "",
        GENERATED.format(source="the OpenAPI document of the HTTP app"), "",
        paragraphs(doc["info"].get("description")), "",
        f"The server publishes this document at `{PREFIX}/openapi.json` and an interactive "
        f"page at `{PREFIX}/docs`; [openapi.json](openapi.json) here is the same document "
        f"(version {doc['info']['version']}).", "",
        "## Authentication", "",
        *(f"- **{name}** ({s.get('scheme', s.get('type'))}"
          + (f", `{s['bearerFormat']}`" if s.get("bearerFormat") else "") + "): "
          + paragraphs(s.get("description")) for name, s in schemes.items()),
        "",
        "Each operation below names the scheme it takes.", "",
        "## Operations", "",
        "| method | path | what it does |", "|---|---|---|",
        *(f"| {method.upper()} | [{cell(code(path))}](#{_anchor(method, path)}) | "
          f"{cell(paragraphs(op.get('summary')))} |" for path, method, op in ops),
        "",
    ]
    for group, items in groups.items():
        lines += [heading(2, group[:1].upper() + group[1:], "tag-" + slug(group)), ""]
        for path, method, op in items:
            lines += _operation(path, method, op)
    lines += [heading(2, "Schemas", "schemas"), ""]
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        lines += _schema(name, schema)
    return "\n".join(lines).rstrip() + "\n"


def _operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    lines = [heading(3, f"{method.upper()} {path}", _anchor(method, path)), ""]
    if op.get("summary"):
        lines += [f"**{paragraphs(op['summary'])}**", ""]
    if op.get("description"):
        lines += [paragraphs(op["description"]), ""]
    auth = [f"[{name}](#authentication)" for req in op.get("security", []) for name in req]
    lines += ["**Authentication:** " + (", ".join(auth) if auth else "none declared"), ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | what it is |", "|---|---|---|---|---|"]
        lines += [f"| {cell(code(p['name']))} | {p['in']} | {cell(_type(p.get('schema', {})))}"
                  f" | {'yes' if p.get('required') else 'no'} | "
                  f"{cell(paragraphs(p.get('description')) or '—')} |" for p in params]
        lines.append("")
    body = op.get("requestBody")
    if body:
        kinds = "; ".join(f"`{ctype}` {_type(c.get('schema', {}))}".rstrip()
                          for ctype, c in body.get("content", {}).items())
        lines += [f"**Request body** ({'required' if body.get('required') else 'optional'})"
                  f": {kinds}", ""]
    responses = op.get("responses", {})
    if responses:
        lines += ["| status | meaning | body |", "|---|---|---|"]
        for status, r in responses.items():
            bodies = ", ".join(f"`{ctype}` {_type(c.get('schema', {}))}".rstrip()
                               for ctype, c in r.get("content", {}).items())
            lines.append(f"| {status} | {cell(paragraphs(r.get('description')))} | "
                         f"{cell(bodies or '—')} |")
        lines.append("")
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [heading(3, name, "schema-" + slug(name)), ""]
    if schema.get("description"):
        lines += [paragraphs(schema["description"]), ""]
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    if props:
        lines += ["| field | type | required | what it is |", "|---|---|---|---|"]
        lines += [f"| {cell(code(field))} | {cell(_type(s))} | "
                  f"{'yes' if field in required else 'no'} | "
                  f"{cell(paragraphs(s.get('description')) or '—')} |"
                  for field, s in props.items()]
        lines.append("")
    elif "enum" in schema or "type" in schema:
        lines += [f"Type: {_type(schema)}", ""]
    return lines


def _type(s: dict[str, Any]) -> str:
    """A JSON schema in a few words, with a link for a named schema."""
    if "$ref" in s:
        name = str(s["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#schema-{slug(name)})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            parts = [_type(x) for x in s[key] if x.get("type") != "null"]
            return " or ".join(dict.fromkeys(p for p in parts if p)) or "null"
    if "enum" in s:
        return " or ".join(code(json.dumps(v)) for v in s["enum"])
    if "const" in s:
        return code(json.dumps(s["const"]))
    kind = s.get("type")
    if kind == "array":
        return f"array of {_type(s.get('items', {}))}"
    if kind == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"object of {_type(s['additionalProperties'])}"
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind if k != "null")
    words = str(kind or "any")
    return f"{words} ({s['format']})" if s.get("format") else words


def _anchor(method: str, path: str) -> str:
    return f"{method}-{slug(path)}"
