"""Who a caller is to the queue: the name its key goes by, and the limits and weight that name has.

A key's name (API_KEYS=name:key) labels its lane and its metrics; the record keeps only the
key's SHA-256 tag (its owner), and the tag finds the name again. Without API_KEYS every caller
is one tenant, `shared`, with the defaults.
"""

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from core.settings import KeyLimits, Settings, api_key_names

SHARED = "shared"


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float
    max_queued_tasks: int
    max_running: int  # 0: no cap
    requests_per_minute: int  # 0: no cap
    max_streams: int
    max_kept_bytes: int


def owner_tag(key: str) -> str:
    """What the task record keeps of a key: enough to match it again, useless to recover it."""
    return hashlib.sha256(key.encode()).hexdigest()


def tenant(settings: Settings, owner: str | None) -> Tenant:
    """The tenant an owner tag (None on an open server) belongs to, with its own limits over the defaults."""
    name = _names(settings).get(owner, SHARED) if owner is not None else SHARED
    own = settings.key_limits.get(name, KeyLimits())
    return Tenant(
        name=name,
        weight=own.weight,
        max_queued_tasks=_either(own.max_queued_tasks, settings.max_queued_tasks),
        max_running=_either(own.max_running, settings.max_running_per_key),
        requests_per_minute=_either(own.requests_per_minute, settings.requests_per_minute),
        max_streams=_either(own.max_streams, settings.max_streams_per_key),
        max_kept_bytes=_either(own.max_kept_bytes, settings.max_kept_bytes_per_key),
    )


def _names(settings: Settings) -> dict[str, str]:
    return _names_of(settings.api_keys.get_secret_value())


@lru_cache(maxsize=4)
def _names_of(api_keys: str) -> dict[str, str]:
    """Owner tag -> name, hashed once per API_KEYS rather than on every request."""
    return {owner_tag(key): name for key, name in api_key_names(api_keys).items()}


def _either(own: int | None, default: int) -> int:
    return default if own is None else own
