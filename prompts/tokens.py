"""Reading a model folder's tokenizer files, and encoding user text so it can never become a control token."""

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


def load_tokenizer(model_dir: Path, *, specials_as_text: bool) -> Tokenizer:
    """The folder's tokenizer; with `specials_as_text`, text like `</s>` encodes as plain text, never as its control id.

    The flag lives on the Tokenizer object, so callers keep one instance per setting rather than
    flipping it per call (which would race between threads).
    """
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = specials_as_text
    return tokenizer


def tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json, or {} when the folder has none."""
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def special_token_text(config: dict[str, Any], name: str) -> str | None:
    """A special token's text from tokenizer_config.json, which writes it as a string or as {"content": ...}."""
    value = config.get(name)
    if isinstance(value, dict):
        return value.get("content")
    return value


def special_token_id(tokenizer: Tokenizer, config: dict[str, Any], name: str) -> int:
    """The id of `bos_token` or `eos_token`, so formats can insert it as an id rather than as text."""
    text = special_token_text(config, name)
    token_id = tokenizer.token_to_id(text) if text else None
    if token_id is None:
        raise ValueError(f"tokenizer_config.json names no {name} that the tokenizer knows (got {text!r})")
    return token_id


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids for text alone: no BOS/EOS added by the tokenizer's post-processor."""
    return tokenizer.encode(text, add_special_tokens=False).ids
