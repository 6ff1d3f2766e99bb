"""Redis clients for every process, with one set of defences against dead and half-open connections.

A connection whose peer vanished without closing it (a failover, a NAT or firewall dropping the
flow, a host cut off) never errors by itself: a command on it waits forever. So every client,
the API's, the worker store's and Celery's broker connection, has a socket timeout (none of the
commands sent here block), TCP keepalive, and a health check that pings a connection left idle
before using it again.

With REDIS_SENTINELS, every client asks the Sentinels where the primary is, each time it opens a
connection, so all of them follow a failover by themselves: a connection to the old primary
fails (or answers READONLY once it is demoted, which redis-py turns into a lost connection), and
the next one goes to the replica the Sentinels promoted. REDIS_URL then gives only the password
and the database number.
"""

from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from core.settings import Settings

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 15
# Each open stream holds one connection of the API's asyncio pool for its blocking read;
# redis-py's default pool of 100 refused the 101st stream. Redis itself accepts 10,000 clients.
MAX_STREAM_CONNECTIONS = 5000
RETRY_INTERVAL_S = 0.5
# How long the API waits for REDIS_MIN_REPLICAS replicas to acknowledge a new task.
REPLICA_WAIT_MS = 1000
# The key the API writes just before that wait (see `replicated`).
REPLICATION_MARK_KEY = "tasks:replication_mark"
# What a client sends to the Sentinels themselves, beside their password (`sentinel_options`).
SENTINEL_OPTIONS: dict[str, object] = {
    "socket_timeout": SOCKET_TIMEOUT_S,
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
    "socket_keepalive": True,
}

# What a Redis restart or failover looks like to a client, and passes: a lost or silent
# connection, a replica not yet promoted (READONLY), a server still loading its data, or one
# out of memory until something frees it.
TRANSIENT_ERRORS: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
)


# The same errors met by a command inside a Lua script: Redis (6.2 at least) hands them back as
# plain ResponseErrors, their code buried in the message ("@user_script: 1: -OOM command ...").
_SCRIPT_ERROR_CODES: dict[str, type[redis.RedisError]] = {
    "-OOM ": redis.exceptions.OutOfMemoryError,
    "-READONLY ": redis.exceptions.ReadOnlyError,
    "-LOADING ": redis.exceptions.BusyLoadingError,
    "-MASTERDOWN ": redis.exceptions.MasterDownError,
}


def transient_script_error(exc: redis.ResponseError) -> redis.RedisError | None:
    """The transient error a script met, as its own type; None for any other error."""
    message = str(exc)
    for code, kind in _SCRIPT_ERROR_CODES.items():
        if code in message:
            return kind(message)
    return None


def connect(settings: Settings, retry_s: float = 0) -> redis.Redis:
    """A client for the settings' Redis (REDIS_URL, or the primary the Sentinels name); with
    `retry_s`, commands that meet a transient error retry for that long.

    The API answers 503 at once rather than wait (no retries); a worker pauses its generation
    until Redis is back (`retry_s` = WORKER_REDIS_RETRY_S), a failover included.
    """
    options: dict[str, object] = {}
    if retry_s:
        retries = max(1, round(retry_s / RETRY_INTERVAL_S))
        options = {"retry": Retry(ConstantBackoff(RETRY_INTERVAL_S), retries), "retry_on_error": list(TRANSIENT_ERRORS)}
    options |= {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if not settings.sentinel_addresses:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinels = redis.sentinel.Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_options(settings))
    return sentinels.master_for(settings.redis_sentinel_master, **options | _primary_options(settings.redis_url))


def connect_async(settings: Settings, longest_block_s: float) -> redis.asyncio.Redis:
    """The API's asyncio client, for blocking stream reads: one blocked XREAD per open stream, no
    thread each. Its socket timeout waits out the longest BLOCK it sends (redis-py's default of
    5 s would cut every stream idle longer than that), and no more; its pool has room for
    `MAX_STREAM_CONNECTIONS` open streams. With Sentinels, it follows the primary as `connect` does."""
    options: dict[str, object] = {
        "socket_timeout": longest_block_s + SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "max_connections": MAX_STREAM_CONNECTIONS,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if not settings.sentinel_addresses:
        return redis.asyncio.Redis.from_url(settings.redis_url, **options)
    sentinels = redis.asyncio.sentinel.Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_options(settings))
    return sentinels.master_for(settings.redis_sentinel_master, **options | _primary_options(settings.redis_url))


def sentinel_options(settings: Settings) -> dict[str, object]:
    """How to talk to the Sentinels: they answer anyone who reaches them where the primary is, and
    take commands that move it, so they ask for a password of their own."""
    password = settings.redis_sentinel_password.get_secret_value()
    return SENTINEL_OPTIONS | ({"password": password} if password else {})


def _primary_options(url: str) -> dict[str, object]:
    """What REDIS_URL says about the primary beside its address (user, password, database, TLS, and
    options in its query string, which win as they do in `from_url`): the Sentinels give the address."""
    options = redis.connection.parse_url(url)
    if options.pop("connection_class", None) is redis.connection.UnixDomainSocketConnection:
        raise ValueError("REDIS_SENTINELS needs a redis:// or rediss:// REDIS_URL, not a unix socket")
    options.pop("host", None)
    options.pop("port", None)
    if url.startswith("rediss://"):
        options["ssl"] = True
    return options


def replicated(client: redis.Redis, replicas: int, timeout_ms: int = REPLICA_WAIT_MS) -> bool:
    """Whether at least `replicas` replicas acknowledged, within `timeout_ms`, every write the
    primary took before this call, whichever connection made it.

    WAIT covers the writes of the connection it is sent on, up to that connection's last write: so
    one more small write goes first, on the same connection (one pipeline, not a transaction, since
    WAIT does not block inside MULTI). Replication is one ordered stream, so a replica that
    acknowledged the mark holds everything the primary took before it too: here, Celery's message,
    which kombu published over a connection of its own, where no WAIT of ours could look. (Only a
    primary that changed in the milliseconds between that publish and the mark escapes this: then
    the mark went to the new primary, which the publish may not have reached.)
    """
    pipe = client.pipeline(transaction=False)
    pipe.set(REPLICATION_MARK_KEY, 1)
    pipe.wait(replicas, timeout_ms)
    _, acknowledged = pipe.execute()
    return int(acknowledged) >= replicas


def broker_url(settings: Settings) -> str:
    """Celery's broker: REDIS_URL, or with Sentinels kombu's `sentinel://` URL, one per Sentinel
    (`;`-separated), each with REDIS_URL's password and database, which kombu uses for the primary."""
    if not settings.sentinel_addresses:
        return settings.redis_url
    parts = urlsplit(settings.redis_url)
    credentials = parts.netloc.rpartition("@")[0]
    auth = f"{credentials}@" if credentials else ""
    database = parts.path if parts.path not in ("", "/") else "/0"
    return ";".join(f"sentinel://{auth}{host}:{port}{database}" for host, port in settings.sentinel_addresses)


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """The same defences for kombu's connections (its BRPOP waits 1 s, well inside the socket
    timeout), and with Sentinels, the primary's name and what to send the Sentinels themselves."""
    options: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if settings.sentinel_addresses:
        options["master_name"] = settings.redis_sentinel_master
        options["sentinel_kwargs"] = sentinel_options(settings)
    return options


def text(value: bytes | str) -> str:
    """A value read from Redis (bytes: the clients here do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else value
