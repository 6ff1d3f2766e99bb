"""What one worker process owns (engine, prompt formatter, task store) and how it runs one task.

Kept free of Celery so it can be driven directly; `worker.tasks` is the thin Celery shell.
"""

import logging
import time
from dataclasses import dataclass

import redis
import torch

from core.protocol import GenerateRequest, GenerationResult, MemoryStats, Timings, Usage
from core.redis_client import TRANSIENT_ERRORS, connect
from core.settings import Settings
from core.store import SUPERSEDED, TaskStore
from model_loader.engine import Engine, EngineBroken, EngineRestarted, Outcome, SamplingParams, make_engine
from model_loader.loader import load_model
from model_loader.source import model_dir
from prompts import ChatFormatter, PromptTooLong, build_prompt, context_window, load_formatter

log = logging.getLogger(__name__)


class HandBack(Exception):
    """This delivery cannot finish its task, through no fault of the task: run it again.

    Redis stayed unreachable (or read-only, or out of memory) past WORKER_REDIS_RETRY_S, or the
    engine failed under it. The Celery task turns this into a requeue, and with `stop_worker`
    (the engine could not restart) also ends the process so that it is started afresh.
    """

    def __init__(self, reason: str, stop_worker: bool = False) -> None:
        super().__init__(reason)
        self.stop_worker = stop_worker


def sampling_params(request: GenerateRequest, settings: Settings) -> SamplingParams:
    """The request's sampling choices. The API fills in its defaults before it queues a task
    (`app.admission.with_defaults`); this worker's apply only to a payload that lacks them (one
    sent by an API of an earlier version, or by hand)."""

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
            context_window=settings.usable_context(context_window(folder, settings.context_window)),
            store=TaskStore(
                connect(settings.redis_url, retry_s=settings.worker_redis_retry_s),
                settings.result_ttl_s,
                retry_s=settings.worker_redis_retry_s,
            ),
        )

    def run(self, task_id: str, request: GenerateRequest, worker: str) -> None:
        """Generate one answer, streaming chunks to the store; any failure ends the task `failed`.

        A Redis error never leaves a task `running` with nobody on it: the store's client retries
        transient ones (a restart, a failover, memory full) for WORKER_REDIS_RETRY_S, after which
        the task is handed back to the queue; any other (its stream key overwritten with another
        type) fails the task with the error, or, when even that cannot be written, is logged and
        the task dropped, since running it again would meet the same key.
        """
        try:
            self._run(task_id, request, worker)
        except TRANSIENT_ERRORS as exc:
            raise HandBack(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
        except redis.RedisError as exc:
            log.error("task %s: Redis refused its writes (%s: %s)", task_id, type(exc).__name__, exc)
            try:
                self.store.fail_unreadable(task_id, f"the task store refused a write: {type(exc).__name__}: {exc}")
            except redis.RedisError:
                log.error("task %s: its failure could not be recorded either; dropped", task_id)

    def _run(self, task_id: str, request: GenerateRequest, worker: str) -> None:
        """A task cancelled while it waited in the queue is dropped here without running; one whose
        workers died `MAX_ATTEMPTS` times fails instead of looping through the workers forever."""
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
        except redis.RedisError:
            raise
        except (EngineRestarted, EngineBroken) as exc:
            log.warning("task %s, attempt %d: %s; handing it back", task_id, attempt, exc)
            raise HandBack(str(exc), stop_worker=isinstance(exc, EngineBroken)) from exc
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
            log.warning("task %s: a newer delivery took over from attempt %d; its result is dropped", task_id, attempt)

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
            stop_string=outcome.stop_string,
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
