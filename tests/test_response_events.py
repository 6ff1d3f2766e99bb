"""The Responses stream's numbering, as a pure function of a task's chunks (no Redis, no model)."""

from app.openai.responses.events import FIRST_DELTA, ResponseEvents
from app.openai.responses.protocol import OutputMessage, OutputText, Response

ITEM = "msg_1"
BASE = Response(
    id="resp_1", status="queued", output=[], model="m", created_at=0, instructions=None, max_output_tokens=8,
    temperature=0, top_p=1, background=True, store=True,
)


def finished(text: str, status: str = "completed") -> Response:
    item = OutputMessage(id=ITEM, status="completed", content=[OutputText(text=text)])
    return BASE.model_copy(update={"status": status, "output": [item] if text or status == "completed" else []})


def run(chunks: list[str], end: Response, after: int = -1, earlier: int = 0, attempt: int = 1) -> list:
    events = ResponseEvents(ITEM, BASE, after)
    assert events.rebase(attempt, earlier) is None
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


def test_a_restarted_attempt_numbers_after_the_old_one_and_refuses_a_reader_of_it() -> None:
    """Attempt 1 published 3 chunks (numbers 5 to 7); attempt 2's start after them and a spare."""
    restarted = run(["x"], finished("x"), earlier=3, attempt=2)
    deltas = [e.sequence_number for e in restarted if e.type == "response.output_text.delta"]
    assert deltas == [FIRST_DELTA + 3 + 1]
    for seen in (5, 7, 8):  # read some of attempt 1's text, or the spare number of a broken stream
        error = ResponseEvents(ITEM, BASE, seen).rebase(2, 3)
        assert error is not None and error.code == "answer_restarted" and error.sequence_number == 8
    assert ResponseEvents(ITEM, BASE, 4).rebase(2, 3) is None, "no text read yet: nothing to join"


def test_a_live_reader_meeting_a_new_attempt_gets_the_spare_number() -> None:
    events = ResponseEvents(ITEM, BASE, -1)
    events.rebase(1, 0)
    events.start()
    events.chunk("a")
    events.chunk("b")
    assert events.restarted().sequence_number == FIRST_DELTA + 2  # the spare before attempt 2's first delta
    assert ResponseEvents(ITEM, BASE, FIRST_DELTA + 2).rebase(2, 2) is not None
