"""The Llama-2 chat format, token for token as Meta's reference `chat_completion` (llama/generation.py) builds it."""

from pathlib import Path

from tokenizers import Tokenizer

from core.protocol import ChatMessage
from prompts.tokens import encode_raw, encode_text, first_reserved, load_tokenizer, special_token_id, tokenizer_config

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2Formatter:
    """`[BOS][INST] user [/INST] answer [EOS]` per past pair, then `[BOS][INST] user [/INST]` (and the answer
    begun, if the messages end with one).

    BOS and EOS are inserted as ids and everything else is encoded as text, so a message that
    contains `</s>` stays text rather than closing a turn. The tags are text to the tokenizer
    too, so a message holding `[/INST]` or `<</SYS>>` would still fake a turn or a system block
    with no token to tell it apart: those are `reserved_text`, for the caller to refuse.
    """

    # Meta's SPECIAL_TAGS: the reference refuses any dialog whose contents hold one of them.
    reserved_text: tuple[str, ...] = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

    def __init__(self, tokenizer: Tokenizer, bos_id: int, eos_id: int) -> None:
        self._tokenizer = tokenizer
        self._bos_id = bos_id
        self._eos_id = eos_id

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Llama2Formatter":
        tokenizer = load_tokenizer(model_dir, specials_as_text=True)
        config = tokenizer_config(model_dir)
        bos_id = special_token_id(tokenizer, config, "bos_token")
        return cls(tokenizer, bos_id, special_token_id(tokenizer, config, "eos_token"))

    def reserved_in(self, text: str) -> str | None:
        return first_reserved(text, self.reserved_text)

    def encode_raw(self, text: str) -> list[int]:
        return encode_raw(self._tokenizer, text)

    def encode(self, system: str | None, messages: list[ChatMessage]) -> list[int]:
        contents = _fold_system(system, [message.content for message in messages])
        begun = contents.pop() if len(contents) % 2 == 0 else None  # the answer the model goes on with
        ids: list[int] = []
        for user, answer in zip(contents[::2], contents[1::2]):
            turn = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
            ids += [self._bos_id, *encode_text(self._tokenizer, turn), self._eos_id]
        last = f"{B_INST} {contents[-1].strip()} {E_INST}" + ("" if begun is None else f" {begun.strip()}")
        return ids + [self._bos_id, *encode_text(self._tokenizer, last)]


def _fold_system(system: str | None, contents: list[str]) -> list[str]:
    """Llama-2 has no system turn: the reference prepends a `<<SYS>>` block to the first user message."""
    if system is None:
        return contents
    return [B_SYS + system + E_SYS + contents[0], *contents[1:]]
