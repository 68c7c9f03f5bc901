"""The web dashboard: static files under /ui (api/dashboard; no build step) and / leading there.

The pages hold no data: they call the same API with the key the user signs in with, which the
browser keeps in the tab's session storage and sends only in the Authorization header.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

router = APIRouter(include_in_schema=False)

FILES = Path(__file__).resolve().parent.parent / "dashboard"
# Only the dashboard's own files run: no inline or foreign scripts, so text that a model or a
# user wrote can never become code even if it reached the page as HTML. Styles may be inline
# because the charting library sizes its canvas through style attributes.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so a new release's files are picked up at once
}


class DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def dashboard_files() -> DashboardFiles:
    return DashboardFiles(directory=FILES, html=True)


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/")
