"""Load: many clients submitting at once to a live API; every answer must be 202 or 429, never a 5xx.

Then every accepted task is polled until it finishes, and the figures are printed as a table.

    python -m bench.load http://127.0.0.1:8000 [--submissions 500 --clients 50 --max-new-tokens 4]

Start the stack first, for instance `MAX_QUEUED_TASKS=100 make run` in another terminal.
"""

import argparse
import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from core.protocol import TaskView

POLL_INTERVAL_S = 0.2
# Below uvicorn's 5 s keep-alive timeout: a connection the server is closing is never reused.
KEEPALIVE_EXPIRY_S = 2.0
NO_ANSWER = 0  # the status recorded when the request failed without an HTTP answer

T = TypeVar("T")


@dataclass
class LoadReport:
    submitted: int
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    finished: Counter[str] = field(default_factory=Counter)
    submit_s: float = 0.0
    drain_s: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def other(self) -> int:
        return self.submitted - self.statuses[202] - self.statuses[429] - self.server_errors

    def percentile_s(self, pct: int) -> float:
        if len(self.latencies_s) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[pct - 1]

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("submitted", str(self.submitted)),
            ("202 accepted", str(self.statuses[202])),
            ("429 queue full", str(self.statuses[429])),
            ("5xx", str(self.server_errors)),
            ("other (incl. no answer)", str(self.other)),
            ("accepted tasks finished", f"{sum(self.finished.values())} ({_counts(self.finished)})"),
            ("submit latency p50", f"{self.percentile_s(50) * 1000:.0f} ms"),
            ("submit latency p95", f"{self.percentile_s(95) * 1000:.0f} ms"),
            ("submission phase", f"{self.submit_s:.1f} s"),
            ("time to drain", f"{self.drain_s:.1f} s"),
        ]


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counter.items())) or "none"


async def _submit(client: httpx.AsyncClient, index: int, max_new_tokens: int, report: LoadReport) -> None:
    body = {"prompt": f"Say hello to visitor number {index}.", "max_new_tokens": max_new_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        response = await client.post("/generate", json=body)
    except httpx.HTTPError:
        report.statuses[NO_ANSWER] += 1
        return
    report.latencies_s.append(time.perf_counter() - started)
    report.statuses[response.status_code] += 1
    if response.status_code == 202:
        report.accepted.append(response.json()["task_id"])


async def _final_status(client: httpx.AsyncClient, task_id: str, deadline: float) -> str:
    """Polls one task until it finishes; 'unfinished' if the deadline passes first."""
    while time.monotonic() < deadline:
        try:
            response = await client.get(f"/task/{task_id}")
        except httpx.TransportError:
            await asyncio.sleep(POLL_INTERVAL_S)  # a poll is safe to repeat
            continue
        if response.status_code == 200:
            view = TaskView.model_validate(response.json())
            if view.status.finished:
                return str(view.status)
        await asyncio.sleep(POLL_INTERVAL_S)
    return "unfinished"


async def _in_parallel(clients: int, jobs: list[Awaitable[T]]) -> list[T]:
    """Runs the coroutines with at most `clients` at a time, as that many clients would."""
    gate = asyncio.Semaphore(clients)

    async def gated(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return await asyncio.gather(*(gated(job) for job in jobs))


async def run_load_async(
    url: str, submissions: int, clients: int, max_new_tokens: int, api_key: str | None, drain_timeout_s: float
) -> LoadReport:
    report = LoadReport(submitted=submissions)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        started = time.monotonic()
        await _in_parallel(clients, [_submit(client, i, max_new_tokens, report) for i in range(submissions)])
        report.submit_s = time.monotonic() - started
        deadline = time.monotonic() + drain_timeout_s
        finals = await _in_parallel(clients, [_final_status(client, task_id, deadline) for task_id in report.accepted])
        report.drain_s = time.monotonic() - started - report.submit_s
    report.finished = Counter(status for status in finals if status != "unfinished")
    return report


def run_load(
    url: str,
    submissions: int,
    clients: int,
    max_new_tokens: int,
    api_key: str | None = None,
    drain_timeout_s: float = 600,
) -> LoadReport:
    """`submissions` POSTs from `clients` concurrent clients, then every accepted task polled to its end."""
    return asyncio.run(run_load_async(url, submissions, clients, max_new_tokens, api_key, drain_timeout_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the API's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--submissions", type=int, default=500)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--api-key", help="sent as a Bearer token, for a server with API_KEYS set")
    parser.add_argument("--drain-timeout", type=float, default=600, help="seconds to wait for accepted tasks")
    args = parser.parse_args()
    report = run_load(args.url, args.submissions, args.clients, args.max_new_tokens, args.api_key, args.drain_timeout)
    print(f"{args.submissions} submissions from {args.clients} clients, max_new_tokens={args.max_new_tokens}")
    print("| measure | value |\n|---|---|")
    for label, value in report.rows():
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
