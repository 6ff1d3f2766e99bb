"""What a constrained answer must match (a JSON schema or a GBNF grammar), in llguidance's terms.

llguidance (Rust, no torch) compiles either in well under a millisecond, so the API compiles every
constraint before a task is queued and refuses by name what cannot compile, and the transformers
engine decodes with the very grammar compiled here. llama.cpp and vLLM take the schema or GBNF
text as it is and constrain decoding with their own grammar engines.
"""

import json
from typing import Any

import llguidance

# Between JSON tokens at most a space, or one or two newlines and an indent: what llama.cpp's own
# schema converter allows, so a small model cannot fill its budget with blank lines on any engine.
WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})?"
# What `{"type": "json_object"}` asks for: any JSON object (llama.cpp reads an empty schema so too).
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def schema_grammar(schema: dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema (raises ValueError if the schema is not an object)."""
    return llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema or ANY_OBJECT), defaults={"whitespace_pattern": WHITESPACE}
    )


def gbnf_grammar(gbnf: str) -> str:
    """llguidance's grammar for llama.cpp's GBNF (raises ValueError if it does not convert)."""
    return llguidance.grammar_from("gbnf", gbnf)


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why the schema cannot constrain an answer, or None when it compiles."""
    try:
        return llguidance.LLMatcher.validate_grammar(schema_grammar(schema)) or None
    except ValueError as exc:
        return str(exc)


def gbnf_error(gbnf: str) -> str | None:
    """Why the grammar cannot constrain an answer, or None when it compiles."""
    try:
        return llguidance.LLMatcher.validate_grammar(gbnf_grammar(gbnf)) or None
    except ValueError as exc:
        return str(exc)
