"""The tokenizer part of a GGUF file: tokens, token types, merges, special ids, chat template.

A source that was itself a GGUF file gives its tokenizer keys unchanged. A Hugging Face
byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) is described the way llama.cpp's
convert_hf_to_gguf.py describes one (tokenizer model "gpt2", a named pre-tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType

from loraprune.errors import LoraPruneError
from loraprune.export.gguf_header import read_gguf

# llama.cpp picks its pre-tokenizer regex by name; these are the names of the two byte-level BPE
# layouts we recognise from a tokenizer.json, checked against llama.cpp's tokenization on export.
GPT2_PRE = "gpt-2"  # ByteLevel with the GPT-2 regex
SMOLLM_PRE = "smollm"  # digits split one by one, then ByteLevel (SmolLM / SmolLM2)


def add_vocab(writer: GGUFWriter, tokenizer, vocab_size: int, source_gguf: Path | None = None) -> str:
    """Write the tokenizer keys; returns where they came from (for the report)."""
    if source_gguf is not None:
        copy_tokenizer_keys(writer, source_gguf, vocab_size)
        return f"copied from {source_gguf.name}"
    add_bpe_vocab(writer, tokenizer, vocab_size)
    return "built from the Hugging Face tokenizer"


def check_vocab(tokenizer, source_gguf: Path | None) -> None:
    """Refuse a tokenizer this writer cannot describe, before anything is written."""
    if source_gguf is None:
        _backend_description(tokenizer)


def copy_tokenizer_keys(writer: GGUFWriter, source_gguf: Path, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` key of the source GGUF file with its value type."""
    reader = read_gguf(source_gguf)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens" and len(value) != vocab_size:
            raise LoraPruneError(f"{source_gguf.name} has {len(value)} tokens but the model {vocab_size} "
                                 "embeddings; export from the model the GGUF file holds")
        sub_type = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


def add_bpe_vocab(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Describe a byte-level BPE tokenizer.json as llama.cpp's converter does."""
    merges, pre = _backend_description(tokenizer)
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    if max(by_id) >= vocab_size:
        raise LoraPruneError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} "
                             "embeddings; export with the tokenizer the model was trained with")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    if tokenizer.bos_token_id is not None:
        adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        writer.add_add_bos_token(bool(adds_bos))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _backend_description(tokenizer) -> tuple[list[str], str]:
    """(merges as "a b" strings, llama.cpp pre-tokenizer name) of a byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoraPruneError("GGUF export needs a fast (tokenizer.json) tokenizer; save the model's "
                             "tokenizer with transformers first, or export --format transformers")
    description = json.loads(backend.to_str())
    model, pre_tokenizer = description["model"], description.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or _pre_tokenizer_name(pre_tokenizer) is None:
        raise LoraPruneError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM style); this one is "
            f"{model.get('type')} with pre-tokenizer {pre_tokenizer.get('type')}. Export --format "
            "transformers and convert with llama.cpp's convert_hf_to_gguf.py")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return merges, _pre_tokenizer_name(pre_tokenizer)


def _pre_tokenizer_name(pre_tokenizer: dict) -> str | None:
    def is_byte_level(step: dict) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True)

    if is_byte_level(pre_tokenizer):
        return GPT2_PRE
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and is_byte_level(steps[1])):
        return SMOLLM_PRE
    return None
