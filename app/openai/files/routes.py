"""OpenAI's /v1/files: upload, list, retrieve, download and delete, each key seeing only its own files."""

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.deps import ServicesDep
from app.errors import Refusal
from app.openai.files.protocol import PURPOSES, FileDeleted, FileList, FileObject
from app.openai.pages import page_after
from app.security import CallerTag
from core.files import OverBudget, StoredFile
from core.settings import Settings

router = APIRouter()
FILES_PATH = "/v1/files"
MULTIPART_ROOM = 65_536  # a form's own bytes around the file


def upload_limit(settings: Settings) -> int:
    """The body an upload may send: the largest file and its form."""
    return settings.file_max_bytes + MULTIPART_ROOM


@router.post("/files", response_model=FileObject)
async def upload(file: UploadFile, purpose: Annotated[str, Form()], services: ServicesDep,
                 caller: CallerTag) -> FileObject:
    if purpose not in PURPOSES:
        raise Refusal(400, f"purpose: this server keeps files for {', '.join(PURPOSES)}, not {purpose[:40]!r}",
                      param="purpose")
    limit = services.settings.file_max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise Refusal(413, f"file: larger than this server's limit of {limit} bytes (FILE_MAX_BYTES)", param="file")
    try:
        stored = await run_in_threadpool(services.files.create, caller, file.filename or "upload", purpose, data)
    except OverBudget as exc:
        raise Refusal(413, f"file: {exc}", param="file") from exc
    return FileObject.of(stored)


@router.get("/files", response_model=FileList)
async def list_files(
    services: ServicesDep, caller: CallerTag, purpose: str | None = None, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """OpenAI's cursor page: newest first by default, `after` the last id of the page before."""
    stored = await run_in_threadpool(services.files.listed, caller)
    files = [f for f in (stored if order == "asc" else stored[::-1]) if purpose is None or f.purpose == purpose]
    chosen, more = page_after(files, after, limit)
    page = [FileObject.of(f) for f in chosen]
    return FileList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                    has_more=more)


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve(file_id: str, services: ServicesDep, caller: CallerTag) -> FileObject:
    return FileObject.of(await _visible(file_id, services, caller))


@router.get("/files/{file_id}/content", response_class=Response)
async def content(file_id: str, services: ServicesDep, caller: CallerTag) -> Response:
    stored = await _visible(file_id, services, caller)
    data = await run_in_threadpool(services.files.content, stored)
    return Response(data, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete(file_id: str, services: ServicesDep, caller: CallerTag) -> FileDeleted:
    stored = await _visible(file_id, services, caller)
    await run_in_threadpool(services.files.delete, stored)
    return FileDeleted(id=stored.id)


async def _visible(file_id: str, services: ServicesDep, caller: str | None) -> StoredFile:
    """The file, or OpenAI's 404 for an unknown id and another key's file alike."""
    stored = await run_in_threadpool(services.files.get, file_id, caller)
    if stored is None:
        raise Refusal(404, f"No such File object: {file_id[:80]}", param="id")
    return stored
