"""Token ids as the API families show them in log probabilities: each token's bytes and its text.

A token's text is its bytes as UTF-8; a token that holds only part of a character (byte-level BPE
splits them) shows as `bytes:\\xe2\\x80`, as OpenAI's API shows one, its `bytes` telling the rest.
The vocabulary's bytes are read once per tokenizer (a fraction of a second), on first use.
"""

from functools import lru_cache

from tokenizers import Tokenizer

from model_loader.token_bytes import token_bytes


@lru_cache(maxsize=4)
def _vocabulary(tokenizer: Tokenizer) -> list[bytes]:
    return token_bytes(tokenizer)


def token_raw(tokenizer: Tokenizer, token_id: int) -> bytes:
    vocabulary = _vocabulary(tokenizer)
    return vocabulary[token_id] if 0 <= token_id < len(vocabulary) else b""


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    raw = token_raw(tokenizer, token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def scored_token(tokenizer: Tokenizer, token_id: int, logprob: float | None) -> dict[str, object]:
    """A token with its log probability as both families show one: `token`, `bytes`, `logprob`."""
    return {"token": token_text(tokenizer, token_id), "bytes": list(token_raw(tokenizer, token_id)), "logprob": logprob}


def spoken(tokenizer: Tokenizer, scored: list[tuple[int, list | None]]) -> list[tuple[int, list | None]]:
    """The tokens that are part of the text: an end-of-sequence or other control token is not, as it is
    not in OpenAI's or llama.cpp's log probabilities."""
    control = _control_ids(tokenizer)
    return [(token_id, scores) for token_id, scores in scored if token_id not in control]


@lru_cache(maxsize=4)
def _control_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
