"""A small version of `bench/load.py`: concurrent clients against an API with a short queue.

The API is a second process with MAX_QUEUED_TASKS=3 on the session's Redis, so the session's
worker serves what it accepts; with ten clients at once the queue fills and some answers are 429.
"""

from collections.abc import Iterator

import pytest

from bench.load import run_load
from tests.extra_api import extra_api

SUBMISSIONS = 60
CLIENTS = 10
MAX_QUEUED = 3


@pytest.fixture(scope="module")
def short_queue_api(api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Depends on `api_url` so that the session's worker is up before the load starts."""
    with extra_api(stack_env, tmp_path_factory.mktemp("load"), {"MAX_QUEUED_TASKS": str(MAX_QUEUED)}) as url:
        yield url


def test_every_answer_is_202_or_429_and_every_accepted_task_finishes(short_queue_api: str) -> None:
    report = run_load(short_queue_api, SUBMISSIONS, CLIENTS, max_new_tokens=2, drain_timeout_s=300)

    assert set(report.statuses) <= {202, 429}, report.statuses
    assert report.statuses[429] > 0, "the queue never filled"
    assert report.statuses[202] >= MAX_QUEUED
    assert report.finished == {"succeeded": len(report.accepted)}, report.finished
    assert max(report.latencies_s) < 5, f"slowest submission took {max(report.latencies_s):.1f} s"
