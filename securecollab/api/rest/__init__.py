"""The REST door: `create_app(ctx)` builds the quart-trio ASGI app served by hypercorn.

Where to add things:
- REST routes: a module in `securecollab/api/rest/` with a `Blueprint`; add it to
  `BLUEPRINTS` below. Every `/api/...` route needs a Bearer token unless decorated
  `@public` (middleware.py); use `current_principal()` and `app_ctx()` in handlers.
- WebSocket routes (`/ws`): register them in `create_app` through `APP_HOOKS` or a
  blueprint with `@bp.websocket(...)`.
- Errors: raise `securecollab.services.errors.*`; `errors.py` maps them to HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from quart_schema import QuartSchema
from quart_trio import QuartTrio

import securecollab
from securecollab.api.rest import auth, channels, chat, docs, health, keys, presence, users
from securecollab.api.rest.errors import register_error_handlers
from securecollab.api.rest.middleware import CTX_KEY, JsonRequest, install_middleware
from securecollab.api.rest.openapi import ApiOpenAPIProvider
from securecollab.context import AppContext

AppHook = Callable[[QuartTrio, AppContext], None]

#: Blueprints every server registers, in order.
BLUEPRINTS = [health.bp, auth.bp, users.bp, presence.bp, chat.bp, channels.bp, keys.bp, docs.bp]

#: Functions called with (app, ctx) after the blueprints: other doors (e.g. the
#: broker's `/ws` route) add themselves here at import time.
APP_HOOKS: list[AppHook] = []


def create_app(ctx: AppContext, *, extra_hooks: Sequence[AppHook] = ()) -> QuartTrio:
    """Build the app for `ctx`; `extra_hooks` lets tests add routes (e.g. one that raises)."""
    app = QuartTrio("securecollab", static_folder=None)
    app.request_class = JsonRequest
    app.config.update(
        MAX_CONTENT_LENGTH=ctx.settings.http.max_body_bytes,
        PROPAGATE_EXCEPTIONS=False,
        JSON_SORT_KEYS=False,
    )
    app.extensions[CTX_KEY] = ctx
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        swagger_ui_path=None,  # these load JS from public CDNs; docs.py serves /docs instead
        redoc_ui_path=None,
        scalar_ui_path=None,
        info={"title": "SecureCollab API", "version": securecollab.__version__},
        conversion_preference="pydantic",
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        security=[{"bearer": []}],
        openapi_provider_class=ApiOpenAPIProvider,
    )
    register_error_handlers(app)
    install_middleware(app, ctx)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    for hook in [*APP_HOOKS, *extra_hooks]:
        hook(app, ctx)
    return app
