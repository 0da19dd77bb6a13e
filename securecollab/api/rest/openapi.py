"""The OpenAPI document: quart-schema's, plus the error answers every route can give.

Routes document their own outcomes (`@document_response`); the answers that come from
the shared machinery rather than from the route are added here, once, so the document
matches what a client can actually receive (schema-driven clients and fuzzers such as
schemathesis check this):

- every `/api` route: 400 (a query/path parameter given twice or with control
  characters), 429 (rate limits), 500 (unexpected; carries `requestId`), 503 (store
  unreachable); 401 unless the route is public;
- routes with a JSON body: also 400 (malformed JSON), 413 (body too large),
  415 (not JSON), 422 (wrong shape);
- routes with query parameters: also 422 (a value out of range);
- `/metrics`: its 200 is Prometheus text, not JSON;
- query parameters without a default are marked `required`.
"""

from __future__ import annotations

from typing import Any

from quart_schema.openapi import OpenAPIProvider
from werkzeug.routing import Rule

ERROR_SCHEMA_REF = {"$ref": "#/components/schemas/ErrorBody"}

_COMMON: dict[int, str] = {
    400: "malformed request (JSON body or parameters); `error` says which",
    429: "rate limited; see Retry-After",
    500: "unexpected server error; quote `requestId` to the operator",
    503: "the database is unreachable or the feature is not available",
}
_AUTH: dict[int, str] = {401: "missing, malformed, expired or revoked Bearer token"}
_BODY: dict[int, str] = {
    413: "request body larger than [http] max_body_bytes",
    415: "the body is not sent as Content-Type: application/json",
    422: "the JSON body does not have the documented shape",
}
_QUERY: dict[int, str] = {422: "a query parameter is out of range or malformed"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR_SCHEMA_REF}},
    }


class ApiOpenAPIProvider(OpenAPIProvider):
    """quart-schema's provider with the shared error responses added to each operation."""

    def schema(self) -> dict[str, Any]:
        doc = super().schema()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorBody" not in schemas:
            from securecollab.api.rest.schemas import ErrorBody

            schemas["ErrorBody"] = ErrorBody.model_json_schema()
        return doc

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        for path, item in paths.items():
            for method, operation in item.items():
                if isinstance(operation, dict):
                    self._add_errors(path, method, operation)
        return paths, components

    @staticmethod
    def _add_errors(path: str, method: str, operation: dict[str, Any]) -> None:
        responses: dict[int | str, Any] = operation.setdefault("responses", {})
        if path == "/metrics" and not responses:
            responses[200] = {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        if not path.startswith("/api/"):
            return
        for param in operation.get("parameters", []):
            # quart-schema leaves `required` out; a model field without a default is required
            if param.get("in") == "query" and "default" not in param.get("schema", {}):
                param["required"] = True
        wanted = dict(_COMMON)
        if operation.get("security") != []:  # [] marks a public route (@public)
            wanted.update(_AUTH)
        if "requestBody" in operation:
            wanted.update(_BODY)
        if any(p.get("in") == "query" for p in operation.get("parameters", [])):
            wanted.update(_QUERY)
        documented = {int(k) for k in responses}  # quart-schema keys statuses by int
        for status, description in wanted.items():
            if status not in documented:
                responses[status] = _error(description)
