"""GET /: the web chat page, and its script and style under /static/.

Served without an API key, like /health: the page holds no data, and it asks for a key itself
(and sends it on every API call) when the server needs one. The files are plain HTML, CSS and
JavaScript in app/static, with no build step and nothing fetched from elsewhere at run time.
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The page runs only its own files and talks only to this API: even a bug that put model output
# into the HTML could not run a script or an inline handler.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The files the page loads, by name: nothing else in the folder (or beyond it) is served.
STATIC_FILES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
def chat_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404, detail=f"no static file {name[:80]!r}")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=headers)
