"""The command-line client: submit a prompt, print the answer as it grows, then the task's stats.

    python run_client.py "Why is the sky blue?"
    echo "Why is the sky blue?" | python run_client.py
    python run_client.py --chat --system "Answer in one sentence."
    python run_client.py batch requests.jsonl


The answer is read from the task's event stream as the server pushes it (`--poll` polls
instead). It goes to stdout and everything else (stats, errors) to stderr, so the answer can be
piped. Exit codes: 0 done, 1 the task failed, 2 the server is unreachable, 3 the request was
rejected, 4 timed out, 130 interrupted (Ctrl-C also cancels the task on the server).

`batch FILE.jsonl` runs an OpenAI Batch file (one request per line) through the server's Batch API
with the official SDK, shows its progress, and writes the output (and any errors) beside the file,
as FILE.output.jsonl and FILE.errors.jsonl; Ctrl-C cancels the batch.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import openai
from httpx_sse import SSEError, connect_sse
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.protocol import (
    Chunk,
    ChatMessage,
    ErrorBody,
    GenerateAccepted,
    GenerateRequest,
    QueuePlace,
    Role,
    StreamedChunk,
    TaskStatus,
    TaskView,
)
from core.settings import get_settings

EXIT_INTERRUPTED = 130
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ClientError(Exception):
    """A failure the user must hear about; the subclass decides the exit code."""

    exit_code = 1


class TaskFailed(ClientError):
    """The worker reported an error, or the task could not be read back."""


class Unreachable(ClientError):
    exit_code = 2


class Rejected(ClientError):
    exit_code = 3


class TimedOut(ClientError):
    exit_code = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, with the prompt read from stdin when piped; settings are read here, not at import."""
    parser = argparse.ArgumentParser(
        description="Send a prompt to the queued chat API and print the answer as it is generated.",
        epilog="Exit codes: 0 done, 1 task failed, 2 server unreachable, 3 request rejected, 4 timed out, "
        "130 interrupted.",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted and stdin is piped")
    parser.add_argument("--chat", action="store_true", help="interactive conversation; /exit or EOF ends it")
    parser.add_argument("--url", default=get_settings().base_url, help="API base URL (default: %(default)s)")
    parser.add_argument("--system", help="system prompt (default: the server's)")
    parser.add_argument("--max-tokens", type=int, help="most new tokens to generate (default: the server's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 is greedy (default: the server's)")
    parser.add_argument("--poll", action="store_true", help="poll GET /task/{id} instead of following its event stream")
    parser.add_argument("--poll-interval", type=_positive, default=0.1, help="seconds between polls (default: 0.1)")
    parser.add_argument("--timeout", type=_positive, default=600, help="seconds to wait for each answer (default: 600)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer <key>' (default: API_KEY from the environment)")
    options = parser.parse_args(argv)
    if options.api_key is None and get_settings().api_key is not None:
        options.api_key = get_settings().api_key.get_secret_value()
    if options.chat and options.prompt is not None:
        parser.error("give a prompt or --chat, not both")
    if not options.chat and options.prompt is None:
        if sys.stdin.isatty():
            parser.error("give a prompt, pipe one on stdin, or use --chat")
        options.prompt = sys.stdin.read()
    options.url = options.url.rstrip("/")
    return options


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def build_request(
    options: argparse.Namespace, prompt: str | None = None, messages: list[ChatMessage] | None = None
) -> dict:
    """Validated here with the server's own model, so a bad option fails before anything is sent."""
    try:
        request = GenerateRequest(
            prompt=prompt,
            messages=messages,
            system_prompt=options.system,
            max_new_tokens=options.max_tokens,
            temperature=options.temperature,
        )
    except ValidationError as exc:
        raise Rejected(f"invalid request: {_describe_errors(exc.errors())}") from None
    return request.model_dump(mode="json", exclude_none=True)


def _send(client: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    """Every call goes through here, so any network failure reads as 'unreachable' with the URL."""
    try:
        return client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        url = str(client.base_url).rstrip("/")
        raise Unreachable(f"cannot reach the server at {url} ({type(exc).__name__}: {exc})") from None


def submit(client: httpx.Client, body: dict) -> str:
    """POST /generate; the task id on 202, Rejected with the server's reason otherwise."""
    response = _send(client, "POST", "/generate", json=body)
    if response.status_code != httpx.codes.ACCEPTED:
        raise Rejected(f"the server rejected the request (HTTP {response.status_code}): {error_detail(response)}")
    return GenerateAccepted.model_validate(response.json()).task_id


def poll(client: httpx.Client, task_id: str, interval_s: float, timeout_s: float) -> Iterator[TaskView]:
    """Each answer of GET /task/{id}, passing the cursor back so that each holds only new chunks;
    the last one also holds the whole text (one more poll, without the cursor)."""
    deadline = time.monotonic() + timeout_s
    params: dict[str, str] = {}
    while True:
        view = fetch(client, task_id, params)
        if view.status.finished:
            yield fetch(client, task_id, {}).model_copy(update={"chunks": view.chunks}) if params else view
            return
        yield view
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut(f"gave up after {timeout_s:g} s; task {task_id} is still {view.status}")
        params = {"after": view.cursor}
        time.sleep(min(interval_s, remaining))


RECONNECT_PAUSE_S = 1.0


def follow(client: httpx.Client, task_id: str, timeout_s: float) -> Iterator[TaskView]:
    """GET /task/{id}/events as views: one per chunk as the server pushes it, then the final one.

    A dropped connection is resumed where it stopped (Last-Event-ID), as a browser's EventSource
    would, until `timeout_s` runs out.
    """
    deadline = time.monotonic() + timeout_s
    last_id: str | None = None
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with connect_sse(client, "GET", f"/task/{task_id}/events", headers=headers) as source:
                if source.response.status_code != httpx.codes.OK:
                    source.response.read()
                    raise TaskFailed(
                        f"following task {task_id} failed (HTTP {source.response.status_code}): "
                        f"{error_detail(source.response)}"
                    )
                for event in source.iter_sse():
                    if time.monotonic() > deadline:
                        raise TimedOut(f"gave up after {timeout_s:g} s; task {task_id} has not finished")
                    if event.event == "result":
                        yield TaskView.model_validate(event.json())
                        return
                    if event.event == "error":
                        raise TaskFailed(f"task {task_id}: {event.json().get('detail')}")
                    if event.event == "queued":
                        place = QueuePlace.model_validate(event.json())
                        yield TaskView(task_id=task_id, status=TaskStatus.queued, text="", chunks=[],
                                       cursor=last_id or "0-0", **place.model_dump())
                        continue
                    last_id = event.id
                    chunk = StreamedChunk.model_validate(event.json())
                    yield TaskView(
                        task_id=task_id,
                        status=TaskStatus.running,
                        attempt=chunk.attempt,
                        text="",
                        chunks=[Chunk(cursor=event.id, text=chunk.text)],
                        cursor=event.id,
                    )
        except (httpx.ReadError, httpx.RemoteProtocolError, SSEError):
            if last_id is None or time.monotonic() > deadline:
                raise Unreachable(f"lost the event stream of task {task_id}") from None
            time.sleep(RECONNECT_PAUSE_S)
        except httpx.TransportError as exc:
            url = str(client.base_url).rstrip("/")
            raise Unreachable(f"cannot reach the server at {url} ({type(exc).__name__}: {exc})") from None


def fetch(client: httpx.Client, task_id: str, params: dict[str, str]) -> TaskView:
    response = _send(client, "GET", f"/task/{task_id}", params=params)
    if response.status_code != httpx.codes.OK:
        raise TaskFailed(f"polling task {task_id} failed (HTTP {response.status_code}): {error_detail(response)}")
    return TaskView.model_validate(response.json())


def in_line(position: int, estimated_start_s: float | None) -> str:
    """"3rd in line, about 20 s": position 0 is next, so it is 1st in line."""
    n = position + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    wait = "" if estimated_start_s is None else f", about {estimated_start_s:.0f} s"
    return f"{n}{suffix} in line{wait}"


def stream_text(views: Iterable[TaskView]) -> TaskView:
    """Write each new chunk as it arrives; the last view, which holds the result, is returned.

    A worker that dies or stops mid-answer shows as a pause: the attempt that takes over goes on
    after the last chunk written.
    """
    view: TaskView | None = None
    last_char = "\n"
    told: int | None = None
    for view in views:
        if view.queue_position is not None and view.queue_position != told:
            print(f"[{in_line(view.queue_position, view.estimated_start_s)}]", file=sys.stderr, flush=True)
            told = view.queue_position
        for chunk in view.chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last_char = chunk.text[-1:] or last_char
    if last_char != "\n":
        print(flush=True)
    assert view is not None, "poll and follow yield at least once"
    return view


def answer(client: httpx.Client, body: dict, options: argparse.Namespace) -> TaskView:
    """One task from submission to its result; TaskFailed when the worker reported an error."""
    task_id = submit(client, body)
    views = (
        poll(client, task_id, options.poll_interval, options.timeout)
        if options.poll
        else follow(client, task_id, options.timeout)
    )
    try:
        view = stream_text(views)
    except KeyboardInterrupt:
        cancel(client, task_id)
        raise
    if view.status == TaskStatus.failed:
        raise TaskFailed(f"task {task_id} failed: {view.error or 'no error message'}")
    return view


def cancel(client: httpx.Client, task_id: str) -> None:
    """Ctrl-C: tell the server, so the worker stops generating for nobody (best effort, on the way out)."""
    try:
        response = client.delete(f"/task/{task_id}", timeout=5)
    except httpx.HTTPError:
        print(f"\ncould not cancel task {task_id}", file=sys.stderr)
        return
    if response.status_code == httpx.codes.ACCEPTED:
        print(f"\ncancelled task {task_id}", file=sys.stderr)


def render_stats(view: TaskView, console: Console) -> None:
    """A two-column table of what the worker measured; fields the server left out are skipped."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    if view.usage:
        table.add_row("tokens", f"{view.usage.prompt_tokens} prompt / {view.usage.completion_tokens} completion")
    if view.timings:
        t = view.timings
        first = f"{t.time_to_first_token_s:.2f} s" if t.time_to_first_token_s is not None else "-"
        table.add_row("speed", f"{t.tokens_per_second:.1f} tok/s")
        table.add_row("first token", first)
        table.add_row("queued", f"{t.queued_s:.2f} s")
        table.add_row("total", f"{t.total_s:.2f} s")
    if view.memory:
        m = view.memory
        table.add_row("memory", f"{m.device}, weights {_mb(m.model_weight_bytes)}, peak {_mb(m.peak_bytes)}")
    table.add_row("finish", view.finish_reason or "-")
    table.add_row("worker", f"{view.worker or '-'} ({view.model or 'unknown model'})")
    console.print(table)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.0f} MB"


def error_detail(response: httpx.Response) -> str:
    """The server's `detail`, whether a sentence (ErrorBody) or FastAPI's list of field errors."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        return _describe_errors(detail)
    try:
        return ErrorBody.model_validate(body).detail
    except ValidationError:
        return str(body)[:500]


def _describe_errors(errors: Iterable[dict]) -> str:
    """'field: message' for each error; the 'body' prefix of FastAPI's locations says nothing."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = error.get("msg", "invalid")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def read_turns(prompt: str = "you> ") -> Iterator[str]:
    """The user's lines until /exit or EOF; blank lines are skipped."""
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            return
        if line == "/exit":
            return
        if line:
            yield line


def chat(client: httpx.Client, options: argparse.Namespace, stats: Console) -> None:
    """The conversation so far is sent every turn; a turn that fails is reported and left out of it."""
    history: list[ChatMessage] = []
    for line in read_turns():
        turn = [*history, ChatMessage(role=Role.user, content=line)]
        try:
            view = answer(client, build_request(options, messages=turn), options)
        except (Rejected, TaskFailed, TimedOut) as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        render_stats(view, stats)
        history = [*turn, ChatMessage(role=Role.assistant, content=view.text)]


def run(options: argparse.Namespace) -> None:
    stats = Console(stderr=True)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    with httpx.Client(base_url=options.url, headers=headers, timeout=REQUEST_TIMEOUT) as client:
        if options.chat:
            chat(client, options, stats)
        else:
            render_stats(answer(client, build_request(options, prompt=options.prompt), options), stats)


BATCH_ENDED = ("completed", "failed", "expired", "cancelled")


def parse_batch_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_client.py batch", description="Run an OpenAI Batch file on the server; write its output beside it.",
        epilog="Exit codes: 0 completed, 1 failed, expired or cancelled, 2 server unreachable, 3 rejected, 130 interrupted.",
    )
    parser.add_argument("file", type=Path, help="the JSONL file: one request per line, as OpenAI's Batch API takes")
    parser.add_argument("--url", default=get_settings().base_url, help="API base URL (default: %(default)s)")
    parser.add_argument("--api-key", help="the bearer key (default: API_KEY from the environment)")
    parser.add_argument("--poll-interval", type=_positive, default=1.0, help="seconds between looks (default: 1)")
    options = parser.parse_args(argv)
    if options.api_key is None:
        key = get_settings().api_key
        options.api_key = key.get_secret_value() if key is not None else "unused"
    if not options.file.is_file():
        parser.error(f"{options.file} is not a file")
    return options


def run_batch(options: argparse.Namespace) -> str:
    """The batch's end status, once its files are written beside the input."""
    client = openai.OpenAI(base_url=f"{options.url.rstrip('/')}/v1", api_key=options.api_key, max_retries=3)
    first = next((line for line in options.file.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
    endpoint = json.loads(first).get("url", "/v1/chat/completions")
    try:
        uploaded = client.files.create(file=options.file.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    except openai.APIConnectionError as exc:
        raise Unreachable(f"cannot reach {options.url}: {exc}") from exc
    except openai.APIStatusError as exc:
        raise Rejected(f"{exc.status_code}: {exc.message}") from exc
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            shown = progress.add_task(f"{batch.id} validating", total=None)
            while batch.status not in BATCH_ENDED:
                time.sleep(options.poll_interval)
                batch = client.batches.retrieve(batch.id)
                counts = batch.request_counts
                progress.update(shown, description=f"{batch.id} {batch.status}", total=counts.total if counts else None,
                                completed=(counts.completed + counts.failed) if counts else 0)
    except KeyboardInterrupt:
        client.batches.cancel(batch.id)
        print(f"\ncancelled {batch.id}: what finished is kept in its output file", file=sys.stderr)
        raise
    for error in (batch.errors.data if batch.errors else None) or []:
        print(f"line {error.line}: {error.message}", file=sys.stderr)
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if file_id:
            target = options.file.with_suffix(f".{kind}.jsonl")
            target.write_bytes(client.files.content(file_id).content)
            print(f"{kind}: {target}", file=sys.stderr)
    return batch.status


def main(argv: list[str] | None = None) -> int:
    """The one place failures become messages and exit codes, Ctrl-C included."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["batch"] and len(arguments) > 1:
        try:
            return 0 if run_batch(parse_batch_args(arguments[1:])) == "completed" else 1
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    options = parse_args(argv)
    try:
        run(options)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
