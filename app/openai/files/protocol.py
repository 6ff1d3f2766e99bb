"""OpenAI's file objects, as the official SDK parses them."""

from typing import Literal

from pydantic import BaseModel

from core.files import StoredFile

PURPOSES = ("batch",)  # what this server keeps files for


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, stored: StoredFile) -> "FileObject":
        return cls(id=stored.id, bytes=stored.bytes, created_at=stored.created_at, filename=stored.filename,
                   purpose=stored.purpose)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
