"""Polling helpers for the end-to-end tests: every wait has a deadline."""

import time
from collections.abc import Callable

import httpx

from core.protocol import TaskView

POLL_TIMEOUT_S = 180


def submit(client: httpx.Client, **body: object) -> str:
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def poll_until(
    client: httpx.Client, task_id: str, check: Callable[[TaskView], bool], timeout_s: float = POLL_TIMEOUT_S
) -> TaskView:
    """The task's whole view (no cursor) once `check` holds for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = TaskView.model_validate(client.get(f"/task/{task_id}").json())
        if check(view):
            return view
        time.sleep(0.02)
    raise TimeoutError(f"task {task_id} did not get there in {timeout_s} s")


def poll_until_finished(
    client: httpx.Client,
    task_id: str,
    interval_s: float = 0.02,
    timeout_s: float = POLL_TIMEOUT_S,
    after: str = "0-0",
) -> tuple[TaskView, list[TaskView]]:
    """Poll with cursors as a client would, from `after`; returns the final view, whole (one more
    poll, without a cursor), and every view seen (each holding only the chunks after the cursor
    before it)."""
    seen: list[TaskView] = []
    cursor = after
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/task/{task_id}", params={"after": cursor})
        assert response.status_code == 200, response.text
        view = TaskView.model_validate(response.json())
        seen.append(view)
        cursor = view.cursor
        if view.status.finished:
            return TaskView.model_validate(client.get(f"/task/{task_id}").json()), seen
        time.sleep(interval_s)
    raise TimeoutError(f"task {task_id} did not finish in {timeout_s} s")
