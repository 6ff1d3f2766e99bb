"""Chat formats and context budgets: turn a request into prompt token ids that fit the model.

Only `tokenizers` and `jinja2` are used here, never torch or transformers, because the API
process imports this package to budget prompts before they are queued.
"""

from prompts.budget import Prompt, PromptTooLong, build_prompt
from prompts.formatter import ChatFormatter, chat_template, context_window, load_formatter

__all__ = [
    "ChatFormatter", "Prompt", "PromptTooLong", "build_prompt", "chat_template", "context_window", "load_formatter"
]
