"""A model folder with a Llama-2-shaped SentencePiece tokenizer, built in well under a second.

No package that installs quickly ships Llama-2's own tokenizer (the Hub is out of reach), so the
Llama-2 tests build one shaped as meta-llama/Llama-2-7b-chat-hf's tokenizer.json is: `<unk>` = 0,
`<s>` = 1 and `</s>` = 2 as added special tokens, the byte tokens `<0x00>`..`<0xFF>` = 3..258, then
BPE pieces; a `Prepend("▁")` + `Replace(" ", "▁")` normalizer and no pre-tokenizer (so every
encode call gets SentencePiece's dummy prefix), byte fallback, and a post-processor adding `<s>`.
Only the pieces differ: they are trained on the few sentences below, which hold none of the chat
tags, so `[INST]` and `<<SYS>>` split into several pieces as they do in Llama-2.

tokenizer_config.json carries the chat template of meta-llama/Llama-2-13b-chat-hf and names
`PreTrainedTokenizerFast`, so transformers uses tokenizer.json as written (its LlamaTokenizer
class would rebuild the normalizer as a Metaspace pre-tokenizer of its own).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

UNK, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
CORPUS = (
    "Hello there! How can I help you today?",
    "The capital of France is Paris; Lyon and Marseille are other French cities.",
    "Please answer in one short sentence, and be kind to the people you talk with.",
    "What is the weather like? It is sunny and warm [mostly], with a light breeze.",
    "Use <angle> brackets, slashes / and back\\slashes, colons: and 12345 digits.",
)
HUB_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def write_llama2_model_dir(folder: Path) -> Path:
    """`folder` with tokenizer.json, tokenizer_config.json and config.json, as a Llama-2 chat repo has them."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": HUB_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096}))
    return folder


def build_tokenizer() -> Tokenizer:
    """Trained with a split at each "▁" (SentencePiece's pieces never span a word start), then loaded without it."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tokenizer.to_str())
    # The trainer makes every listed token an added one; Llama-2's byte tokens are plain vocabulary.
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] in SPECIAL_TOKENS]
    spec["pre_tokenizer"] = None
    llama = Tokenizer.from_str(json.dumps(spec))
    llama.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    llama.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return llama
