"""Fleet-wide metrics in Redis, so that one scrape of any API process sees every worker's work.

Workers and API processes add to one hash, `metrics`: counters and histogram buckets, each field a
JSON `[name, labels]` pair. What a task's end adds rides in the same Lua call that ends it, so each
ended task is counted exactly once, whichever process ended it; no GPU box needs a scrape port.
The names follow vLLM's and TGI's (`..._time_to_first_token_seconds`,
`..._request_queue_time_seconds`), each with a `model` label; `app.metrics` renders them.
"""

import json
from dataclasses import dataclass

from core.protocol import GenerationResult

KEY = "metrics"
PREFIX = "queued_llama_"

# (field, amount) pairs for HINCRBYFLOAT.
Increments = list[tuple[str, float]]


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]

    def observe(self, value: float, **labels: str) -> Increments:
        """The bucket that takes `value` (the first whose bound holds it), its sum and its count;
        `app.metrics` adds the buckets up into Prometheus's cumulative ones."""
        bound = next((b for b in self.buckets if value <= b), float("inf"))
        return [
            (field(f"{self.name}_bucket", **labels, le=_bound(bound)), 1),
            (field(f"{self.name}_sum", **labels), value),
            (field(f"{self.name}_count", **labels), 1),
        ]


LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # vLLM's e2e and queue-time buckets
HISTOGRAMS = (
    Histogram(f"{PREFIX}request_queue_time_seconds", "Time a task waited in the queue before its first start.",
              LATENCY_BUCKETS),
    Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from a task's first start to its first token.",
              (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0, 160.0, 640.0, 2560.0)),
    Histogram(f"{PREFIX}e2e_request_latency_seconds", "Time from submission to a task's end.", LATENCY_BUCKETS),
    Histogram(f"{PREFIX}request_generation_tokens_per_second", "Tokens per second over a task's whole answer.",
              (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)),
)
QUEUE_TIME, TIME_TO_FIRST_TOKEN, E2E_LATENCY, TOKENS_PER_SECOND = HISTOGRAMS

FINISHED = f"{PREFIX}request_finished_total"
PROMPT_TOKENS = f"{PREFIX}prompt_tokens_total"
GENERATION_TOKENS = f"{PREFIX}generation_tokens_total"
TAKEOVERS = f"{PREFIX}request_takeovers_total"
REJECTED = f"{PREFIX}request_rejected_total"
ADMITTED = f"{PREFIX}request_admitted_total"
BATCH_LINES = f"{PREFIX}batch_lines_total"
WEBHOOK_DELIVERIES = f"{PREFIX}webhook_deliveries_total"
COUNTERS = {
    FINISHED: "Tasks that ended, by status and finish_reason ('none' for a failed task).",
    PROMPT_TOKENS: "Prompt tokens of the tasks that ended with a result.",
    GENERATION_TOKENS: "Tokens generated for the tasks that ended with a result.",
    TAKEOVERS: "Attempts after a task's first: a worker died, froze or stopped, and another went on.",
    REJECTED: "Requests refused, by key name and HTTP status (400 and 422 bad input, 413 too large, 429 a limit).",
    ADMITTED: "Tasks admitted to the queue, by key name.",
    BATCH_LINES: "Lines of batches that ended, by outcome (completed; failed: refused, failed, cancelled or expired).",
    WEBHOOK_DELIVERIES: "Webhook delivery attempts, by outcome (delivered; failed, to be retried; given_up).",
}


def field(name: str, **labels: str) -> str:
    return json.dumps([name, labels], sort_keys=True)


def parse(raw: str) -> tuple[str, dict[str, str]]:
    name, labels = json.loads(raw)
    return name, labels


def task_ended(model: str, status: str, finish_reason: str | None, result: GenerationResult | None) -> Increments:
    """What a task's end adds: its status, and with a result its tokens and timings."""
    increments: Increments = [(field(FINISHED, model=model, status=status, finish_reason=finish_reason or "none"), 1)]
    if result is None:
        return increments
    timings = result.timings
    increments += [
        (field(PROMPT_TOKENS, model=model), result.usage.prompt_tokens),
        (field(GENERATION_TOKENS, model=model), result.usage.completion_tokens),
        *QUEUE_TIME.observe(timings.queued_s, model=model),
        *E2E_LATENCY.observe(timings.total_s, model=model),
        *TOKENS_PER_SECOND.observe(timings.tokens_per_second, model=model),
    ]
    if timings.time_to_first_token_s is not None:
        increments += TIME_TO_FIRST_TOKEN.observe(timings.time_to_first_token_s, model=model)
    return increments


def takeover(model: str) -> str:
    """The field a task's second and later attempts count up."""
    return field(TAKEOVERS, model=model)


def rejected(model: str, key: str, status: int) -> str:
    return field(REJECTED, model=model, key=key, code=str(status))


def admitted(model: str, key: str) -> str:
    return field(ADMITTED, model=model, key=key)


def batch_lines(model: str, outcome: str) -> str:
    return field(BATCH_LINES, model=model, outcome=outcome)


def webhook_deliveries(model: str, outcome: str) -> str:
    return field(WEBHOOK_DELIVERIES, model=model, outcome=outcome)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
