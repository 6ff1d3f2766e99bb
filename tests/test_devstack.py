"""`make run`'s supervisor, as a user runs it: a worker or an API that exits is started again, the
stack stays up, and a background response outlives its API."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil

from core.protocol import TaskStatus
from devstack.processes import ROOT, free_port, stop, wait_until
from tests.helpers import poll_until, poll_until_finished, submit

STARTUP_S = 300
MODEL = "SmolLM2-135M-Instruct"


def children(devstack: subprocess.Popen, program: str) -> list[psutil.Process]:
    """The stack's live processes running `program` (one just killed is a zombie until reaped)."""
    found = []
    for child in psutil.Process(devstack.pid).children():
        try:
            if program in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def kill_and_wait_for_another(devstack: subprocess.Popen, program: str) -> None:
    (first,) = children(devstack, program)
    os.kill(first.pid, signal.SIGKILL)

    def replaced() -> bool:
        now = children(devstack, program)
        return devstack.poll() is not None or (len(now) == 1 and now[0].pid != first.pid)

    wait_until(replaced, 60, f"a new {program} process", interval_s=0.5)
    assert devstack.poll() is None, "the stack stopped"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_make_run_restarts_a_worker_or_an_api_that_exits(stack_env: dict[str, str], tmp_path: Path) -> None:
    """The supervisor used to stop the whole stack when its worker or its API exited. Also the
    standard-APIs issue's "done when": the SDK's background response survives `kill -9` of the API
    in the middle and resumes exactly after the last event seen."""
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
    processes: list[psutil.Process] = []
    try:
        wait_until(lambda: healthy(url), STARTUP_S, "make run's stack", interval_s=0.5)
        kill_and_wait_for_another(devstack, "celery")
        wait_until(lambda: healthy(url), STARTUP_S, "the new worker", interval_s=0.5)

        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = sdk.responses.create(model=MODEL, input="Write a poem about the sea.", temperature=0,
                                      max_output_tokens=32, background=True, stream=True)
        seen = [event for _, event in zip(range(7), stream)]
        kill_and_wait_for_another(devstack, "uvicorn")
        stream.close()
        wait_until(lambda: healthy(url), STARTUP_S, "the new API", interval_s=0.5)
        rest = list(sdk.responses.retrieve(seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number))
        final = sdk.responses.retrieve(seen[0].response.id)
        assert [e.sequence_number for e in seen + rest] == sorted({e.sequence_number for e in seen + rest})
        text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
        assert final.status == "incomplete" and text == final.output_text
        processes = psutil.Process(devstack.pid).children()
    finally:
        stop(devstack, timeout_s=120)  # SIGTERM, as a process manager stops it
    text = (tmp_path / "devstack.log").read_text(errors="replace")
    assert "the worker exited" in text and "the API exited" in text, text[-2000:]
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert devstack.returncode == 0 and not alive, f"left running: {alive}"


def start_devstack(env: dict[str, str], folder: Path) -> subprocess.Popen:
    """`make run`'s supervisor as a terminal runs it: the leader of its own process group, the
    foreground group that a terminal's Ctrl-C goes to as a whole."""
    log = open(folder / "devstack.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "devstack"], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_ctrl_c_mid_answer_stops_the_stack_at_once_and_the_next_start_goes_on(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """It took 40 s to stop (the terminal's SIGINT reached Redis, which died first while the worker
    finished its task), and the task then sat `running` until the visibility timeout."""
    port = free_port()
    env = stack_env | {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "API_PORT": str(port),
                       "QUANTIZATION": "none", "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 96}
    devstack = start_devstack(env, tmp_path)
    try:
        wait_until(lambda: healthy(url), STARTUP_S, "make run's stack", interval_s=0.5)
        client = httpx.Client(base_url=url, timeout=30)
        reference, _ = poll_until_finished(client, submit(client, **body))
        task_id = submit(client, **body)
        before = poll_until(client, task_id, lambda v: len(v.chunks) >= 3)
        processes = psutil.Process(devstack.pid).children()
        interrupted = time.monotonic()
        os.killpg(devstack.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        devstack.wait(timeout=60)
        stopped_s = time.monotonic() - interrupted
        _, alive = psutil.wait_procs(processes, timeout=1)
        assert stopped_s < 10 and not alive, (stopped_s, alive)

        devstack = start_devstack(env, tmp_path)
        wait_until(lambda: healthy(url), STARTUP_S, "make run's stack, started again", interval_s=0.5)
        final, seen = poll_until_finished(client, task_id, after=before.cursor)
    finally:
        stop(devstack, timeout_s=60)
    assert final.status == TaskStatus.succeeded and final.attempt == 2, final
    assert final.text == reference.text, "the answer did not go on where it stopped"
    assert "".join(c.text for v in [before, *seen] for c in v.chunks) == final.text, "a chunk repeated or lost"
