"""An engine server the worker owns: a child process serving HTTP on loopback, started, watched and
restarted by the worker, and gone with it.

A segfault in native code ends the child, not the Celery worker: the worker sees the connection
drop, starts a fresh server and hands the tasks in flight back to the queue. The child is
started with a parent-death signal, so a worker that is SIGKILLed takes its server with it
rather than leaving it holding the model's memory. Linux sends that signal when the *thread*
that started the child ends, so every start happens on one thread that lives as long as the
worker.
"""

import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from model_loader.contract import EngineBroken

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to the engine is noise in a worker's log

PR_SET_PDEATHSIG = 1
HEALTH_POLL_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class EngineServer:
    """One child process at a time; `command(port)` is its argv, `health_path` answers 200 once it serves."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        health_path: str,
        start_timeout_s: float,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._command = command
        self._health_path = health_path
        self._start_timeout_s = start_timeout_s
        self._fixed_port = port
        self._env = env
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-spawner")
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self.port = 0
        self.log_path = Path(tempfile.gettempdir()) / f"{name}-{os.getpid()}.log"
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def gone(self, grace_s: float = 2.0) -> bool:
        """Whether the server has died, given `grace_s` to be seen dead: a killed server's connections close
        as it exits, a moment before its exit can be reaped, so a broken stream may come first."""
        if self._process is None:
            return True
        try:
            self._process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the server and wait until it serves; EngineBroken (with its log's tail) if it cannot."""
        with self._lock:
            self._start()

    def restart_if_dead(self) -> bool:
        """Start a fresh server if this one has died (once, whichever thread asks first); True if it had."""
        with self._lock:
            if self.alive:
                return False
            log.error("%s exited with %s; starting a fresh one (log: %s)", self.name, self._exit_code(), self.log_path)
            self.restarts += 1
            self._start()
            return True

    def stop(self, timeout_s: float = 10) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def rss_bytes(self) -> int | None:
        try:
            return psutil.Process(self.pid).memory_info().rss if self.alive and self.pid else None
        except psutil.Error:
            return None

    def _start(self) -> None:
        self.port = self._fixed_port or free_port()
        argv = self._command(self.port)
        log.info("starting %s on port %d (log: %s): %s", self.name, self.port, self.log_path, " ".join(argv))
        self._process = self._spawner.submit(self._spawn, argv).result()
        self._wait_serving()

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        with open(self.log_path, "ab") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env,
                preexec_fn=_die_with_parent,
            )

    def _wait_serving(self) -> None:
        started = time.monotonic()
        deadline = started + self._start_timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise EngineBroken(f"{self.name} exited with {self._exit_code()} while starting: {self._log_tail()}")
            try:
                if httpx.get(self.url + self._health_path, timeout=2).status_code == 200:
                    log.info("%s serves on port %d after %.1f s", self.name, self.port, time.monotonic() - started)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(HEALTH_POLL_S)
        self.stop()
        raise EngineBroken(f"{self.name} did not serve within {self._start_timeout_s:.0f} s: {self._log_tail()}")

    def _exit_code(self) -> int | None:
        return self._process.poll() if self._process else None

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"
