"""OpenAI's /v1/batches: create, retrieve, list and cancel, each key seeing only its own batches.

The routes only record: app.openai.batches.driver advances every batch in the background.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from app import webhooks
from app.deps import Services, ServicesDep
from app.errors import Refusal
from app.openai.batches.protocol import BatchCreateRequest, BatchList, BatchObject
from app.openai.pages import page_after
from app.security import CallerTag
from core.batches import Batch

router = APIRouter()


@router.post("/batches", response_model=BatchObject)
async def create_batch(body: BatchCreateRequest, services: ServicesDep, caller: CallerTag) -> BatchObject:
    if await run_in_threadpool(services.files.get, body.input_file_id, caller) is None:
        raise Refusal(404, f"No such File object: {body.input_file_id[:80]}", param="input_file_id")
    batch = await run_in_threadpool(
        services.batches.create, caller, body.endpoint, body.input_file_id,
        services.settings.batch_window_s, body.completion_window, body.metadata or {},
        webhooks.target(services.settings, caller),
    )
    return BatchObject.of(batch)


@router.get("/batches", response_model=BatchList)
async def list_batches(
    services: ServicesDep, caller: CallerTag, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """Newest first, `after` the last id of the page before, as the SDK pages them."""
    batches, more = page_after((await run_in_threadpool(services.batches.listed, caller))[::-1], after, limit)
    page = [BatchObject.of(b) for b in batches]
    return BatchList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                     has_more=more)


@router.get("/batches/{batch_id}", response_model=BatchObject)
async def retrieve_batch(batch_id: str, services: ServicesDep, caller: CallerTag) -> BatchObject:
    return BatchObject.of(await _visible(batch_id, services, caller))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, services: ServicesDep, caller: CallerTag) -> BatchObject:
    """Queued lines are cancelled, running ones end, what finished is kept; the batch ends as cancelled."""
    batch = await _visible(batch_id, services, caller)
    cancelling = await run_in_threadpool(services.batches.move, batch, ("validating", "in_progress"), "cancelling",
                                         ending="cancelled")
    if not cancelling:
        current = await _visible(batch_id, services, caller)
        if current.status not in ("cancelling", "cancelled"):
            raise Refusal(409, f"the batch is {current.status}: it can no longer be cancelled", param="batch_id")
    return BatchObject.of(await _visible(batch_id, services, caller))


async def _visible(batch_id: str, services: Services, caller: str | None) -> Batch:
    """The batch, or OpenAI's 404 for an unknown id and another key's batch alike."""
    batch = await run_in_threadpool(services.batches.get, batch_id, caller)
    if batch is None:
        raise Refusal(404, f"No such Batch object: {batch_id[:80]}", param="batch_id")
    return batch
