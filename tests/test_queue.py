"""A queued task's place in line, in its view, its event stream and run_client.py, on the session's stack."""

import subprocess
import sys
import httpx
from httpx_sse import connect_sse

from core.protocol import TaskStatus, TaskView
from devstack.processes import ROOT
from run_client import in_line
from tests.helpers import poll_until, poll_until_finished, submit

LONG = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0, "max_new_tokens": 1000}
SHORT = {"prompt": "Say hi.", "temperature": 0, "max_new_tokens": 4}
# A few seconds each on llama.cpp (about 80 tok/s here), long enough for the line to be seen moving.
MEDIUM = {"prompt": "Write a long story about a dragon who wanted to be a baker.", "temperature": 0, "max_new_tokens": 256}


def view(client: httpx.Client, task_id: str) -> TaskView:
    return TaskView.model_validate(client.get(f"/task/{task_id}").json())


def running_long_task(client: httpx.Client) -> str:
    task_id = submit(client, **LONG)
    poll_until(client, task_id, lambda v: bool(v.chunks))
    return task_id


def test_queued_tasks_know_their_place_and_see_it_move(client: httpx.Client) -> None:
    poll_until_finished(client, submit(client, **SHORT))  # so that there is a recent generation time
    blocking = running_long_task(client)
    waiting = [submit(client, **MEDIUM) for _ in range(3)]
    places = [view(client, task_id) for task_id in waiting]
    assert [p.queue_position for p in places] == [0, 1, 2]
    estimates = [p.estimated_start_s for p in places]
    assert all(e is not None and e > 0 for e in estimates) and estimates == sorted(estimates), estimates

    with connect_sse(client, "GET", f"/task/{waiting[2]}/events") as source:
        events = source.iter_sse()
        first = next(events)
        assert first.event == "queued" and first.json()["queue_position"] == 2
        client.delete(f"/task/{blocking}")
        poll_until(client, waiting[2], lambda v: v.queue_position == 1)
        rest = list(events)
    positions = [2] + [e.json()["queue_position"] for e in rest if e.event == "queued"]
    assert positions == sorted(set(positions), reverse=True) and positions[-1] < 2, positions
    assert rest[-1].event == "result" and rest[-1].json()["status"] == TaskStatus.succeeded
    assert view(client, waiting[2]).queue_position is None


def test_run_client_says_where_its_task_stands(api_url: str, client: httpx.Client) -> None:
    blocking = running_long_task(client)
    try:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_client.py"), "--url", api_url, "--max-tokens", "4", "Say hi."],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = process.stderr.readline() if process.stderr else ""
        assert line.startswith("[1st in line"), line
    finally:
        client.delete(f"/task/{blocking}")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip()


def test_places_read_as_people_say_them() -> None:
    assert [in_line(n, None) for n in (0, 1, 2, 3, 10, 11, 20, 21)] == [
        "1st in line", "2nd in line", "3rd in line", "4th in line", "11th in line", "12th in line", "21st in line",
        "22nd in line",
    ]
    assert in_line(2, 19.6) == "3rd in line, about 20 s"
