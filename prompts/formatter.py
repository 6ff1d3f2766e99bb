"""Which chat format a model gets, and how many tokens its context holds."""

import json
from pathlib import Path
from typing import Protocol

from core.protocol import ChatMessage
from prompts.llama2 import Llama2Formatter
from prompts.template import TemplateFormatter, read_template
from prompts.tokens import tokenizer_config


class ChatFormatter(Protocol):
    # What a content must not hold: text that this format reads as structure although no token id
    # marks it (Llama-2's `[INST]`), so that a message could fake a turn. Empty where ids mark it all.
    reserved_text: tuple[str, ...]

    def encode(self, system: str | None, messages: list[ChatMessage]) -> list[int]:
        """Prompt ids for user/assistant turns that alternate and end with the user (the assistant's turn opened
        after it), or with the assistant (its answer begun: the prompt ends inside it, for the model to go
        on); the system prompt comes apart."""
        ...

    def encode_raw(self, text: str) -> list[int]:
        """A raw prompt (no chat format at all) as the model's tokenizer encodes it, BOS included."""
        ...

    def reserved_in(self, text: str) -> str | None:
        """The first of `reserved_text` that `text` holds, for the API to refuse by name; None when it holds none."""
        ...


def load_formatter(model_dir: Path, prompt_format: str, model_name: str) -> ChatFormatter:
    """The format `prompt_format` names; "auto" picks Llama-2's for Llama-2 models, whose templates differ by repo."""
    if prompt_format == "auto":
        prompt_format = "llama2" if _is_llama2(model_name) else "template"
    if prompt_format == "llama2":
        return Llama2Formatter.from_dir(model_dir)
    if prompt_format == "template":
        return TemplateFormatter.from_dir(model_dir)
    raise ValueError(f"unknown prompt format {prompt_format!r}: expected 'auto', 'llama2' or 'template'")


def _is_llama2(model_name: str) -> bool:
    name = model_name.lower()
    return "llama-2" in name or "llama2" in name


def chat_template(model_dir: Path) -> str:
    """The tokenizer's chat template as written, or "" when the folder has none (llama.cpp's /props)."""
    try:
        return read_template(model_dir, tokenizer_config(model_dir))
    except ValueError:
        return ""


def context_window(model_dir: Path, override: int | None) -> int:
    """`override` when set, else the model's max_position_embeddings from config.json."""
    if override is not None:
        return override
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    window = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    if not isinstance(window, int):
        raise ValueError(f"{model_dir}/config.json has no max_position_embeddings; set CONTEXT_WINDOW")
    return window
