"""`/docs`: a self-contained HTML rendering of `/openapi.json`.

quart-schema's own docs pages load Swagger UI / ReDoc / Scalar from public CDNs, which
an offline or strict-CSP deployment cannot reach. This page is rendered on the server
from the same OpenAPI document, with no JavaScript and no external URL; its one inline
stylesheet is allowed by its SHA-256 hash in the page's Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
import json
from html import escape
from typing import Any

from quart import Blueprint, Response, current_app
from quart_schema import hide

bp = Blueprint("docs", __name__)

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:1rem 1.5rem}
body{color:#1b1f24}h1{margin-bottom:.2rem}
.op{border:1px solid #d0d7de;border-radius:6px;margin:1rem 0;padding:.6rem .9rem}
.m{display:inline-block;min-width:4.2rem;font-weight:700;font-family:monospace}
.get{color:#0969da}.post{color:#1a7f37}.put,.patch{color:#9a6700}.delete{color:#cf222e}
code,pre{font-family:ui-monospace,monospace;font-size:13px}pre{background:#f6f8fa;padding:.6rem;overflow:auto}
.lock{font-size:12px;color:#57606a}.tag{font-size:12px;color:#57606a;margin-left:.5rem}
details summary{cursor:pointer}
""".strip()
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
DOCS_CSP = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
_METHODS = ("get", "post", "put", "patch", "delete")


def _schema_block(title: str, schema: Any) -> str:
    return (
        f"<details><summary>{escape(title)}</summary>"
        f"<pre>{escape(json.dumps(schema, indent=2))}</pre></details>"
    )


def _resolve(schema: Any, components: dict[str, Any]) -> Any:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        return components.get(ref.rsplit("/", 1)[1], schema)
    return schema


def render_docs(doc: dict[str, Any]) -> str:
    """The HTML page for an OpenAPI document (pure function; tested directly too)."""
    info = doc.get("info", {})
    components = doc.get("components", {}).get("schemas", {})
    global_security = doc.get("security", [])
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(info.get('title', 'API'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(info.get('title', 'API'))}</h1>",
        f"<p>Version {escape(str(info.get('version', '')))}"
        f" · OpenAPI {escape(doc.get('openapi', ''))}"
        " · machine-readable: <a href='/openapi.json'>/openapi.json</a></p>",
    ]
    for path, item in sorted(doc.get("paths", {}).items()):
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            security = op.get("security", global_security)
            lock = "Bearer token required" if security else "public"
            tags = ", ".join(op.get("tags", []))
            out.append(
                f"<div class=op id='{escape(method + path)}'>"
                f"<span class='m {method}'>{method.upper()}</span> <code>{escape(path)}</code>"
                f"<span class=tag>{escape(tags)}</span> <span class=lock>· {lock}</span>"
                f"<p>{escape(op.get('summary', ''))}</p>"
            )
            if op.get("description"):
                out.append(f"<p>{escape(op['description'])}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if "schema" in body:
                out.append(
                    _schema_block(
                        "Request body (application/json)", _resolve(body["schema"], components)
                    )
                )
            for status, resp in sorted(op.get("responses", {}).items()):
                content = resp.get("content", {}).get("application/json", {})
                schema = _resolve(content.get("schema", {}), components)
                out.append(_schema_block(f"{status} {resp.get('description', '')}".strip(), schema))
            out.append("</div>")
    out.append("</body></html>")
    return "".join(out)


@bp.get("/docs")
@hide
async def docs() -> Response:
    """Human-readable API reference, generated from the OpenAPI document."""
    schema = current_app.extensions["QUART_SCHEMA"].openapi_provider.schema()
    resp = Response(render_docs(schema), content_type="text/html; charset=utf-8")
    resp.headers["Content-Security-Policy"] = DOCS_CSP
    return resp
