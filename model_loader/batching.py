"""Several tasks at once on one model: transformers' continuous batching manager steps them together.

The manager runs the decoding loop on its own thread and batches every active request into each
forward pass, so a worker serving N tasks pays for roughly one pass per token instead of N.
Each task's thread submits its request, then reads that request's token outputs from its own
queue (a router thread sorts the manager's shared output queue by request id) and feeds them to
its own `TokenSink`: streaming, stop strings and cancellation stay per task, and a task that
stops early is cancelled in the manager so its slot frees at once.

The manager samples from one generator for the whole batch and has no repetition penalty, so
those two request options exist only at a concurrency of 1 (its capabilities say so, and the API
refuses them while such a worker is live).

Any exception in the manager's loop (a request it cannot take, CUDA out of memory) ends its
decoding thread and fails every request in flight. The engine then starts a fresh manager on
the same model (a fraction of a second) and raises `EngineRestarted` for each of those
requests, so their tasks go back to the queue and run again instead of failing, while the
worker goes on serving. Which request caused it cannot be told apart; a request that breaks the
engine every time it runs ends after `MAX_ATTEMPTS`, like one that kills its worker.
"""

import logging
import math
import queue
import threading
import uuid
from typing import NoReturn

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import GenerationOutput

from core.settings import Settings
from model_loader.contract import (
    Capabilities,
    EngineBroken,
    EngineRestarted,
    FlushPolicy,
    Interruption,
    OnChunk,
    Outcome,
    Resume,
    SamplingParams,
    never,
)
from model_loader.loader import LoadedModel, decoder, eos_ids, memory
from model_loader.sink import TokenSink

log = logging.getLogger(__name__)

PAGE_SIZE = 64
OUTPUT_WAIT_S = 0.5


class BatchingEngine:
    def __init__(self, loaded: LoadedModel, flush: FlushPolicy, settings: Settings, context_tokens: int) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.flush = flush
        self.capabilities = Capabilities(
            engine="transformers", slots=settings.worker_slots, context_tokens=context_tokens, seed=False,
            repetition_penalty=False, grammar=False, logprobs=False, penalties=False,
        )
        self._settings = settings
        self._eos_ids = eos_ids(loaded)
        self._decode = decoder(loaded)
        self._vocab_size = loaded.model.config.get_text_config().vocab_size
        self._queues: dict[str, queue.Queue[GenerationOutput]] = {}
        self._queues_lock = threading.Lock()
        self._manager_lock = threading.Lock()
        self._manager = self._start_manager()
        log.info("continuous batching: up to %d tasks, %d KV-cache tokens", settings.worker_slots,
                 settings.kv_cache_tokens)

    @property
    def ready(self) -> bool:
        return self._manager.is_running()

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        on_chunk: OnChunk,
        interruption: Interruption = never,
        resume: Resume = Resume(),
    ) -> Outcome:
        if params.seed is not None or params.repetition_penalty != 1.0:
            raise ValueError("seed and repetition_penalty need WORKER_CONCURRENCY=1 with ENGINE=transformers")
        sink = TokenSink.opened(self._decode, params, on_chunk, interruption, self.flush, resume)
        if left := sink.tokens_left(params, self._eos_ids):
            self._run(input_ids + resume.token_ids, params, left, sink)
        sink.close()
        return sink.outcome(len(input_ids), self._eos_ids, memory(self.loaded))

    def _run(self, input_ids: list[int], params: SamplingParams, max_new_tokens: int, sink: TokenSink) -> None:
        manager = self._running_manager()
        request_id, outputs = self._submit(manager, input_ids, params, max_new_tokens)
        try:
            self._consume(manager, request_id, outputs, sink)
        except BaseException:
            manager.cancel_request(request_id)  # so the batch does not go on decoding it for nobody
            raise
        finally:
            with self._queues_lock:
                self._queues.pop(request_id, None)

    def close(self) -> None:
        """Stop the decoding thread, so the worker process can exit."""
        self._manager.stop(block=True, timeout=10)

    def _start_manager(self) -> ContinuousBatchingManager:
        manager = self.loaded.model.init_continuous_batching(
            generation_config=_generation_config(self._settings, self._eos_ids),
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True,
                page_size=PAGE_SIZE,
                num_blocks=math.ceil(self._settings.kv_cache_tokens / PAGE_SIZE),
                max_batch_tokens=self._settings.max_batch_tokens,
            ),
        )
        manager.start()
        threading.Thread(target=self._route_outputs, args=(manager,), name="cb-router", daemon=True).start()
        return manager

    def _running_manager(self) -> ContinuousBatchingManager:
        """The manager, after starting a fresh one if its decoding thread has died."""
        with self._manager_lock:
            if not self._manager.is_running():
                log.error("the batching engine's decoding thread has stopped; starting a fresh one")
                self._manager.stop(block=True, timeout=10)
                try:
                    self._manager = self._start_manager()
                except Exception as exc:
                    raise EngineBroken(f"the batching engine could not start again: {exc}") from exc
            return self._manager

    def _submit(
        self, manager: ContinuousBatchingManager, input_ids: list[int], params: SamplingParams, max_new_tokens: int
    ) -> tuple[str, queue.Queue[GenerationOutput]]:
        request_id = uuid.uuid4().hex
        outputs: queue.Queue[GenerationOutput] = queue.Queue()
        with self._queues_lock:
            self._queues[request_id] = outputs
        manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=True,
            eos_token_id=self._eos_ids,
            **self._per_request_sampling(params),
        )
        return request_id, outputs

    def _consume(
        self,
        manager: ContinuousBatchingManager,
        request_id: str,
        outputs: queue.Queue[GenerationOutput],
        sink: TokenSink,
    ) -> None:
        """Feed each new token to the sink until the request finishes or the sink says stop."""
        seen = 0
        while True:
            try:
                output = outputs.get(timeout=OUTPUT_WAIT_S)
            except queue.Empty:
                if not manager.is_running():
                    self._restarted(f"its decoding thread stopped after {seen} tokens")
                if sink.poll_interruption():
                    manager.cancel_request(request_id)
                    return
                continue
            if output.error:
                if not manager.is_running():
                    self._restarted(f"the batch failed: {output.error}")
                raise RuntimeError(f"generation failed: {output.error}")
            for token in output.generated_tokens[seen:]:
                seen += 1
                if sink.add(token):
                    manager.cancel_request(request_id)
                    return
            if output.is_finished():
                return

    def _restarted(self, why: str) -> NoReturn:
        """Start the engine afresh for the requests that come next, and hand this one back."""
        self._running_manager()
        raise EngineRestarted(f"the batching engine failed ({why}) and was restarted")

    def _per_request_sampling(self, params: SamplingParams) -> dict[str, float | int]:
        """Greedy is top-k 1; top-k 0 (off) is the whole vocabulary, and so is any larger top-k
        (the manager indexes the sorted logits with it)."""
        if params.temperature == 0:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        top_k = min(params.top_k, self._vocab_size) if params.top_k else self._vocab_size
        return {"temperature": params.temperature, "top_k": top_k, "top_p": params.top_p}

    def _route_outputs(self, manager: ContinuousBatchingManager) -> None:
        """Sort one manager's shared output queue into each request's own queue, while it runs."""
        while True:
            output = manager.get_result(timeout=OUTPUT_WAIT_S)
            if output is None:
                if not manager.is_running():
                    return
                continue
            with self._queues_lock:
                target = self._queues.get(output.request_id)
            if target is not None:
                target.put(output)


def _generation_config(settings: Settings, eos: list[int]) -> GenerationConfig:
    """Sampling on, with temperature, top-k and top-p processors present so each request can set its own."""
    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        max_new_tokens=settings.default_max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos[0],
    )
