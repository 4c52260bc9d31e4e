"""The SentencePiece wrapper: special ids, BOS/EOS handling and lossless round trips."""

import pytest

from llama import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_special_ids_are_llamas(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, -1)


def test_bos_and_eos_flags(tok):
    body = tok.encode("hello world", bos=False, eos=False)
    assert body and 1 not in body and 2 not in body
    assert tok.encode("hello world", bos=True, eos=True) == [1] + body + [2]
    assert tok.encode("", bos=True, eos=False) == [1]


@pytest.mark.parametrize("text", ["hello world", "  two  spaces", "digits 12345", "unseen: 日本語 🦙 ß", "line\nbreak"])
def test_round_trip_is_lossless_with_byte_fallback(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_digits_are_split_like_llamas(tok):
    pieces = [tok.decode([i]) for i in tok.encode("12345", bos=False, eos=False)]
    assert [p.strip() for p in pieces if p.strip()] == ["1", "2", "3", "4", "5"]


def test_bad_paths_and_types(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(junk))
    with pytest.raises(TypeError):
        tok.encode(["list"], bos=True, eos=False)
