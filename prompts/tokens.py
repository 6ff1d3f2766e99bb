"""Reading a model folder's tokenizer files, and encoding user text so it can never become a control token."""

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


def load_tokenizer(model_dir: Path, *, specials_as_text: bool) -> Tokenizer:
    """The folder's tokenizer with every added token a control token; with `specials_as_text`, text like `</s>`
    encodes as plain text, never as a control id.

    `encode_special_tokens` only stops matching of added tokens marked special, and tokenizer.json
    files leave some control tokens unmarked (Qwen3's `<think>`), whose text in a message would
    still become the id. So every added token is marked special before loading. That changes
    nothing with the flag off: added tokens are matched the same way, marked or not.

    The flag lives on the Tokenizer object, so callers keep one instance per setting rather than
    flipping it per call (which would race between threads).
    """
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for token in spec.get("added_tokens", []):
        token["special"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
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


def first_reserved(text: str, reserved: tuple[str, ...]) -> str | None:
    """Which of `reserved` occurs earliest in `text` (the one listed first on a tie), or None.

    The earliest, so that a refusal names the first offending spot a person would find reading the text.
    """
    found = [(index, order) for order, word in enumerate(reserved) if (index := text.find(word)) >= 0]
    return reserved[min(found)[1]] if found else None


def encode_raw(tokenizer: Tokenizer, text: str) -> list[int]:
    """A raw prompt's ids as the model's tokenizer gives them (BOS added where its post-processor
    adds one), with any control token's text in it kept as text."""
    return tokenizer.encode(text, add_special_tokens=True).ids


def eos_token_ids(model_dir: Path, tokenizer: Tokenizer) -> list[int]:
    """Every end-of-sequence id a model folder names: config.json's and generation_config.json's
    `eos_token_id` (one or several) and tokenizer_config.json's `eos_token`. The engine servers end
    an answer at these, and the worker counts an answer ended there."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        found = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.exists() else None
        ids += found if isinstance(found, list) else [found] if isinstance(found, int) else []
    try:
        ids.append(special_token_id(tokenizer, tokenizer_config(model_dir), "eos_token"))
    except ValueError:
        pass
    return sorted(set(ids))
