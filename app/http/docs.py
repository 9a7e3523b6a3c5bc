"""`/docs` and `/redoc` served with their JS and CSS from the app itself: they work offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (a white page with no internet).
The files come from the pinned `fastapi-offline` package (Swagger UI 5 and ReDoc 2, one
MIT-licensed wheel that depends only on FastAPI); only its `static/` folder is used, served
under `STATIC_URL`. Build the app with `docs_url=None, redoc_url=None`, then call
`install_docs(app)`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
REDOC_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; font-src 'self' data:"
)
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# One mount: every asset request is labelled with this path in /metrics (a bounded label).
STATIC_URL = "/static/docs"
ASSETS = Path(str(files("fastapi_offline") / "static"))


class _DocsAssets(StaticFiles):
    """The asset files, each request labelled with the mount's path (`STATIC_URL`).

    FastAPI's router puts `scope["route"]` only for its own routes, and the request metrics
    label by it: set here, the assets share one `route` label instead of `unmatched`.
    """

    mount: Mount | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.mount is not None:
            scope["route"] = self.mount
        await super().__call__(scope, receive, send)


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at `/docs` and ReDoc at `/redoc`, assets from `STATIC_URL`."""
    openapi_url = app.openapi_url or "/openapi.json"
    assets = _DocsAssets(directory=ASSETS)
    assets.mount = Mount(STATIC_URL, app=assets, name="docs-static")
    app.router.routes.append(assets.mount)

    def prefix(request: Request) -> str:
        root: str = request.scope.get("root_path", "")
        return root

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            # No validator badge: it would send the schema's URL to validator.swagger.io.
            swagger_ui_parameters={"persistAuthorization": False, "validatorUrl": None},
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
        # ReDoc's footer always asks cdn.redoc.ly for a logo: the browser is told not to
        # load anything from elsewhere (ReDoc hides the image when it fails).
        page.headers["Content-Security-Policy"] = REDOC_CSP
        return page
