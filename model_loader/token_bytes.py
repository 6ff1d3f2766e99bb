"""The bytes each token stands for, to recover the ids a server streamed text for but did not name.

llama-server holds a token back while the text so far ends inside a UTF-8 character, and the
event that completes the character names only its last token (`tokens`), though its `content`
and `tokens_predicted` cover the held ones too. Their ids are found again from those bytes: the
held tokens are the ones whose bytes are not UTF-8 on their own, so few candidates fit a few bytes.
"""

import json
import re
from functools import lru_cache

from tokenizers import Tokenizer

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (the ByteLevel pre-tokenizer's), back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each id's bytes, for byte-level BPE (GPT-2, Llama-3, SmolLM) and SentencePiece with byte fallback (Llama-2)."""
    byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder"))
    alphabet = _byte_level_alphabet()
    found = []
    for token_id in range(tokenizer.get_vocab_size()):
        piece = tokenizer.id_to_token(token_id) or ""
        if byte_level:
            found.append(bytes(alphabet.get(c, 0) for c in piece))
        elif match := BYTE_FALLBACK.match(piece):
            found.append(bytes([int(match.group(1), 16)]))
        else:
            found.append(piece.replace("▁", " ").encode())
    return found


class HeldTokens:
    """Finds the ids behind bytes a server sent as text only, among the tokens that are not UTF-8 alone."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.bytes_of = token_bytes(tokenizer)
        self._partial: dict[bytes, int] = {}
        for token_id, raw in enumerate(self.bytes_of):
            try:
                raw.decode()
            except UnicodeDecodeError:
                self._partial.setdefault(raw, token_id)

    def recover(self, raw: bytes, count: int) -> list[int] | None:
        """`count` ids whose bytes make up `raw` exactly, or None where none do."""
        if count == 0:
            return [] if not raw else None
        for end in range(1, len(raw) + 1):
            token_id = self._partial.get(raw[:end])
            if token_id is not None and (rest := self.recover(raw[end:], count - 1)) is not None:
                return [token_id, *rest]
        return None
