"""The tokenizer's own chat template, rendered as transformers renders it, with contents kept out of control tokens.

Rendering the real contents and encoding the result would let a user who types `<|im_end|>`
end their turn early. So the template is rendered with a placeholder for each content; the
control tokens are found in that rendering, where only template text can hold them, and the
text between two control tokens is encoded with the contents put back and special-token
matching off. The tokenizer splits its input at control tokens before anything else, so
this gives exactly the ids of encoding the plainly rendered string, unless a content holds
the text of a control token: then it stays text, which is the point.

Placeholders are padded with em spaces: a template that strips a content (Llama-3's `| trim`)
strips the padding too, and the content is stripped to match. Other transformations of a
content (say, splitting off a `</think>` part) see the placeholder and do not happen.
"""

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from core.protocol import ChatMessage, Role
from prompts.tokens import encode_raw, encode_text, first_reserved, load_tokenizer, special_token_text, tokenizer_config

# A placeholder is an index in private-use characters, which no template writes, padded (see above).
_PAD = "\u2003"
_PLACEHOLDER = re.compile(f"({_PAD}?)\ue000(\\d+)\ue001({_PAD}?)")
# The special tokens transformers passes to a template as variables.
_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateFormatter:
    """Messages through the model's chat template, ending with the assistant's generation prompt (or inside the
    answer begun, when the messages end with one).

    Its structure is control tokens, inserted as ids, and their text in a content stays text, so
    no content needs refusing: `reserved_text` is empty.
    """

    reserved_text: tuple[str, ...] = ()

    def __init__(
        self, template: jinja2.Template, variables: dict[str, str], structural: Tokenizer, text: Tokenizer
    ) -> None:
        self._template = template
        self._variables = variables
        self._structural = structural
        self._text = text
        # Every added token, special or not (load_tokenizer marks them all so).
        self._control_ids = set(structural.get_added_tokens_decoder())

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TemplateFormatter":
        config = tokenizer_config(model_dir)
        variables = {name: text for name in _TOKEN_VARIABLES if (text := special_token_text(config, name))}
        return cls(
            _compile_template(read_template(model_dir, config)),
            variables,
            structural=load_tokenizer(model_dir, specials_as_text=False),
            text=load_tokenizer(model_dir, specials_as_text=True),
        )

    def reserved_in(self, text: str) -> str | None:
        return first_reserved(text, self.reserved_text)

    def encode_raw(self, text: str) -> list[int]:
        return encode_raw(self._text, text)

    def encode(self, system: str | None, messages: list[ChatMessage]) -> list[int]:
        chat = [ChatMessage(role=Role.system, content=system)] if system is not None else []
        chat += messages
        begun = chat[-1].role == Role.assistant
        rendered = self._template.render(
            messages=[{"role": message.role.value, "content": _placeholder(i)} for i, message in enumerate(chat)],
            tools=None,
            documents=None,
            add_generation_prompt=not begun,
            **self._variables,
        )
        if begun:  # the prompt ends inside the answer begun, as transformers' continue_final_message cuts it
            rendered = rendered[: list(_PLACEHOLDER.finditer(rendered))[-1].end()]
        contents = [message.content for message in chat]
        ids: list[int] = []
        cursor = 0
        for start, end, token_id in self._control_tokens(rendered):
            ids += self._encode_text(rendered[cursor:start], contents)
            ids.append(token_id)
            cursor = end
        return ids + self._encode_text(rendered[cursor:], contents)

    def _control_tokens(self, rendered: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each added token in the template's own text, as the tokenizer matches them."""
        encoding = self._structural.encode(rendered, add_special_tokens=False)
        return [
            (start, end, token_id)
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets)
            if token_id in self._control_ids
        ]

    def _encode_text(self, piece: str, contents: list[str]) -> list[int]:
        """Template text with the real contents put back, encoded with added tokens read as plain text."""
        text = _PLACEHOLDER.sub(lambda match: _content(match, contents), piece)
        return encode_text(self._text, text)


def _placeholder(index: int) -> str:
    return f"{_PAD}\ue000{index}\ue001{_PAD}"


def _content(placeholder: re.Match[str], contents: list[str]) -> str:
    """The content a placeholder stands for, stripped on each side where the template stripped the padding."""
    content = contents[int(placeholder.group(2))]
    if not placeholder.group(1):
        content = content.lstrip()
    if not placeholder.group(3):
        content = content.rstrip()
    return content


def read_template(model_dir: Path, config: dict[str, Any]) -> str:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named templates: the default)."""
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"{model_dir} has no chat template; use the llama2 prompt format or add chat_template.jinja")
    return template


class _GenerationBlock(Extension):
    """`{% generation %}` marks assistant text for training masks in transformers; rendering keeps only its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _compile_template(source: str) -> jinja2.Template:
    """The template in transformers' environment; templates from the Hub are untrusted code, hence the sandbox."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """transformers' tojson: Jinja's own escapes HTML characters, which would change what the model sees."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
