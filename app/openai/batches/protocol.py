"""OpenAI's batch objects, as the official SDK parses them."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.openai.responses.protocol import MAX_METADATA_KEYS, MetadataKey, MetadataValue
from core.batches import Batch

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA_KEYS)


class LineError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, batch: Batch) -> "BatchObject":
        errors = BatchErrors(data=[LineError.model_validate(e) for e in batch.errors]) if batch.errors else None
        return cls(
            id=batch.id, endpoint=batch.endpoint, errors=errors, input_file_id=batch.input_file_id,
            completion_window=batch.completion_window, status=batch.status,  # type: ignore[arg-type]
            output_file_id=batch.output_file_id, error_file_id=batch.error_file_id, created_at=batch.created_at,
            expires_at=batch.expires_at, request_counts=RequestCounts(
                total=batch.total, completed=batch.completed, failed=batch.failed
            ),
            metadata=batch.metadata or None, **batch.stamps,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class OutputLine(BaseModel):
    """One line of a batch's output or error file."""

    id: str
    custom_id: str
    response: dict[str, Any] | None
    error: dict[str, Any] | None
