"""The operator console: a small web app served by the server, acting through the admin API.

Routes (mount with ``app.include_router(console_router())``):

* ``GET /console`` the app's one page (an empty shell: it holds no data);
* ``GET /console/static/{name}`` its script and style sheet (``console_static/``).

Everything the console shows or does goes through the admin API (``/api/v1``) with the
operator's own token in an ``Authorization: Bearer`` header: the same routes, the same
roles and the same audit as the CLI. A viewer sees every page; the API refuses a viewer's
actions (403 ``permission_denied``) and the page shows that refusal.

Invariants:

* the token lives in the tab's ``sessionStorage`` (gone when the tab closes) and is sent
  only as a header, never in a cookie or a URL: no ambient credential, so no request
  can be forged from another site (no CSRF surface) and nothing here needs a CSRF token;
* the page runs no inline script and loads nothing from elsewhere; the
  Content-Security-Policy below allows scripts, styles and requests from this origin
  only, so injected markup cannot run code that would read the token; the script writes
  server data with ``textContent``, never as HTML;
* nothing is fetched from the network at build or run time: the files ship in the package.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from fleet_server.errors import NotFoundError

PREFIX = "/console"

#: the files the console serves, by name, with their media types
STATIC_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}

#: headers on every console response
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a form post carries `Origin: null`
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _read(name: str) -> str:
    return (resources.files("fleet_server.api") / "console_static" / name).read_text("utf-8")


def console_router() -> APIRouter:
    """The console routes (no authentication here: the page is a shell, the API checks)."""
    router = APIRouter(prefix=PREFIX, tags=["console"])
    page = _read("index.html")
    files = {name: _read(name) for name in STATIC_FILES}

    @router.get("", response_class=HTMLResponse, summary="Operator console")
    def console_page() -> HTMLResponse:
        """The console's page; it signs in with an operator token and calls ``/api/v1``."""
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    @router.get("/static/{name}", summary="Console script and style sheet")
    def console_static(name: str) -> Response:
        if name not in files:
            raise NotFoundError(f"the console has no file {name}")
        return Response(files[name], media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    return router
