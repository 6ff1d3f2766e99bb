"""Redis clients for every process, with one set of defences against dead and half-open connections.

A connection whose peer vanished without closing it (a failover, a NAT or firewall dropping the
flow, a host cut off) never errors by itself: a command on it waits forever. So every client,
the API's, the worker store's and Celery's broker connection, has a socket timeout (none of the
commands sent here block), TCP keepalive, and a health check that pings a connection left idle
before using it again.
"""

import redis
import redis.asyncio
from redis.backoff import ConstantBackoff
from redis.retry import Retry

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 15
# Each open stream holds one connection of the API's asyncio pool for its blocking read;
# redis-py's default pool of 100 refused the 101st stream. Redis itself accepts 10,000 clients.
MAX_STREAM_CONNECTIONS = 5000
RETRY_INTERVAL_S = 0.5

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


def connect(url: str, retry_s: float = 0) -> redis.Redis:
    """A client for `url`; with `retry_s`, commands that meet a transient error retry for that long.

    The API answers 503 at once rather than wait (no retries); a worker pauses its generation
    until Redis is back (`retry_s` = WORKER_REDIS_RETRY_S).
    """
    options: dict[str, object] = {}
    if retry_s:
        retries = max(1, round(retry_s / RETRY_INTERVAL_S))
        options = {"retry": Retry(ConstantBackoff(RETRY_INTERVAL_S), retries), "retry_on_error": list(TRANSIENT_ERRORS)}
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        **options,
    )


def connect_async(url: str, longest_block_s: float) -> redis.asyncio.Redis:
    """The API's asyncio client, for blocking stream reads: one blocked XREAD per open stream, no
    thread each. Its socket timeout waits out the longest BLOCK it sends (redis-py's default of
    5 s would cut every stream idle longer than that), and no more; its pool has room for
    `MAX_STREAM_CONNECTIONS` open streams."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=longest_block_s + SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        max_connections=MAX_STREAM_CONNECTIONS,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def broker_transport_options() -> dict[str, object]:
    """The same defences for kombu's connections (its BRPOP waits 1 s, well inside the socket timeout)."""
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
