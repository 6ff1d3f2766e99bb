"""The Responses stream's numbering, as a pure function of a task's chunks (no Redis, no model)."""

import pytest
from app.openai.responses.events import ResponseEvents
from app.openai.responses.protocol import OutputMessage, OutputText, Response

pytestmark = pytest.mark.fast

ITEM = "msg_1"
BASE = Response(
    id="resp_1", status="queued", output=[], model="m", created_at=0, instructions=None, max_output_tokens=8,
    temperature=0, top_p=1, background=True, store=True,
)


def finished(text: str, status: str = "completed") -> Response:
    item = OutputMessage(id=ITEM, status="completed", content=[OutputText(text=text)])
    return BASE.model_copy(update={"status": status, "output": [item] if text or status == "completed" else []})


def run(chunks: list[str], end: Response, after: int = -1) -> list:
    events = ResponseEvents(ITEM, BASE, after)
    out = events.start()
    for text in chunks:
        out += events.chunk(text)
    return out + events.end(end)


def test_a_whole_stream_is_numbered_in_order() -> None:
    events = run(["a", "b"], finished("ab"))
    assert [(e.sequence_number, e.type) for e in events] == [
        (0, "response.created"), (1, "response.queued"), (2, "response.in_progress"),
        (3, "response.output_item.added"), (4, "response.content_part.added"),
        (5, "response.output_text.delta"), (6, "response.output_text.delta"),
        (7, "response.output_text.done"), (8, "response.content_part.done"), (9, "response.output_item.done"),
        (10, "response.completed"),
    ]


def test_a_replay_after_n_is_the_tail_of_the_whole() -> None:
    whole = run(["a", "b", "c"], finished("abc"))
    for after in range(-1, len(whole)):
        tail = run(["a", "b", "c"], finished("abc"), after=after)
        assert [e.model_dump() for e in tail] == [e.model_dump() for e in whole if e.sequence_number > after]


def test_an_answer_cancelled_before_any_text_has_its_terminal_event_alone() -> None:
    events = run([], finished("", "cancelled"))
    assert [e.type for e in events][-1] == "response.cancelled" and len(events) == 3
