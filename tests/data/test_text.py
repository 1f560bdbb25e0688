"""Byte-level (and tokenizer) language-modelling text: split, windows, evaluation coverage, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leanformer.data import decode_tokens, encode_text, lm_batches, lm_eval_batches, load_text, load_tokenizer
from leanformer.data.text import BYTE_VOCAB

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def write(tmp_path: Path, data: bytes, name: str = "text.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bytes_split_keeps_the_last_fraction_for_validation(tmp_path):
    data = bytes(range(32, 127)) * 2  # 190 bytes
    text = load_text(write(tmp_path, data), val_fraction=0.1, seq_len=4)
    assert text.vocab_size == BYTE_VOCAB == 256
    assert text.train.dtype == text.val.dtype == torch.int64
    assert len(text.val) == 19 and len(text.train) == 171
    assert bytes(text.train.tolist()) + bytes(text.val.tolist()) == data
    assert "bytes" in text.source and "text.txt" in text.source


def test_non_ascii_utf8_is_read_as_bytes(tmp_path):
    data = "Grüße, naïve café — ünïcödé ".encode() * 4
    text = load_text(write(tmp_path, data), val_fraction=0.25, seq_len=2)
    assert bytes(torch.cat([text.train, text.val]).tolist()) == data
    assert int(text.train.max()) > 127


def test_encode_and_decode_follow_load_texts_byte_rule(tmp_path):
    data = "Grüße, naïve café".encode()
    text = load_text(write(tmp_path, data * 4), val_fraction=0.25, seq_len=2)
    assert torch.equal(torch.cat([text.train, text.val]), encode_text(data.decode() * 4))
    assert decode_tokens(encode_text("Grüße")) == "Grüße" and encode_text("").tolist() == []
    assert decode_tokens(torch.tensor([104, 300, 105])) == "h\ufffdi"  # not a byte: the replacement character
    assert decode_tokens(encode_text("ü")[:1]) == "\ufffd"  # half a UTF-8 sequence


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared tinyshakespeare not found at {SHAKESPEARE}")
def test_tinyshakespeare_is_ascii_bytes_split_at_its_last_tenth():
    text = load_text(SHAKESPEARE)
    assert len(text.train) + len(text.val) == 1_115_394
    assert len(text.val) == round(1_115_394 * 0.1)
    assert int(text.train.max()) < 128 and len(torch.cat([text.train, text.val]).unique()) == 65
    assert bytes(text.val[-20:].tolist()) == SHAKESPEARE.read_bytes()[-20:]


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    (b"", "is empty"),
    (b"\xff\xfe bad", "not UTF-8"),
    (b"short text", "too short"),
])
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "input.txt" if content is None else write(tmp_path, content, "input.txt")
    with pytest.raises(ValueError, match=message) as err:
        load_text(path, seq_len=8)
    assert str(path) in str(err.value)


def test_folder_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_text(tmp_path)
    path = write(tmp_path, b"x" * 100)
    with pytest.raises(ValueError, match="val_fraction"):
        load_text(path, val_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        load_text(path, seq_len=0)


def test_lm_batches_are_shifted_windows_fixed_by_the_generator():
    tokens = torch.arange(100)
    first = lm_batches(tokens, 5, 8, torch.Generator().manual_seed(3))
    again = lm_batches(tokens, 5, 8, torch.Generator().manual_seed(3))
    other = lm_batches(tokens, 5, 8, torch.Generator().manual_seed(4))
    seen = []
    for _ in range(50):
        inputs, targets = next(first)
        assert inputs.shape == targets.shape == (5, 8) and inputs.dtype == torch.int64
        assert torch.equal(targets, inputs + 1)  # tokens = arange: each window is contiguous, targets shifted
        assert torch.equal(inputs, next(again)[0])
        seen.append(inputs[:, 0])
    starts = torch.cat(seen)
    assert int(starts.min()) == 0 and int(starts.max()) == 100 - 8 - 1  # every offset reachable, none past the end
    assert not torch.equal(next(other)[0], next(first)[0])


def test_lm_eval_batches_cover_every_prediction_once():
    tokens = torch.arange(3, 3 + 50)
    batches = lm_eval_batches(tokens, batch_size=2, seq_len=7)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 7), (2, 7), (2, 7), (1, 7)]
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(inputs, tokens[:-1]) and torch.equal(targets, tokens[1:])
    ragged = lm_eval_batches(tokens[:20], batch_size=4, seq_len=7)  # 19 predictions = 2 windows of 7 + 5
    assert [tuple(x.shape) for x, _ in ragged] == [(2, 7), (1, 5)]
    assert torch.equal(torch.cat([y.flatten() for _, y in ragged]), tokens[1:20])
    for (x1, y1), (x2, y2) in zip(batches, lm_eval_batches(tokens, 2, 7), strict=True):  # deterministic
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 10}, "at least seq_len"),
])
def test_window_arguments_are_checked(kwargs, message):
    args = {"batch_size": 2, "seq_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        lm_eval_batches(torch.arange(10), **args)
    with pytest.raises(ValueError, match=message):
        lm_batches(torch.arange(10), generator=torch.Generator(), **args)


def test_tokenizer_rule(tmp_path):
    assert load_tokenizer(tmp_path) is None  # no tokenizer files: bytes
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer is not None
    path = write(tmp_path, b"to be or not to be " * 10 + b"that")  # 194 characters
    text = load_text(path, val_fraction=23 / 194, seq_len=2, tokenizer=tokenizer)  # val: the last 23 characters
    assert text.vocab_size == len(tokenizer) == 5
    assert text.train.tolist() == [1, 2, 3, 4, 1, 2] * 9
    assert text.val.tolist() == [1, 2, 3, 4, 1, 2, 0]  # "that" is unknown
    assert encode_text("to be or not", tokenizer).tolist() == [1, 2, 3, 4]  # what load_text does, per part
    assert decode_tokens(torch.tensor([1, 2]), tokenizer) == "to be"
    assert "tokens" in text.source and "bytes" not in text.source
