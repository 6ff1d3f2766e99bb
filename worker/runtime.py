"""What one worker process owns (engine, prompt formatter, task store) and how it runs one task.

Kept free of Celery so it can be driven directly; `worker.tasks` is the thin Celery shell.
"""

import logging
import time
from dataclasses import dataclass

import redis
import torch
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from core.protocol import GenerateRequest, GenerationResult, MemoryStats, Timings, Usage
from core.settings import Settings
from core.store import SUPERSEDED, TaskStore
from model_loader.engine import Engine, Outcome, SamplingParams, make_engine
from model_loader.loader import load_model
from model_loader.source import model_dir
from prompts import ChatFormatter, PromptTooLong, build_prompt, context_window, load_formatter

log = logging.getLogger(__name__)

REDIS_RETRY_INTERVAL_S = 0.5


def sampling_params(request: GenerateRequest, settings: Settings) -> SamplingParams:
    """The request's sampling choices with the server defaults filled in, in one place."""

    def pick(value, default):  # type: ignore[no-untyped-def]
        return default if value is None else value

    return SamplingParams(
        max_new_tokens=pick(request.max_new_tokens, settings.default_max_new_tokens),
        temperature=pick(request.temperature, settings.default_temperature),
        top_p=pick(request.top_p, settings.default_top_p),
        top_k=pick(request.top_k, settings.default_top_k),
        repetition_penalty=pick(request.repetition_penalty, settings.default_repetition_penalty),
        seed=request.seed,
        stop=tuple(request.stop),
    )


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: Engine
    formatter: ChatFormatter
    context_window: int
    store: TaskStore

    @classmethod
    def start(cls, settings: Settings) -> "WorkerRuntime":
        """Load the model once for this process."""
        loaded = load_model(settings)
        folder = model_dir(settings)
        return cls(
            settings=settings,
            engine=make_engine(loaded, settings),
            formatter=load_formatter(folder, settings.prompt_format, loaded.name),
            context_window=context_window(folder, settings.context_window),
            store=TaskStore(_patient_redis(settings), settings.result_ttl_s),
        )

    def run(self, task_id: str, request: GenerateRequest, worker: str) -> None:
        """Generate one answer, streaming chunks to the store; any failure ends the task `failed`.

        A task cancelled while it waited in the queue is dropped here without running; one whose
        workers died `MAX_ATTEMPTS` times fails instead of looping through the workers forever.
        Losing Redis for longer than the store's retries raises: there is nowhere to record a
        failure, so the Celery task hands the task back to the queue instead.
        """
        started_at = time.time()
        attempt = self.store.start(task_id, worker)
        if not attempt:
            log.info("task %s was cancelled or has expired before it started; skipped", task_id)
            return
        if attempt > self.settings.max_attempts:
            self.store.fail(task_id, _gave_up(attempt - 1), attempt)
            return
        deadline = time.monotonic() + self.settings.task_time_limit_s
        try:
            outcome = self._generate(task_id, attempt, request, deadline)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except PromptTooLong as exc:
            self.store.fail(task_id, str(exc), attempt)
            return
        except (torch.OutOfMemoryError, MemoryError):
            log.exception("task %s ran out of memory", task_id)
            self.store.fail(task_id, _out_of_memory(self.engine.loaded.device.type), attempt)
            return
        except Exception as exc:
            log.exception("task %s failed", task_id)
            self.store.fail(task_id, f"generation failed on worker {worker}: {type(exc).__name__}: {exc}", attempt)
            return
        enqueued_at = self.store.enqueued_at(task_id) or started_at
        stored = outcome.finish_reason != SUPERSEDED and self.store.finish(
            task_id, attempt, self._result(outcome, worker, enqueued_at, started_at)
        )
        if not stored:
            log.warning("task %s: a newer delivery took over from attempt %d, whose result is dropped", task_id, attempt)

    def _generate(self, task_id: str, attempt: int, request: GenerateRequest, deadline: float) -> Outcome:
        params = sampling_params(request, self.settings)
        prompt = build_prompt(
            self.formatter, request, self.settings.default_system_prompt, self.context_window - params.max_new_tokens
        )

        def interruption() -> str | None:
            reason = self.store.stop_reason(task_id, attempt)
            return reason or ("timeout" if time.monotonic() > deadline else None)

        return self.engine.generate(
            prompt.input_ids,
            params,
            on_chunk=lambda text: self.store.append_chunk(task_id, attempt, text),
            interruption=interruption,
        )

    def _result(self, outcome: Outcome, worker: str, enqueued_at: float, started_at: float) -> GenerationResult:
        loaded = self.engine.loaded
        now = time.time()
        return GenerationResult(
            text=outcome.text,
            finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens),
            timings=Timings(
                queued_s=max(0.0, started_at - enqueued_at),
                time_to_first_token_s=outcome.time_to_first_token_s,
                generation_s=outcome.generation_s,
                tokens_per_second=outcome.completion_tokens / outcome.generation_s if outcome.generation_s else 0.0,
                total_s=now - enqueued_at,
            ),
            memory=MemoryStats(
                device=str(loaded.device), model_weight_bytes=loaded.weight_bytes, peak_bytes=outcome.peak_bytes
            ),
            model=loaded.name,
            worker=worker,
        )


def _patient_redis(settings: Settings) -> redis.Redis:
    """A client that rides out a Redis restart: commands retry for `worker_redis_retry_s`.

    A generation pauses at its next chunk or per-token check until Redis answers again, and
    then goes on where it was, instead of failing a task it could finish.
    """
    retries = max(1, round(settings.worker_redis_retry_s / REDIS_RETRY_INTERVAL_S))
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, retry=Retry(ConstantBackoff(REDIS_RETRY_INTERVAL_S), retries)
    )


def _gave_up(attempts: int) -> str:
    return (
        f"gave up after {attempts} attempts: the worker running this task died each time (killed, or out of "
        "memory); try a shorter prompt or fewer max_new_tokens"
    )


def _out_of_memory(device: str) -> str:
    return (
        f"the worker ran out of {device} memory; retry with a shorter prompt or fewer max_new_tokens, "
        "or lower WORKER_CONCURRENCY on the workers"
    )
