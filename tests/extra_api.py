"""A second API process with settings of its own, beside the session's: same Redis, same worker.

The session API's settings are fixed for the whole run; a test that needs other limits, API
keys, or a Redis that is down starts one of these instead of changing the shared one.
"""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from devstack.processes import api_command, free_port, spawn, stop, wait_until

STARTUP_TIMEOUT_S = 120


@contextmanager
def extra_api(
    stack_env: dict[str, str], logs: Path, overrides: dict[str, str], access_log: bool = False
) -> Iterator[str]:
    """The API under uvicorn with `overrides` on top of the stack's environment; output in `logs/api.log`.

    `access_log` turns uvicorn's access log back on, as the container runs it.
    """
    env = stack_env | {"API_PORT": str(free_port())} | overrides
    command = api_command("127.0.0.1", env["API_PORT"]) + (["--access-log"] if access_log else [])
    process = spawn("api", command, env, logs)
    url = f"http://127.0.0.1:{env['API_PORT']}"
    try:
        wait_until(lambda: _answers(url, process, logs), STARTUP_TIMEOUT_S, f"the extra API at {url}", interval_s=0.2)
        yield url
    finally:
        stop(process)


def _answers(url: str, process: subprocess.Popen, logs: Path) -> bool:
    """Any HTTP answer from /health counts: with Redis down it answers 503, and that is the point."""
    if process.poll() is not None:
        raise RuntimeError(f"the extra API exited: {(logs / 'api.log').read_text()[-3000:]}")
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError:
        return False
    return True
