"""Train a small CLIP-compatible BPE tokenizer on a set of captions.

The result is a folder with ``vocab.json`` and ``merges.txt`` in the format of OpenAI CLIP's
tokenizer (byte-level symbols, ``</w>`` marking the end of a word), so that
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it and diffusers pipelines use it
unchanged. The vocabulary is the 256 byte symbols, the same with ``</w>``, the merges learnt
from the captions and the two special tokens: a few hundred entries instead of CLIP's 49 408,
which keeps the text encoder's embedding table small. Any text still tokenizes (unknown words
fall back to smaller pieces, down to single bytes).

BPE training follows Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units": repeatedly merge the most frequent adjacent symbol pair (ties broken by the
pair itself, so the result is deterministic).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from graphsd.std.text.tokenizer import byte_symbols

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _words(texts: list[str]) -> Counter:
    byte_char = byte_symbols()  # indexed by byte value
    counts: Counter = Counter()
    for text in texts:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            chars = [byte_char[b] for b in word.encode("utf-8")]
            counts[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    return counts


def learn_merges(texts: list[str], max_merges: int = 1000, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn BPE merges from ``texts`` (most frequent pair first)."""
    words = _words(texts)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best, freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < min_frequency:
            break
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def save_tokenizer(folder: str | Path, merges: list[tuple[str, str]]) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of a CLIP tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def train_tokenizer(texts: list[str], folder: str | Path, max_merges: int = 1000):
    """Learn merges from ``texts``, save them to ``folder`` and return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    save_tokenizer(folder, learn_merges(texts, max_merges=max_merges))
    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids ``[N, model_max_length]`` padded and truncated as SD pipelines do."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def vocab_info(tokenizer) -> dict[str, int]:
    """Vocabulary size and special ids, what the text encoder's config needs."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
