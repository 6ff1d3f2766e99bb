"""Recovering the ids of tokens a server sent as text only (llama-server, inside a UTF-8 character)."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from model_loader.token_bytes import HeldTokens

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", ["おわん", "東京", "Ça va? 😀", "plain words"])
def test_every_token_s_bytes_make_up_the_text(tokenizer: Tokenizer, text: str) -> None:
    held = HeldTokens(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(held.bytes_of[i] for i in ids) == text.encode()


def test_tokens_held_inside_a_character_are_found_again(tokenizer: Tokenizer) -> None:
    held = HeldTokens(tokenizer)
    ids = tokenizer.encode("おわん", add_special_tokens=False).ids
    partial = [i for i in ids if not _is_utf8(held.bytes_of[i])]
    assert partial, "the test needs a character split over tokens"
    for index, token in enumerate(ids):
        if not _is_utf8(held.bytes_of[token]) and index + 1 < len(ids):
            assert held.recover(held.bytes_of[token], 1) == [token]
    assert held.recover(b"ok", 1) is None  # whole characters are never held back
    assert held.recover(b"", 0) == []


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
