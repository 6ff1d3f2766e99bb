"""What one worker process owns (engine, prompt formatter, task store, leases) and how it runs one
attempt at a task: a new answer, or one that another attempt began.

Kept free of Celery so it can be driven directly; `worker.tasks` is the thin Celery shell.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from core.protocol import HANDED_BACK, SUPERSEDED, GenerateRequest, GenerationResult, MemoryStats, Timings, Usage
from core.redis_client import TRANSIENT_ERRORS, connect
from core.settings import Settings
from core.queue import Lanes, Priority
from core.queue import Send as SendNew
from core.store import LEASES_KEY, Published, Started, TaskStore
from model_loader.contract import Engine, EngineBroken, EngineRestarted, Outcome, Resume
from model_loader.factory import make_engine
from model_loader.source import tokenizer_dir
from prompts import ChatFormatter, PromptTooLong, build_prompt, load_formatter
from worker.cancels import CancelListener
from worker.interruptions import Interruptions
from worker.leases import Leases, Send
from worker.releases import Releases

log = logging.getLogger(__name__)


class HandBack(Exception):
    """This delivery cannot run its task, through no fault of the task: Celery should queue it again.

    Redis stayed unreachable (or read-only, or out of memory) past WORKER_REDIS_RETRY_S, so the
    task could not be handed back through its lease (which lapses meanwhile: whichever delivery
    comes first then runs it, and the other is dropped as a duplicate); or the worker is stopping
    before the task started.
    """


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: Engine
    formatter: ChatFormatter
    context_window: int
    store: TaskStore
    leases: Leases
    cancels: CancelListener
    releases: Releases
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, settings: Settings, send: Send, send_new: SendNew) -> "WorkerRuntime":
        """Start the engine (and so load the model) once for this process. `send` queues a task
        again (see `Leases`); `send_new` sends a task released from its lane (see `Releases`)."""
        engine = make_engine(settings)
        store = TaskStore(
            connect(settings, retry_s=settings.worker_redis_retry_s),
            settings.result_ttl_s,
            retry_s=settings.worker_redis_retry_s,
            lease_s=settings.lease_s,
            model=engine.name,
        )
        return cls(
            settings=settings,
            engine=engine,
            formatter=load_formatter(tokenizer_dir(settings), settings.prompt_format, engine.name),
            context_window=engine.capabilities.context_tokens,
            store=store,
            leases=Leases(store, settings.lease_renew_s, send, settings.generation_stall_s),
            cancels=CancelListener(store.redis),
            releases=Releases(Lanes(store.redis, LEASES_KEY), send_new, Priority.of(settings)),
        )

    def run(self, task_id: str, request: GenerateRequest, payload: str, worker: str) -> None:
        """Generate one answer, or go on with one another attempt began, streaming chunks to the
        store; any failure ends the task `failed`. `payload` is the request as it was sent.

        A Redis error never leaves a task `running` with nobody on it: the store's client retries
        transient ones (a restart, a failover, memory full) for WORKER_REDIS_RETRY_S, after which
        the task is handed back to the queue; any other (its stream key overwritten with another
        type) fails the task with the error, or, when even that cannot be written, is logged and
        the task dropped, since running it again would meet the same key.
        """
        try:
            self._run(task_id, request, payload, worker)
        except TRANSIENT_ERRORS as exc:
            raise HandBack(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
        except redis.RedisError as exc:
            log.error("task %s: Redis refused its writes (%s: %s)", task_id, type(exc).__name__, exc)
            try:
                self.store.fail_unreadable(task_id, f"the task store refused a write: {type(exc).__name__}: {exc}")
            except redis.RedisError:
                log.error("task %s: its failure could not be recorded either; dropped", task_id)

    def _run(self, task_id: str, request: GenerateRequest, payload: str, worker: str) -> None:
        """A delivery of a task that has ended, or that another attempt holds, is dropped here
        without running; one whose workers died `MAX_ATTEMPTS` times fails instead of looping
        through the workers forever."""
        if self.stopping.is_set():
            raise HandBack("this worker is stopping")
        started = self.store.start(task_id, worker, payload)
        if not started.attempt:
            log.info("task %s: not run (%s)", task_id, started.found or "unknown or expired")
            return
        attempt = started.attempt
        if started.counted_attempts > self.settings.max_attempts:
            self.store.fail(task_id, _gave_up(started.counted_attempts - 1), attempt)
            return
        self.leases.hold(task_id, attempt)
        try:
            self._attempt(task_id, request, worker, started)
        finally:
            self.leases.let_go(task_id)
            self.cancels.forget(task_id)
            self.releases.nudge()  # a slot is free: the next task need not wait for the tick

    def _attempt(self, task_id: str, request: GenerateRequest, worker: str, started: Started) -> None:
        """Go on from whatever earlier attempts published; an engine failure or this worker's stop
        hands the task on to the next free worker at once, rather than leaving it to its lease."""
        attempt = started.attempt
        published = self.store.published(task_id) if attempt > 1 else Published([], "", None)
        try:
            outcome = self._generate(task_id, request, started, published)
        except redis.RedisError:
            raise
        except (EngineRestarted, EngineBroken) as exc:
            log.warning("task %s, attempt %d: %s; handing it back", task_id, attempt, exc)
            self.leases.hand_back(task_id, attempt, clean=False)
            if isinstance(exc, EngineBroken):
                raise
            return
        except PromptTooLong as exc:
            self.store.fail(task_id, str(exc), attempt)
            return
        except MemoryError:
            log.exception("task %s ran out of memory", task_id)
            self.store.fail(task_id, _out_of_memory(self.engine.capabilities.engine), attempt)
            return
        except Exception as exc:
            log.exception("task %s failed", task_id)
            self.store.fail(task_id, f"generation failed on worker {worker}: {type(exc).__name__}: {exc}", attempt)
            return
        if outcome.finish_reason == HANDED_BACK:
            self.leases.hand_back(task_id, attempt, clean=True)
            return
        stored = outcome.finish_reason != SUPERSEDED and self.store.finish(
            task_id, attempt, self._result(task_id, outcome, worker, started, published)
        )
        if not stored:
            log.warning("task %s: another attempt took over from attempt %d; its result is dropped", task_id, attempt)

    def _generate(self, task_id: str, request: GenerateRequest, started: Started, published: Published) -> Outcome:
        """The time limit counts from the task's first start, so it bounds the whole answer."""
        params = request.to_sampling_params(self.settings)
        prompt = build_prompt(
            self.formatter, request, self.settings.default_system_prompt, self.context_window - params.max_new_tokens
        )
        self.store.note_prompt(task_id, started.attempt, len(prompt.input_ids))
        deadline = time.monotonic() + self.settings.task_time_limit_s - (time.time() - started.first_started_at)
        cancelled = self.cancels.watch(task_id)
        interruptions = Interruptions(self.store, task_id, started.attempt, deadline, self.stopping, cancelled,
                                      progress=lambda: self.leases.alive(task_id))
        return self.engine.generate(
            prompt.input_ids,
            params,
            on_chunk=interruptions.publish,
            interruption=interruptions,
            resume=Resume(published.token_ids, published.text),
        )

    def _result(
        self, task_id: str, outcome: Outcome, worker: str, started: Started, published: Published
    ) -> GenerationResult:
        """Figures for the whole answer: an attempt that went on from earlier ones adds their tokens
        and the time since the first one started (the gap between the two included)."""
        now = time.time()
        first = started.first_started_at
        enqueued_at = self.store.enqueued_at(task_id) or first
        earlier_s = started.started_at - first
        time_to_first_token = outcome.time_to_first_token_s
        if published.first_chunk_at is not None:
            time_to_first_token = published.first_chunk_at - first
        elif time_to_first_token is not None:
            time_to_first_token += earlier_s
        generation_s = earlier_s + outcome.generation_s
        return GenerationResult(
            text=outcome.text,
            finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
            stop_string=outcome.stop_string,
            usage=Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens),
            timings=Timings(
                queued_s=max(0.0, first - enqueued_at),
                time_to_first_token_s=time_to_first_token,
                generation_s=generation_s,
                tokens_per_second=outcome.completion_tokens / generation_s if generation_s else 0.0,
                total_s=now - enqueued_at,
            ),
            memory=_memory_stats(outcome, self.engine.capabilities.engine),
            model=self.engine.name,
            worker=worker,
        )


def _gave_up(attempts: int) -> str:
    return (
        f"gave up after {attempts} attempts: the worker running this task died each time (killed, or out of "
        "memory); try a shorter prompt or fewer max_new_tokens"
    )


def _memory_stats(outcome: Outcome, engine: str) -> MemoryStats:
    m = outcome.memory
    return MemoryStats(
        device=m.device, engine=engine, model_weight_bytes=m.weight_bytes, peak_bytes=m.peak_bytes,
        process_rss_bytes=m.process_rss_bytes, kv_cache_tokens_used=m.kv_cache_tokens_used,
        kv_cache_tokens=m.kv_cache_tokens, gpu_bytes=m.gpu_bytes,
    )


def _out_of_memory(engine: str) -> str:
    return (
        f"the {engine} engine ran out of memory; retry with a shorter prompt or fewer max_new_tokens, "
        "or lower WORKER_CONCURRENCY on the workers"
    )
