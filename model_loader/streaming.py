"""Token ids in, publishable text out: incremental decoding and stop strings, with no model.

Decoding each token alone loses SentencePiece's leading spaces and splits multi-byte
characters, so, like text-generation-inference, each step decodes a short window that starts
one token back and keeps only what the newest tokens added; text ending in an unfinished
character waits for the next token. Text that might be the start of a stop string is held back
until it is known not to be, so a published chunk never holds text the final result drops.
"""

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextStream:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self.published = 0
        self.stopped = False
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        """Take one generated token; sets `stopped` and cuts the text when a stop string appears."""
        if self.stopped:
            return
        self._ids.append(token_id)
        delta = self._new_text()
        if not delta:
            return
        search_from = max(self.published, len(self.text) - self._longest_stop() + 1)
        self.text += delta
        self._cut_at_stop(search_from)

    def resume(self, token_ids: Sequence[int], published: str) -> None:
        """Take up an answer another attempt began: replay its tokens (text and stop strings come
        out as they did for it), with the first `published` characters already out. Text it held
        back is held back still, so a stop string that spans the takeover is found and cut as if
        one attempt had written it all."""
        for token_id in token_ids:
            self.add(token_id)
        if not self.text.startswith(published):
            raise ValueError("the published text does not decode from its tokens: was it written by another model?")
        self.published = len(published)

    def take_publishable(self) -> str:
        """The text not yet published that no later token or stop string can change."""
        end = len(self.text) if self.stopped else len(self.text) - self._stop_prefix_len()
        chunk = self.text[self.published : end]
        self.published = max(self.published, end)
        return chunk

    def take_rest(self) -> str:
        """At the end of generation everything left is final."""
        chunk = self.text[self.published :]
        self.published = len(self.text)
        return chunk

    def _new_text(self) -> str:
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return after[len(before) :]

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [(i, s) for s in self._stop if (i := self.text.find(s, max(search_from, 0))) >= 0]
        if hits:
            at, self.stopped_by = min(hits)
            self.text = self.text[:at]
            self.stopped = True

    def _longest_stop(self) -> int:
        return max((len(s) for s in self._stop), default=1)

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail = self.text[self.published :]
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(tail)), best, -1):
                if stop.startswith(tail[-n:]):
                    best = n
                    break
        return best
