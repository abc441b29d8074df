"""The read-only dashboard: the telemetry review of the last N hours, served by the server.

Routes (mount with ``app.include_router(dashboard_router())``):

* ``GET /dashboard?hours=24`` the review page (the same HTML as ``edgefleet report``);
* ``GET /dashboard/data.json?hours=24`` the same numbers as JSON.

Both need an operator token with at least the ``viewer`` role, checked exactly
as the admin API checks it (:func:`fleet_server.api.deps.authenticate_operator`).
A browser cannot send an ``Authorization`` header from the address bar, so the
token is taken, in this order, from:

1. ``Authorization: Bearer <token>`` (scripts, curl);
2. the ``token`` query parameter (page only): a valid one is moved into an
   HttpOnly, SameSite=Strict cookie scoped to ``/dashboard`` and the browser is
   redirected to the same URL without it, so the token does not linger in the
   address bar or the history;
3. the ``edgefleet_token`` cookie, set as in 2. or by ``POST /dashboard/login`` (a form
   with a ``token`` field: the operator console's link to the review; same-origin
   posts only, judged by ``Origin`` and ``Sec-Fetch-Site``).

Nothing here writes to the database. The page carries no script and loads
nothing from elsewhere; it is rendered per request (``Cache-Control: no-store``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Annotated, Protocol
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from fleet_server.api.deps import Principal, authenticate_operator, get_ctx
from fleet_server.errors import PermissionDeniedError, ServerError, error_body
from fleet_server.report.dataset import ReviewDataset
from fleet_server.report.load import load_dataset
from fleet_server.report.render import render_html
from fleet_server.security import bearer_token

COOKIE = "edgefleet_token"
PREFIX = "/dashboard"
#: the choices the navigation bar offers
HOUR_CHOICES = (1.0, 6.0, 24.0, 24.0 * 7)
#: the longest period the dashboard reviews (90 days)
MAX_HOURS = 24.0 * 90

Hours = Annotated[float, Query(gt=0, le=MAX_HOURS, description="Review the last this many hours.")]
Token = Annotated[
    str | None, Query(description="Operator token; moved into a cookie, then dropped from the URL.")
]


class DatasetLoader(Protocol):
    """Fills a review dataset from the database (see :func:`.load.load_dataset`)."""

    def __call__(self, session: Session, since: datetime, until: datetime) -> ReviewDataset: ...


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _hours_label(h: float) -> str:
    if h >= 48 and h % 24 == 0:
        return f"{h / 24:g} d"
    return f"{h:g} h"


def _nav(hours: float, base: str) -> str:
    links = []
    for h in HOUR_CHOICES:
        label = _hours_label(h)
        if h == hours:
            links.append(f'<span class="current">last {label}</span>')
        else:
            links.append(
                f'<a href="{escape(base)}?{urlencode({"hours": f"{h:g}"})}">last {label}</a>'
            )
    data = f"{base}/data.json?{urlencode({'hours': f'{hours:g}'})}"
    return (
        f'<nav class="dash"><strong>edgefleet dashboard</strong> {" ".join(links)} '
        f'<a href="{escape(data)}">data.json</a>'
        f'<a href="{escape(base.removesuffix(PREFIX))}/console">operator console</a>'
        "<span>read-only</span></nav>"
    )


def _error_page(exc: ServerError, base: str) -> HTMLResponse:
    body = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,"><title>edgefleet dashboard</title></head>'
        '<body style="font-family: system-ui, sans-serif; margin: 40px">'
        f"<h1>edgefleet dashboard</h1><p>{escape(exc.message)}</p>"
        "<p>Sign in to the operator console (<code>/console</code>) and follow its "
        "<em>Telemetry review</em> link, or open <code>/dashboard?token=&lt;operator "
        "token&gt;</code> once with a token of role viewer or higher; the browser keeps it "
        "in a cookie for this page.</p>"
        "</body></html>"
    )
    resp = HTMLResponse(body, status_code=exc.status_code, headers={"Cache-Control": "no-store"})
    if exc.status_code == 401:
        resp.delete_cookie(COOKIE, path=base)
    return resp


def _base(request: Request) -> str:
    """The dashboard's path as the browser sees it (behind a proxy prefix too)."""
    return f"{request.scope.get('root_path', '')}{PREFIX}"


def _same_origin(request: Request) -> bool:
    """Whether a form post comes from a page of this server (not from another site)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _set_cookie(request: Request, resp: Response, token: str) -> None:
    resp.set_cookie(
        COOKIE,
        token,
        path=_base(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _authenticate(request: Request, token: str | None) -> Principal:
    """Any operator token may view (every role includes viewer); raises ServerError."""
    return authenticate_operator(get_ctx(request), token)


def dashboard_router(
    *,
    default_hours: float = 24.0,
    loader: DatasetLoader = load_dataset,
    clock: Callable[[], datetime] = _utcnow,
) -> APIRouter:
    """The dashboard routes; the app must hold a ``ServerContext`` in ``app.state.ctx``."""
    router = APIRouter(prefix=PREFIX, tags=["dashboard"])

    def dataset_for(request: Request, hours: float) -> ReviewDataset:
        until = clock()
        since = until - timedelta(hours=hours)
        with get_ctx(request).sessions() as session:
            return loader(session, since, until)

    @router.get("", response_class=HTMLResponse, summary="Telemetry review page (read-only)")
    def dashboard_page(
        request: Request, hours: Hours = default_hours, token: Token = None
    ) -> Response:
        """The review of the last ``hours`` as an HTML page (viewer role or higher)."""
        header = bearer_token(request.headers.get("authorization"))
        presented = header or token or request.cookies.get(COOKIE)
        try:
            _authenticate(request, presented)
        except ServerError as e:
            return _error_page(e, _base(request))
        if token is not None and presented == token:
            target = f"{_base(request)}?{urlencode({'hours': f'{hours:g}'})}"
            resp = RedirectResponse(target, status_code=303)
            _set_cookie(request, resp, token)
            return resp
        ds = dataset_for(request, hours)
        html = render_html(
            ds,
            title=f"edgefleet telemetry review, last {_hours_label(hours)}",
            nav=_nav(hours, _base(request)),
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @router.post("/login", summary="Sign in to the review page with a token from a form")
    async def dashboard_login(request: Request) -> Response:
        """Moves a form's ``token`` into the review's cookie and redirects to the page."""
        if not _same_origin(request):
            return _error_page(
                PermissionDeniedError("sign-in to the dashboard is accepted from its own pages"),
                _base(request),
            )
        form = await request.form()
        token = form.get("token")
        try:
            _authenticate(request, token if isinstance(token, str) and token else None)
        except ServerError as e:
            return _error_page(e, _base(request))
        assert isinstance(token, str)
        target = f"{_base(request)}?{urlencode({'hours': f'{default_hours:g}'})}"
        resp = RedirectResponse(target, status_code=303)
        _set_cookie(request, resp, token)
        return resp

    @router.get("/data.json", summary="Telemetry review numbers (read-only)")
    def dashboard_data(request: Request, hours: Hours = default_hours) -> JSONResponse:
        """The numbers behind the page, in the ``edgefleet-review/1`` JSON format."""
        header = bearer_token(request.headers.get("authorization"))
        try:
            _authenticate(request, header or request.cookies.get(COOKIE))
        except ServerError as e:
            return JSONResponse(error_body(e.code, e.message, e.details), status_code=e.status_code)
        ds = dataset_for(request, hours)
        return JSONResponse(ds.to_json(), headers={"Cache-Control": "no-store"})

    return router
