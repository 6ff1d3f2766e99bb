"""Advances every batch that has not ended, from any API process: validate, feed, finish, write the files.

Each API process runs one driver. A pass takes each active batch under a lock in Redis, renewed
while it works however long the step takes (so one process advances a batch at a time; a process
that dies stops renewing, its lock lapses within LOCK_S, and another goes on) and does the next
step that its record says is due:

- validating: every line is checked as its live route checks a request (JSON, a unique custom_id,
  POST, the url the batch names, the body). Any bad line fails the batch, its errors naming lines.
- in_progress: lines become tasks at background priority in the key's lane, at most
  BATCH_MAX_IN_FLIGHT of them queued or running at once, under ids derived from the batch and
  the line, so a line cut short by a restart is found again rather than sent twice. Past the
  window, or once cancelled, no more are sent and those still queued are cancelled; the running
  ones end.
- finalizing: the output and error files are written under ids derived from the batch (a second
  writer finds them there), then the batch moves to its end in one script: once, however many
  processes and restarts took part.
"""

import json
import time
import uuid
from typing import Any

from fastapi import HTTPException
from redis.exceptions import LockNotOwnedError

from app import webhooks
from app.admission import admit
from app.background import every, renewed
from app.deps import Services
from app.openai.batches.doors import DOORS, Door, is_refusal, refusal
from app.openai.batches.protocol import LineError, OutputLine
from core import metrics
from core.batches import ANYONE, Batch, line_task_ids
from core.files import FileStore
from core.protocol import TaskStatus
from model_loader.source import model_name

PASS_S = 0.5
LOCK_S = 30  # renewed while a pass works on the batch
MAX_ERRORS = 100  # a bad file's errors listed, at most
UNLIMITED = 2**62  # what the server writes is not held to the key's budget
REFUSED_PREFIX = "!"  # a line refused at submission: its status and error body follow


async def run(services: Services) -> None:
    await every(PASS_S, BatchDriver(services).pass_once, "a batch pass")


class BatchDriver:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.batches = services.batches
        self.files: FileStore = services.files

    def pass_once(self) -> None:
        for batch_id in self.batches.active():
            lock = self.services.redis.lock(f"batch:{batch_id}:lock", timeout=LOCK_S, blocking=False,
                                            thread_local=False)  # renewed from another thread
            if not lock.acquire():
                continue
            try:
                with renewed(lock):
                    batch = self.batches.get(batch_id, None)
                    if batch is not None:
                        self.advance(batch)
            finally:
                try:
                    lock.release()
                except LockNotOwnedError:  # it lapsed meanwhile; whoever holds it now keeps it
                    pass

    def advance(self, batch: Batch) -> None:
        if batch.status == "validating":
            self._validate(batch)
        elif batch.status in ("in_progress", "cancelling"):
            self._run(batch)
        elif batch.status == "finalizing":
            self._finalize(batch)

    def _validate(self, batch: Batch) -> None:
        door = DOORS[batch.endpoint]
        stored = self.files.get(batch.input_file_id, _owner(batch))
        data = self.files.content(stored) if stored is not None else None
        lines, errors = ([], [LineError(code="invalid_file", message="the input file was deleted")]) \
            if data is None else _read_lines(data, batch, door, self.services)
        if errors:
            if self.batches.move(batch, ("validating",), "failed", errors=[e.model_dump() for e in errors[:MAX_ERRORS]]):
                webhooks.emit(self.services, batch.webhook, "batch.failed", batch.id)
            return
        self.batches.add_lines(batch, lines)
        self.batches.move(batch, ("validating",), "in_progress", total=len(lines))

    def _run(self, batch: Batch) -> None:
        """Count the open lines that ended, stop or feed lines, and go to finalizing once nothing is left to
        wait for. A pass reads the open lines only (at most BATCH_MAX_IN_FLIGHT), however long the file."""
        ending = batch.ending or ("cancelled" if batch.status == "cancelling" else None)
        if ending is None and time.time() >= batch.expires_at:
            ending = "expired"
            self.batches.note_ending(batch, ending)
        tasks = self.batches.open_lines(batch)
        statuses = self._statuses(tasks)
        ended = {i for i, line in statuses.items() if all(s is None or s.finished for s in line)}
        completed = {i for i in ended if all(s == TaskStatus.succeeded for s in statuses[i])}
        self.batches.close_lines(batch, sorted(completed), sorted(ended - completed))
        unfinished = [i for i in tasks if i not in ended]
        if ending is not None:
            for index in unfinished:  # those queued; the running ones end as they would
                for task_id, status in zip(tasks[index], statuses[index]):
                    if status == TaskStatus.queued:
                        self.services.store.request_cancel(task_id)
            if not unfinished:
                self.batches.move(batch, ("in_progress", "cancelling"), "finalizing", ending=ending)
            return
        if batch.submitted >= batch.total and not unfinished:
            self.batches.move(batch, ("in_progress",), "finalizing", ending="completed")
            return
        room = self.services.settings.batch_max_in_flight - len(unfinished)
        for index in range(batch.submitted, min(batch.total, batch.submitted + max(room, 0))):
            if not self._submit(batch, index):
                break  # the key's queue is full, or it is over a rate: the next pass goes on

    def _submit(self, batch: Batch, index: int) -> bool:
        """Queue the line's tasks (those not queued already); False when admission says wait."""
        door = DOORS[batch.endpoint]
        line = self.batches.line(batch, index)
        try:
            _, requests = door.parse(line["body"], self.services)  # type: ignore[arg-type]
            ids = line_task_ids(batch.id, index, len(requests))
            for task_id, request in zip(ids, requests):
                if self.services.store.status(task_id) is None:
                    admit(request, self.services, _owner(batch),
                          background=True, task_id=task_id)
        except Exception as exc:
            if isinstance(exc, HTTPException) and exc.status_code in (429, 503):
                return False
            if not is_refusal(exc):
                raise
            status, body = refusal(door, exc)
            self.batches.note_tasks(batch, index, [REFUSED_PREFIX + json.dumps({"status": status, "body": body})],
                                    refused=True)
            return True
        self.batches.note_tasks(batch, index, ids)
        return True

    def _statuses(self, tasks: dict[int, list[str]]) -> dict[int, list[TaskStatus | None]]:
        """Each line's task statuses, read in one round trip."""
        flat = self.services.store.statuses([task_id for ids in tasks.values() for task_id in ids])
        found: dict[int, list[TaskStatus | None]] = {}
        cursor = 0
        for index, ids in tasks.items():
            found[index] = flat[cursor : cursor + len(ids)]
            cursor += len(ids)
        return found

    def _finalize(self, batch: Batch) -> None:
        door = DOORS[batch.endpoint]
        tasks = self.batches.tasks(batch)
        outputs: list[str] = []
        errors: list[str] = []
        for index, line in enumerate(self.batches.lines(batch)):
            entry, ok = self._entry(batch, door, line, index, tasks.get(index))
            (outputs if ok else errors).append(entry.model_dump_json())
        owner = _owner(batch)
        fields: dict[str, Any] = {"completed": len(outputs), "failed": len(errors)}
        for kind, entries in (("output", outputs), ("error", errors)):
            if entries:
                file_id = "file-" + uuid.uuid5(uuid.NAMESPACE_URL, f"batch/{batch.id}/{kind}").hex
                data = ("\n".join(entries) + "\n").encode()
                self.files.create(owner, f"{batch.id}_{kind}.jsonl", "batch_output", data, file_id, UNLIMITED)
                fields[f"{kind}_file_id"] = file_id
        if self.batches.move(batch, ("finalizing",), batch.ending or "completed", **fields):
            webhooks.emit(self.services, batch.webhook, f"batch.{batch.ending or 'completed'}", batch.id)
            self.batches.forget_lines(batch)
            model = model_name(self.services.settings)
            for outcome in ("completed", "failed"):
                self.services.redis.hincrbyfloat(metrics.KEY, metrics.batch_lines(model, outcome), fields[outcome])

    def _entry(
        self, batch: Batch, door: Door, line: dict[str, Any], index: int, task_ids: list[str] | None
    ) -> tuple[OutputLine, bool]:
        """The line's entry in the output file (True) or the error file (False)."""
        custom_id = str(line["custom_id"])
        entry_id = f"batch_req_{uuid.uuid5(uuid.NAMESPACE_URL, f'batch/{batch.id}/{index}').hex}"
        if task_ids is None:
            code = "batch_expired" if batch.ending == "expired" else "batch_cancelled"
            message = f"the batch ended ({batch.ending}) before this request was sent"
            return OutputLine(id=entry_id, custom_id=custom_id, response=None,
                              error={"code": code, "message": message}), False
        if _refused(task_ids):
            refused = json.loads(task_ids[0][len(REFUSED_PREFIX) :])
            response = {"status_code": refused["status"], "request_id": entry_id, "body": refused["body"]}
            return OutputLine(id=entry_id, custom_id=custom_id, response=response, error=None), False
        views = [self.services.store.view(task_id) for task_id in task_ids]
        if all(view is not None and view.status == TaskStatus.succeeded for view in views):
            parsed, _ = door.parse(line["body"], self.services)
            body = door.answer(parsed, task_ids, views, self.services)  # type: ignore[arg-type]
            response = {"status_code": 200, "request_id": task_ids[0], "body": body}
            return OutputLine(id=entry_id, custom_id=custom_id, response=response, error=None), True
        failed = next((v for v in views if v is None or v.status != TaskStatus.succeeded), None)
        cancelled = failed is not None and failed.status == TaskStatus.cancelled
        code = ("batch_expired" if batch.ending == "expired" else "batch_cancelled") if cancelled else "server_error"
        message = "the request was cancelled with its batch" if cancelled else \
            (failed.error if failed is not None and failed.error else "the generation failed")
        return OutputLine(id=entry_id, custom_id=custom_id, response=None,
                          error={"code": code, "message": message}), False


def _owner(batch: Batch) -> str | None:
    return None if batch.owner == ANYONE else batch.owner


def _refused(task_ids: list[str]) -> bool:
    return bool(task_ids) and task_ids[0].startswith(REFUSED_PREFIX)


def _read_lines(data: bytes, batch: Batch, door: Door, services: Services) -> tuple[list[dict], list[LineError]]:
    """The file's lines, each checked as its live route checks a request; the errors name the lines."""
    lines: list[dict] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [LineError(code="invalid_file", message="the file is not UTF-8 text")]
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        problem = _line_problem(raw, batch, door, services, seen)
        if problem is not None:
            errors.append(problem.model_copy(update={"line": number}))
            continue
        line = json.loads(raw)
        seen.add(line["custom_id"])
        lines.append({"custom_id": line["custom_id"], "body": line["body"]})
    if not lines and not errors:
        errors.append(LineError(code="empty_file", message="the file holds no requests"))
    return lines, errors


def _line_problem(raw: str, batch: Batch, door: Door, services: Services, seen: set[str]) -> LineError | None:
    try:
        line = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LineError(code="invalid_json_line", message=f"the line is not JSON: {exc}")
    if not isinstance(line, dict):
        return LineError(code="invalid_json_line", message="the line is not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(code="missing_required_parameter", message="custom_id must be a string", param="custom_id")
    if custom_id in seen:
        return LineError(code="duplicate_custom_id", message=f"custom_id {custom_id!r} is used twice",
                         param="custom_id")
    if line.get("method") != "POST":
        return LineError(code="invalid_method", message="method must be POST", param="method")
    if line.get("url") != batch.endpoint:
        return LineError(code="mismatched_endpoint", param="url",
                         message=f"url must be the batch's endpoint, {batch.endpoint}, not {str(line.get('url'))[:80]!r}")
    if not isinstance(line.get("body"), dict):
        return LineError(code="invalid_request", message="body must be a JSON object", param="body")
    try:
        door.parse(line["body"], services)
    except Exception as exc:
        if not is_refusal(exc):
            raise
        _, body = refusal(door, exc)
        error = body.get("error", {})
        return LineError(code="invalid_request", message=str(error.get("message")), param=error.get("param"))
    return None
