"""API keys and task ownership, as dependencies, so that every route checks them the same way.

With `API_KEYS` empty the API is open and tasks belong to nobody. With keys set, every route but
`/health` needs `Authorization: Bearer <key>`, and a task is visible only to the key that
created it: the record keeps a SHA-256 tag of that key (never the key), and any other caller
gets the same 404 as for an id that does not exist.
"""

import hmac
import uuid
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import ServicesDep
from app.errors import task_not_found
from core.tenants import SHARED, owner_tag, tenant

BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(auto_error=False, description="An API key, when the server sets API_KEYS.")


def authenticate(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str | None:
    """The caller's owner tag; None when the server has no keys. 401 for a missing or unknown key."""
    keys = services.settings.accepted_api_keys
    if not keys:
        return None
    if credentials is None:
        raise _unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    tag = owner_tag(credentials.credentials)
    if not _known(tag, keys):
        raise _unauthorized("the API key is not valid")
    return tag


def may_read_details(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> bool:
    """For public routes (`/health`): whether the caller could use the others, without a 401 if not."""
    keys = services.settings.accepted_api_keys
    return not keys or (credentials is not None and _known(owner_tag(credentials.credentials), keys))


MayReadDetails = Annotated[bool, Depends(may_read_details)]


def key_name(scope: Scope) -> str | None:
    """The name of the server's key that a request carries (`shared` on an open server); None for
    none or an unknown one. Only named callers' refusals are counted, so that a stranger cannot
    move the fleet's figures."""
    settings = scope["app"].state.services.settings
    if not settings.accepted_api_keys:
        return SHARED
    scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key or not _known(tag := owner_tag(key.strip()), settings.accepted_api_keys):
        return None
    return tenant(settings, tag).name


class KeyBeforeBody:
    """ASGI middleware: on a keyed server, a request without a valid key is refused (401) at the
    first read of its body, before anything parses it; so a keyless caller gets 401 whatever it
    sends, never a 422 about its JSON. GET, HEAD and OPTIONS pass untouched: they carry no body,
    the public ones (the page, `/health`) read `receive` only to hear of a disconnect, and the
    others check the key as a dependency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODILESS_METHODS:
            await self.app(scope, receive, send)
            return
        allowed = key_name(scope) is not None  # here, while scope["app"] is still this app and not a mounted one

        async def gated() -> Message:
            if not allowed:
                raise _unauthorized("this server needs a valid API key: send 'Authorization: Bearer <key>'")
            return await receive()

        await self.app(scope, gated, send)


def _known(tag: str, keys: list[str]) -> bool:
    """Compares fixed-length digests in constant time, against every key, so timing tells nothing."""
    matches = [hmac.compare_digest(tag, owner_tag(key)) for key in keys]
    return any(matches)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


CallerTag = Annotated[str | None, Depends(authenticate)]


def visible_task_id(task_id: str, caller: CallerTag, services: ServicesDep) -> str:
    """The path's task id, once the caller may see that task; with no keys every task is visible.

    Ids are the UUIDs the API hands out, checked before Redis is asked: any other string (such as
    `<id>:chunks`, the name of a task's stream) is a 404 and never reaches a key of the store.
    """
    if not _is_task_id(task_id):
        raise HTTPException(status_code=404, detail=f"no task with id {task_id[:80]!r}: task ids are UUIDs")
    if caller is not None and services.store.owner(task_id) != caller:
        raise task_not_found(task_id)
    return task_id


def _is_task_id(text: str) -> bool:
    """The canonical lowercase form only, so that one task has one id."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


VisibleTaskId = Annotated[str, Depends(visible_task_id)]
