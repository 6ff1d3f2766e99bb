"""API keys and task ownership, as dependencies, so that every route checks them the same way.

With `API_KEYS` empty the API is open and tasks belong to nobody. With keys set, every route but
`/health` needs `Authorization: Bearer <key>`, and a task is visible only to the key that
created it: the record keeps a SHA-256 tag of that key (never the key), and any other caller
gets the same 404 as for an id that does not exist.
"""

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.deps import ServicesDep
from app.errors import task_not_found

TASK_ID_MAX_LENGTH = 64

bearer = HTTPBearer(auto_error=False, description="An API key, when the server sets API_KEYS.")


def owner_tag(key: str) -> str:
    """What the task record keeps of a key: enough to match it again, useless to recover it."""
    return hashlib.sha256(key.encode()).hexdigest()


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


def _known(tag: str, keys: list[str]) -> bool:
    """Compares fixed-length digests in constant time, against every key, so timing tells nothing."""
    matches = [hmac.compare_digest(tag, owner_tag(key)) for key in keys]
    return any(matches)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


CallerTag = Annotated[str | None, Depends(authenticate)]


def visible_task_id(
    task_id: Annotated[str, Path(max_length=TASK_ID_MAX_LENGTH)], caller: CallerTag, services: ServicesDep
) -> str:
    """The path's task id, once the caller may see that task; with no keys every task is visible."""
    if caller is not None and services.store.owner(task_id) != caller:
        raise task_not_found(task_id)
    return task_id


VisibleTaskId = Annotated[str, Depends(visible_task_id)]
