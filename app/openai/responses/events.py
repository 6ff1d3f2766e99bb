"""A response's stream events, numbered from its task's stream alone.

Every number follows from what Redis holds (the chunks, their count, the task's end), never
from what one API process remembers: any process replays the same events with the same
`sequence_number`s, and so resumes a stream `starting_after` any of them, after the API that
started it was killed. The layout:

    0 response.created, 1 response.queued,
    2 response.in_progress, 3 response.output_item.added, 4 response.content_part.added
      (at the first chunk, or at the end for an answer with no text),
    FIRST_DELTA + i  response.output_text.delta for chunk i,
    then output_text.done, content_part.done, output_item.done and the terminal event
      (completed, incomplete or cancelled), or response.failed alone.

A response that may call tools (`whole_at_end`) cannot tell text from calls until its answer ends, so
its chunks send nothing after `response.in_progress` (2), and at the end each output item is sent
whole, numbered from 3: a message as output_item.added, content_part.added, one output_text.delta,
output_text.done, content_part.done, output_item.done; a function call as output_item.added, one
function_call_arguments.delta, function_call_arguments.done, output_item.done; then the terminal event.

A worker that dies or stops mid-answer changes nothing here: the attempt that takes the task
over appends after the chunks already published, so the numbers run on across a takeover. An
`error` event (Redis away too long, the response expired) repeats the number of the last event
before it: resuming from it loses nothing.
"""

from collections.abc import Iterable

from app.openai.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    Event,
    OutputFunctionCall,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseEvent,
    TextDeltaEvent,
    TextDoneEvent,
)

FIRST_DELTA = 5
TERMINAL = {"completed", "incomplete", "cancelled", "failed"}


class ResponseEvents:
    """The events after `after` for one reader, fed the task's chunks as they come.

    `queued` is the response as it was queued: the snapshots before the end are copies of it.
    """

    def __init__(self, item_id: str, queued: Response, after: int, whole_at_end: bool = False) -> None:
        self.item_id = item_id
        self.queued = queued
        self.after = after
        self.whole_at_end = whole_at_end
        self.chunks = 0  # sent or skipped
        self.opened = False
        self.last = after  # the highest number sent

    def start(self) -> list[Event]:
        return self._visible(
            [ResponseEvent(type=f"response.{kind}", sequence_number=n, response=self.queued)
             for n, kind in enumerate(("created", "queued"))]
        )

    def chunk(self, text: str) -> list[Event]:
        if self.whole_at_end:
            return self._visible(self._in_progress_once())
        events = self._open()
        events.append(TextDeltaEvent(sequence_number=self._next(), item_id=self.item_id, delta=text))
        self.chunks += 1
        return self._visible(events)

    def end(self, response: Response) -> list[Event]:
        """The closing events; a failed response, or one that ended with no output, has only its terminal one."""
        assert response.status in TERMINAL
        if self.whole_at_end and response.status != "failed" and response.output:
            return self._visible(self._in_progress_once() + self._whole_items(response))
        n = self._next()
        if response.status == "failed" or not response.output:
            terminal = ResponseEvent(type=f"response.{response.status}", sequence_number=n, response=response)
            return self._visible([terminal])
        events = self._open()
        item = response.output[0]
        part = item.content[0]
        events += [
            TextDoneEvent(sequence_number=n, item_id=self.item_id, text=part.text),
            ContentPartEvent(type="response.content_part.done", sequence_number=n + 1, item_id=self.item_id, part=part),
            OutputItemEvent(type="response.output_item.done", sequence_number=n + 2, item=item),
            ResponseEvent(type=f"response.{response.status}", sequence_number=n + 3, response=response),
        ]
        return self._visible(events)

    def broken(self, message: str) -> ErrorEvent:
        """This connection ends here; the response may go on, and a stream resumed from the last
        event before this one misses nothing."""
        return ErrorEvent(sequence_number=max(self.last, 0), code="stream_interrupted", message=message)

    def _in_progress_once(self) -> list[Event]:
        if self.opened:
            return []
        self.opened = True
        return [ResponseEvent(type="response.in_progress", sequence_number=2, response=self._in_progress())]

    def _whole_items(self, response: Response) -> list[Event]:
        events: list[Event] = []
        for index, item in enumerate(response.output):
            n = 3 + len(events)
            events += _message_events(n, index, item) if isinstance(item, OutputMessage) else _call_events(n, index, item)
        events.append(ResponseEvent(type=f"response.{response.status}", sequence_number=3 + len(events),
                                    response=response))
        return events

    def _open(self) -> list[Event]:
        if self.opened:
            return []
        self.opened = True
        item = OutputMessage(id=self.item_id, status="in_progress", content=[])
        return [
            ResponseEvent(type="response.in_progress", sequence_number=2, response=self._in_progress()),
            OutputItemEvent(type="response.output_item.added", sequence_number=3, item=item),
            ContentPartEvent(
                type="response.content_part.added", sequence_number=4, item_id=self.item_id, part=OutputText(text="")
            ),
        ]

    def _in_progress(self) -> Response:
        return self.queued.model_copy(update={"status": "in_progress"})

    def _next(self) -> int:
        return FIRST_DELTA + self.chunks

    def _visible(self, events: Iterable[Event]) -> list[Event]:
        shown = [event for event in events if event.sequence_number > self.after]
        self.last = max([self.last, *(event.sequence_number for event in shown)])
        return shown



def _message_events(n: int, index: int, item: OutputMessage) -> list[Event]:
    part = item.content[0]
    added = item.model_copy(update={"status": "in_progress", "content": []})
    return [
        OutputItemEvent(type="response.output_item.added", sequence_number=n, output_index=index, item=added),
        ContentPartEvent(type="response.content_part.added", sequence_number=n + 1, item_id=item.id,
                         output_index=index, part=OutputText(text="")),
        TextDeltaEvent(sequence_number=n + 2, item_id=item.id, output_index=index, delta=part.text),
        TextDoneEvent(sequence_number=n + 3, item_id=item.id, output_index=index, text=part.text),
        ContentPartEvent(type="response.content_part.done", sequence_number=n + 4, item_id=item.id,
                         output_index=index, part=part),
        OutputItemEvent(type="response.output_item.done", sequence_number=n + 5, output_index=index, item=item),
    ]


def _call_events(n: int, index: int, item: OutputFunctionCall) -> list[Event]:
    added = item.model_copy(update={"status": "in_progress", "arguments": ""})
    return [
        OutputItemEvent(type="response.output_item.added", sequence_number=n, output_index=index, item=added),
        ArgumentsDeltaEvent(sequence_number=n + 1, item_id=item.id, output_index=index, delta=item.arguments),
        ArgumentsDoneEvent(sequence_number=n + 2, item_id=item.id, output_index=index, name=item.name,
                           arguments=item.arguments),
        OutputItemEvent(type="response.output_item.done", sequence_number=n + 3, output_index=index, item=item),
    ]
