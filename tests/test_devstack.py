"""`make run`'s supervisor, as a user runs it: a worker that exits is started again, the stack stays up."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from devstack.processes import ROOT, free_port, stop, wait_until

STARTUP_S = 300


def celery_children(devstack: subprocess.Popen) -> list[psutil.Process]:
    """The stack's live worker processes (one that was just killed is a zombie until reaped)."""
    workers = []
    for child in psutil.Process(devstack.pid).children():
        try:
            if "celery" in " ".join(child.cmdline()):
                workers.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return workers


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_make_run_restarts_a_worker_that_exits(stack_env: dict[str, str], tmp_path: Path) -> None:
    """The supervisor used to stop the whole stack when its worker exited."""
    port = free_port()
    env = stack_env | {
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "API_PORT": str(port),
        "QUANTIZATION": "none",
        "PYTHONPATH": str(ROOT),
    }
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "devstack.log", "wb")
    devstack = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: healthy(url), STARTUP_S, "make run's stack", interval_s=0.5)
        (first,) = celery_children(devstack)
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: devstack.poll() is not None or len(celery_children(devstack)) == 1
                   and celery_children(devstack)[0].pid != first.pid, 60, "a new worker process", interval_s=0.5)
        assert devstack.poll() is None, "the stack stopped"
        wait_until(lambda: healthy(url), STARTUP_S, "the new worker", interval_s=0.5)
        task = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=30)
        assert task.status_code == 202
        children = psutil.Process(devstack.pid).children()
    finally:
        stop(devstack, timeout_s=120)  # SIGTERM, as a process manager stops it
    text = (tmp_path / "devstack.log").read_text(errors="replace")
    assert "restarting it" in text, text[-2000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert devstack.returncode == 0 and not alive, f"left running: {alive}"
