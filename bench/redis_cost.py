"""What a generating task costs Redis: commands per task and per generated token, at two answer
lengths side by side in one run.

Run: `python -m bench.redis_cost [--short 32 --long 160 --runs 3]`, optionally with
`STREAM_FLUSH_MS=...` in the environment. Starts a redis-server, one worker (fp32) and the API.
Each run submits one greedy task and waits for its end (reading only its status, twice a
second), while Redis's MONITOR lists every command it receives: the commands clients send (a
script is one) are counted apart from those the scripts run inside (`INFO commandstats` counts
both alike). What the processes do anyway (heartbeats, lease renewals and scans, Celery's polling
of the queue) is measured alone over a quiet interval and taken off in proportion to each run's
length. Per token is the slope between the two lengths; per task, what is left at the short one.
Then `--cancels` times: a long task is cancelled mid-answer (DELETE /task/{id}), timed until its
record says `cancelled`: the check rides on the appends now, not on every token. Last, what one
Redis core carries: `redis-benchmark` (Debian's redis-tools) runs the store's append script, the
command a generation sends most, from 50 clients against the same redis-server.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.table import print_table
from core.settings import Settings
from core.store import APPEND_LUA
from devstack.processes import Stack

PROMPT = "Write a very long story about a lighthouse keeper and a storm."
STATUS_EVERY_S = 0.5


@dataclass
class Monitor:
    """Counts what Redis receives from clients, and what scripts run, until `stop`."""

    url: str
    sent: int = 0
    in_scripts: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._client = redis.Redis.from_url(self.url)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            for command in monitor.listen():
                if self._stopping.is_set():
                    return
                if command["client_type"] == "lua":
                    self.in_scripts += 1
                elif not _ours(command["command"]):
                    self.sent += 1

    def stop(self) -> tuple[int, int]:
        self._stopping.set()
        redis.Redis.from_url(self.url).ping()  # wakes the listener up
        self._thread.join(timeout=10)
        return self.sent, self.in_scripts


def _ours(command: str) -> bool:
    """This script's own status reads and pings."""
    return command.startswith("HGET task:") and command.endswith(" status") or command == "PING"


def quiet_rate(url: str, seconds: float) -> tuple[float, float]:
    """(commands sent, commands in scripts) per second with no task: the background every run pays."""
    monitor = Monitor(url)
    time.sleep(seconds)
    sent, in_scripts = monitor.stop()
    return sent / seconds, in_scripts / seconds


@dataclass(frozen=True)
class Run:
    sent: int
    in_scripts: int
    seconds: float
    tokens: int


def one_task(client: httpx.Client, url: str, tokens: int) -> Run:
    admin = redis.Redis.from_url(url)
    monitor = Monitor(url)
    started = time.monotonic()
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": tokens}
    task_id = client.post("/generate", json=body).json()["task_id"]
    while admin.hget(f"task:{task_id}", "status") not in (b"succeeded", b"failed", b"cancelled"):
        time.sleep(STATUS_EVERY_S)
    seconds = time.monotonic() - started
    sent, in_scripts = monitor.stop()
    generated = client.get(f"/task/{task_id}").json()["usage"]["completion_tokens"]
    return Run(sent, in_scripts, seconds, generated)


def cancel_s(client: httpx.Client, url: str) -> float:
    """Seconds from DELETE /task/{id} (sent mid-answer) to the task's record saying `cancelled`."""
    admin = redis.Redis.from_url(url)
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 400}
    task_id = client.post("/generate", json=body).json()["task_id"]
    while admin.xlen(f"task:{task_id}:chunks") < 3:
        time.sleep(0.01)
    asked = time.monotonic()
    client.delete(f"/task/{task_id}")
    while admin.hget(f"task:{task_id}", "status") != b"cancelled":
        time.sleep(0.002)
    return time.monotonic() - asked


def appends_per_second(url: str) -> float:
    """Calls of the append script one Redis core serves, median of 3 runs of 100,000 from 50 clients."""
    benchmark = shutil.which("redis-benchmark")
    assert benchmark, "redis-benchmark is missing: apt-get install redis-tools"
    admin = redis.Redis.from_url(url)
    sha = admin.script_load(APPEND_LUA)
    admin.hset("task:bench", mapping={"holder": 1, "status": "running"})
    port = str(admin.connection_pool.connection_kwargs["port"])
    # A random append number per call (-r): a repeated number is a retry, which writes nothing.
    command = [benchmark, "-p", port, "-n", "100000", "-c", "50", "-r", "1000000000", "-q", "EVALSHA", sha, "2",
               "task:bench", "task:bench:chunks", "1", "86400", "a few more words, ", "264 1151 540 2474", "__rand_int__",
               ""]
    rates = []
    for _ in range(3):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rates.append(float(re.findall(r"([0-9.]+) requests per second", out)[-1]))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--long", type=int, default=160)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=5)
    options = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-redis-cost-")), dict(os.environ), QUANTIZATION="none")
    try:
        stack.up()
        client = httpx.Client(base_url=stack.url, timeout=30)
        one_task(client, stack.redis_url, 4)  # warm-up
        background = quiet_rate(stack.redis_url, 10)
        runs = {n: [one_task(client, stack.redis_url, n) for _ in range(options.runs)]
                for n in (options.short, options.long)}
        cancels = [cancel_s(client, stack.redis_url) for _ in range(options.cancels)]
        core = appends_per_second(stack.redis_url)
    finally:
        stack.down()

    def slope_and_rest(count: str, rate: float) -> tuple[float, float]:
        short = statistics.median(getattr(r, count) - rate * r.seconds for r in runs[options.short])
        long = statistics.median(getattr(r, count) - rate * r.seconds for r in runs[options.long])
        short_tokens = statistics.median(r.tokens for r in runs[options.short])
        long_tokens = statistics.median(r.tokens for r in runs[options.long])
        per_token = (long - short) / (long_tokens - short_tokens)
        return per_token, short - per_token * short_tokens

    sent_per_token, sent_per_task = slope_and_rest("sent", background[0])
    inner_per_token, inner_per_task = slope_and_rest("in_scripts", background[1])
    speed = statistics.median(r.tokens / r.seconds for r in runs[options.long])
    settings = Settings()
    print_table(
        f"{platform.node()}: STREAM_FLUSH_TOKENS={settings.stream_flush_tokens}, "
        f"STREAM_FLUSH_MS={settings.stream_flush_ms}, medians of {options.runs} runs",
        [
            ("background, no task: commands sent per second", background[0]),
            (f"{options.long}-token task: tokens per second", speed),
            ("commands sent per generated token", sent_per_token),
            ("commands sent per task, besides its tokens", sent_per_task),
            ("commands run inside scripts per generated token", inner_per_token),
            ("commands run inside scripts per task, besides its tokens", inner_per_task),
            (f"cancel mid-answer to `cancelled`, median of {options.cancels} (ms)", 1000 * statistics.median(cancels)),
            (f"cancel mid-answer to `cancelled`, worst of {options.cancels} (ms)", 1000 * max(cancels)),
            ("one Redis core: append scripts per second (redis-benchmark, 50 clients)", core),
        ],
    )


if __name__ == "__main__":
    main()
