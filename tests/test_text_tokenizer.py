"""The shipped CLIP tokenizer, checked against ids worked out by hand from CLIP's vocabulary rule.

How an id is worked out (the rule in graphsd/text/tokenizer.py, from OpenAI's CLIP):
- the 188 printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ' come first in byte order, so a printable
  ASCII character c is id ord(c) - 33, and c + '</w>' (c ending a word) is 256 + ord(c) - 33;
- the token made by merge line r of merges.txt (0-based after the '#version' header) is 512 + r;
- BPE joins, again and again, the adjacent pair whose merge line comes first. The ranks quoted
  in the comments below were looked up in merges.txt (``grep -n '^c at</w>$' merges.txt``).
"""

from __future__ import annotations

import gzip
import json

import pytest
from transformers import CLIPTokenizer

from graphsd.std.text.encode import tokenize_prompt
from graphsd.std.text.tokenizer import (
    build_clip_tokenizer_files,
    byte_symbols,
    clip_tokenizer,
    clip_tokenizer_dir,
)

BOS, EOS = 49406, 49407


def ascii_end_of_word(c: str) -> int:
    """Id of the single printable ASCII character ``c`` as a whole word (see module docstring)."""
    return 256 + ord(c) - 33


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def ids(tok, text):
    return tok(text).input_ids


def test_size_and_special_tokens(tok):
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert tok.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.model_max_length == 77
    assert clip_tokenizer() is tok  # cached


def test_shipped_files_are_plain_package_data():
    folder = clip_tokenizer_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "LICENSE"} <= names
    assert "Permission is hereby granted" in (folder / "LICENSE").read_text()  # MIT
    assert sum((folder / n).stat().st_size for n in ("vocab.json", "merges.txt")) < 3_000_000


def test_a_photo_of_a_cat(tok):
    # The well-known CLIP ids. 'a</w>' is the byte 'a' ending a word: 256 + 97 - 33 = 320.
    # cat: c a t</w> -> 'a t</w>' (rank 24) before 'c a' (260) -> c at</w> -> 'c at</w>' (1856) = 2368.
    # photo: 't o</w>' (19) -> 'h o' (94) -> 'p ho' (304) -> 'pho to</w>' (613) = 1125.
    # of: 'o f</w>' (27) = 539.
    assert ids(tok, "a photo of a cat") == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ascii_end_of_word("a") == 320


def test_mixed_case_and_punctuation(tok):
    # Lower-cased first; words and runs of punctuation are separate pre-tokens.
    # hello: 'e l' (32) -> 'el l' (314) -> 'ell o</w>' (2000) -> 'h ello</w>' (2794) = 3306.
    # world: 'o r' (11) -> 'w or' (129) -> 'l d</w>' (218) -> 'wor ld</w>' (490) = 1002.
    # ',' and '!' alone are single bytes ending a word: 256 + 44 - 33 = 267 and 256 + 33 - 33 = 256.
    assert ids(tok, "Hello, World!") == [BOS, 3306, ascii_end_of_word(","), 1002, ascii_end_of_word("!"), EOS]
    assert ids(tok, "HELLO, world!") == ids(tok, "hello, WORLD!")
    # '...' is one punctuation run: '. .' (96) -> '.. .</w>' (166) = 678; '<3' splits into the
    # punctuation '<' and the digit '3' (each digit is its own pre-token).
    assert ids(tok, "<3 ...") == [BOS, ascii_end_of_word("<"), ascii_end_of_word("3"), 678, EOS]
    # "it's": the contraction "'s" is split off; 'i t</w>' (73) = 585, "' s</w>" (56) = 568.
    assert ids(tok, "it's") == [BOS, 585, 568, EOS]


def test_digits_are_single_tokens(tok):
    # CLIP splits numbers into single digits, so every piece is one byte ending a word.
    expected = [ascii_end_of_word(c) for c in "1024x768"]
    assert expected == [272, 271, 273, 275, 343, 278, 277, 279]
    assert ids(tok, "1024x768") == [BOS, *expected, EOS]


def test_whitespace_is_collapsed(tok):
    assert ids(tok, "  A\n\tCAT  ") == [BOS, 320, 2368, EOS]


def test_unicode_goes_through_bytes(tok):
    symbols = byte_symbols()
    # é is UTF-8 C3 A9, whose byte symbols are 'Ã' and '©' (both printable, so themselves).
    assert (symbols[0xC3], symbols[0xA9]) == ("Ã", "©")
    # é alone: 'Ã ©</w>' (rank 3654) = 4166. café: 'a f' (190) -> 'c af' (2959) -> 'Ã ©</w>'
    # (3654) -> 'caf Ã©</w>' (14792) = 15304.
    assert ids(tok, "é") == [BOS, 4166, EOS]
    assert ids(tok, "café") == [BOS, 15304, EOS]
    # naïve (ï = C3 AF = 'Ã' '¯') is not one token: 'v e</w>' (51) -> 'n a' (585) -> 'Ã ¯'
    # (35177) and no merge joins na, Ã¯, ve</w>: 512 + 585, 512 + 35177, 512 + 51.
    assert ids(tok, "naïve") == [BOS, 1097, 35689, 563, EOS]
    # 🐱 is F0 9F 90 B1 -> 'ð' 'Ł' 'Ĳ' '±' (9F, 90 are not printable: shifted to 256 + n).
    assert [symbols[b] for b in "🐱".encode()] == ["ð", "Ł", "Ĳ", "±"]
    # 'ð Ł' (46) -> 'ðŁ Ĳ' (1562) -> 'ðŁĲ ±</w>' (22467) = 22979.
    assert ids(tok, "🐱") == [BOS, 22979, EOS]


def test_long_prompt_is_not_truncated_by_chunking(tok):
    chunks = tokenize_prompt(tok, "cat " * 80)
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0].tolist() == [BOS] + [2368] * 75 + [EOS]
    assert chunks.ids[1].tolist() == [BOS] + [2368] * 5 + [EOS] + [EOS] * 70


def test_sdxl_second_tokenizer_pads_with_exclamation_mark():
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
    assert tok2.pad_token_id == 0 == ascii_end_of_word("!") - 256
    assert tok2("a cat", padding="max_length", max_length=8).input_ids == [BOS, 320, 2368, EOS, 0, 0, 0, 0]


@pytest.mark.slow
def test_files_regenerate_byte_for_byte(tmp_path):
    """build_clip_tokenizer_files on a merge list in OpenAI's format (header line, then more
    merges than CLIP uses) reproduces the shipped vocab.json and merges.txt exactly."""
    shipped = clip_tokenizer_dir()
    merges = shipped.joinpath("merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    assert len(merges) == 48894
    source = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    extra = ["z z", "q q"]  # OpenAI's file lists 262,144 merges; only the first 48,894 count
    with gzip.open(source, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges + extra) + "\n")
    out = build_clip_tokenizer_files(source, tmp_path / "out", license_file=shipped / "LICENSE")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "LICENSE"):
        assert (out / name).read_bytes() == (shipped / name).read_bytes(), name
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
    assert vocab["".join(merges[0].split())] == 512  # 'in'
    loaded = CLIPTokenizer.from_pretrained(str(out))
    assert loaded("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
