"""Several tasks at once on one model: transformers' continuous batching manager steps them together.

The manager runs the decoding loop on its own thread and batches every active request into each
forward pass, so a worker serving N tasks pays for roughly one pass per token instead of N.
Each task's thread submits its request, then reads that request's token outputs from its own
queue (a router thread sorts the manager's shared output queue by request id) and feeds them to
its own `TokenSink`: streaming, stop strings and cancellation stay per task, and a task that
stops early is cancelled in the manager so its slot frees at once.

Each request's own processing (log probabilities, penalties, logit_bias, its grammar: one
`AnswerLogits`, as at a concurrency of 1) runs on its row of each step's scores, through a
processor of ours that goes first in the manager's list. The manager samples the whole batch from
one generator, so a seed cannot be honoured: its capabilities say so and the API refuses a
caller's seed while such a worker is live (the seed the API gives every constrained answer, for
vLLM's takeover, is not needed here, where the grammar follows the published tokens).

Any exception in the manager's loop (a request it cannot take, CUDA out of memory) ends its
decoding thread and fails every request in flight. The engine then starts a fresh manager on
the same model (a fraction of a second) and raises `EngineRestarted` for each of those
requests, so their tasks go back to the queue and run again instead of failing, while the
worker goes on serving. Which request caused it cannot be told apart; a request that breaks the
engine every time it runs ends after `MAX_ATTEMPTS`, like one that kills its worker.
"""

import itertools
import logging
import math
import queue
import threading
import uuid
from typing import NoReturn

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput, RequestState

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
from model_loader.grammar import Grammars
from model_loader.loader import LoadedModel, decoder, eos_ids, memory
from model_loader.logits import AnswerLogits, answer_logits
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
            repetition_penalty=True, grammar=True, logprobs=True, penalties=True,
        )
        self._settings = settings
        self._eos_ids = eos_ids(loaded)
        self._decode = decoder(loaded)
        self._vocab_size = loaded.model.config.get_text_config().vocab_size
        self._grammars = Grammars(loaded.tokenizer, self._vocab_size, self._eos_ids)
        self._answers = _PerRequest()
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
        sink = TokenSink.opened(self._decode, params, on_chunk, interruption, self.flush, resume)
        if left := sink.tokens_left(params, self._eos_ids):
            answer = answer_logits(params, input_ids, resume.token_ids, self._grammars)
            self._run(input_ids + resume.token_ids, params, left, sink, answer)
        sink.close()
        return sink.outcome(len(input_ids), self._eos_ids, memory(self.loaded))

    def _run(
        self, input_ids: list[int], params: SamplingParams, max_new_tokens: int, sink: TokenSink,
        answer: AnswerLogits | None,
    ) -> None:
        manager = self._running_manager()
        key = self._answers.add(answer)
        request_id, outputs = self._submit(manager, input_ids, params, max_new_tokens, key)
        try:
            self._consume(manager, request_id, outputs, sink, answer)
        except BaseException:
            manager.cancel_request(request_id)  # so the batch does not go on decoding it for nobody
            raise
        finally:
            self._answers.remove(key)
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
                # Our processor runs Python per row at each step: neither captured in a graph nor a step ahead.
                use_cuda_graph=False,
                use_async_batching=False,
            ),
        )
        self._answers.join(manager)
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
        self, manager: ContinuousBatchingManager, input_ids: list[int], params: SamplingParams, max_new_tokens: int,
        answer_key: int,
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
            answer=answer_key,
            **self._per_request_sampling(params),
        )
        return request_id, outputs

    def _consume(
        self,
        manager: ContinuousBatchingManager,
        request_id: str,
        outputs: queue.Queue[GenerationOutput],
        sink: TokenSink,
        answer: AnswerLogits | None,
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
            if answer is not None and answer.failed:
                raise RuntimeError(f"generation failed: {answer.failed}")
            for token in output.generated_tokens[seen:]:
                seen += 1
                if sink.add(token, answer.logprob(token) if answer else None):
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
        (the manager indexes the sorted logits with it). The manager checks the types: 1 is not a float."""
        if params.temperature == 0:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        top_k = min(params.top_k, self._vocab_size) if params.top_k else self._vocab_size
        return {"temperature": float(params.temperature), "top_k": top_k, "top_p": float(params.top_p)}

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


class _PerRequest(ContinuousBatchingLogitsProcessor):
    """The manager's hook for each request's own `AnswerLogits`, run on that request's row first, before
    the batch's temperature, top-k and top-p. A request names its answer by the `answer` key it was
    added with (0: none). The rows are the requests with a new token, in the batch's order, as they
    are for the manager's own processors; their answers so far are read when the batch is prepared,
    after the previous step's tokens were added."""

    supported_kwargs: dict[str, type] = {"answer": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._answers: dict[int, AnswerLogits] = {}
        self._keys = itertools.count(1)
        self._rows: list[tuple[AnswerLogits, list[int]] | None] = []

    def join(self, manager: ContinuousBatchingManager) -> None:
        """Go first in a new manager's processors, before it sizes their arguments' storage (at start):
        transformers builds that list from the generation config alone."""
        processors = manager.logit_processor
        processors.logits_processor.insert(0, self)
        processors.tensors_required += 1
        processors.supported_keys.update(self.supported_kwargs)
        processors.do_processing = True

    def add(self, answer: AnswerLogits | None) -> int:
        if answer is None:
            return 0
        key = next(self._keys)
        self._answers[key] = answer
        return key

    def remove(self, key: int) -> None:
        self._answers.pop(key, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        self._rows = [self._row(request.state) for request in requests_with_new_token]
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)  # the rows are kept here instead

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """A failing answer (a grammar that cannot go on) fails its own request, not the batch."""
        for row, entry in enumerate(self._rows):
            if entry is not None and not entry[0].failed:
                answer, generated = entry
                try:
                    answer.step(generated, scores[row])
                except Exception as exc:
                    answer.failed = str(exc)
        return scores

    def _row(self, state: RequestState) -> tuple[AnswerLogits, list[int]] | None:
        answer = self._answers.get(state.logit_processor_kwargs.get("answer", 0))
        if answer is None:
            return None
        # A request the manager moved out of its cache and back starts again from its tokens so far,
        # counting those after its first prompt as generated (as its own output does).
        if state._true_initial_tokens:
            return answer, state.initial_tokens[state._true_initial_tokens :] + state.generated_tokens
        return answer, list(state.generated_tokens)


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
