"""The demo page: a small web app (plain HTML, CSS and ES modules in `static/`, no build step,
nothing from a CDN) served by the Ingress itself, over the same v1 routes any client uses.

    GET /            -> 307 to /demo/
    GET /demo        -> 307 to /demo/ (the page's relative links need the slash)
    GET /demo/       -> static/index.html
    GET /demo/static/...  the page's modules, style sheet and bundled ShapesRef samples

The page and its assets are public: they serve no data, and the API calls the page makes carry
the API key the user types in, if the server has one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "/demo/"


def _page_url(request: Request) -> str:
    # behind a Serve route prefix the app's root_path is that prefix (ray/serve/_private/proxy.py)
    return request.scope.get("root_path", "").rstrip("/") + PAGE


def add_demo_page(app: FastAPI) -> None:
    """Register the page's routes on `app` (before serve.ingress wraps it)."""

    @app.get("/", include_in_schema=False)
    @app.get("/demo", include_in_schema=False)
    async def to_demo_page(request: Request) -> RedirectResponse:
        return RedirectResponse(_page_url(request), status_code=307)

    @app.get(PAGE, include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount(PAGE + "static", StaticFiles(directory=STATIC), name="demo-static")
