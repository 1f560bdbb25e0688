"""Language-modelling text: one UTF-8 file as a token stream, cut into (input, next-token target) windows.

Tokens are the file's bytes (vocabulary 256), as char-rnn and nanoGPT's shakespeare_char use characters;
tinyshakespeare is pure ASCII, so there bytes are characters. A Hugging Face model folder that ships a
tokenizer is fed what it was trained on instead: `load_tokenizer(model_dir)` returns it, `load_text` encodes
with it. The last `val_fraction` of the file is validation, one contiguous block and not a random sample of
windows: neighbouring windows share context, so a shuffled split would leak training text into validation.

    text = load_text("input.txt", val_fraction=0.1, seq_len=256)
    for inputs, targets in lm_batches(text.train, 8, 256, torch.Generator().manual_seed(0)): ...
    val_loss = mean over lm_eval_batches(text.val, 8, 256)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .split import check_fraction

BYTE_VOCAB = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TextSplit:
    """Train and validation token ids (1-D int64 tensors) of one text file, and the vocabulary they index."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    source: str


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The Hugging Face tokenizer saved in ``model_dir``, or None to use bytes.

    The rule: a folder holding ``tokenizer.json`` or ``tokenizer_config.json`` has a tokenizer, loaded with
    ``transformers.AutoTokenizer`` from that folder only (nothing is downloaded); any other folder means bytes.
    """
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # imported here: transformers is slow to import

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{model_dir}: has a tokenizer file but it could not be loaded: {first_line}") from err


def load_text(path: str | Path, val_fraction: float = 0.1, seq_len: int = 1, tokenizer: Any | None = None) -> TextSplit:
    """Read a UTF-8 text file and split it: the first 1 - ``val_fraction`` is train, the last ``val_fraction`` val.

    Without ``tokenizer`` the tokens are the file's bytes; with one (see `load_tokenizer`) each part's text is
    encoded on its own, without special tokens, and the split point is taken in characters. Both parts must
    hold at least ``seq_len + 1`` tokens (one window of inputs and its shifted targets). Missing, empty,
    non-UTF-8 and too-short files raise ValueError naming the file.
    """
    check_fraction(val_fraction)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: expected a positive integer")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r}: " + ("is a folder" if path.is_dir() else "no such file"))
    data = path.read_bytes()
    if not data:
        raise ValueError(f"text file {str(path)!r} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text (byte {err.start} is invalid)") from err
    if tokenizer is None:
        tokens, vocab_size, kind = encode_text(text), BYTE_VOCAB, "bytes"
        cut = len(tokens) - round(len(tokens) * val_fraction)
        train, val = tokens[:cut], tokens[cut:]
    else:
        cut = len(text) - round(len(text) * val_fraction)
        train, val = (encode_text(part, tokenizer) for part in (text[:cut], text[cut:]))
        vocab_size, kind = len(tokenizer), f"{type(tokenizer).__name__} tokens"
    for name, part in (("train", train), ("validation", val)):
        if len(part) < seq_len + 1:
            raise ValueError(f"text file {str(path)!r} is too short: its {name} part (val_fraction={val_fraction}) "
                             f"has {len(part)} tokens, at least seq_len + 1 = {seq_len + 1} needed")
    return TextSplit(train, val, vocab_size, f"{path} ({kind}, last {val_fraction:g} is validation)")


def encode_text(text: str, tokenizer: Any | None = None) -> torch.Tensor:
    """1-D int64 token ids of ``text`` as `load_text` feeds a model: its UTF-8 bytes without ``tokenizer``, else
    the tokenizer's ids without special tokens. One rule, so a prompt is encoded as the training text was."""
    if tokenizer is None:
        data = bytearray(text.encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    # verbose=False: a whole file is one sequence, far longer than model_max_length, on purpose
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def decode_tokens(tokens: torch.Tensor, tokenizer: Any | None = None) -> str:
    """The text of token ids under `encode_text`'s rule. Bytes: invalid UTF-8 and ids a byte cannot hold (a model
    whose vocabulary is larger than 256) become U+FFFD; a tokenizer's special tokens are left out."""
    ids = [int(t) for t in tokens.reshape(-1)]
    if tokenizer is not None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    pieces = bytes(i if 0 <= i < BYTE_VOCAB else 0xFF for i in ids)  # 0xFF is never valid UTF-8: decodes to U+FFFD
    return pieces.decode("utf-8", errors="replace")


def _check_windows(tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if tokens.dim() != 1 or len(tokens) < seq_len + 1:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected a 1-D tensor of at least seq_len + 1 = "
                         f"{seq_len + 1} tokens")


def lm_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
               generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of ``batch_size`` windows at random offsets, targets = inputs shifted by one.

    Offsets come from ``generator`` only, so the same seed gives the same batches, and a run resumed with a
    freshly seeded generator can skip the batches already used to continue exactly.
    """
    _check_windows(tokens, batch_size, seq_len)  # here, not in the generator: bad arguments fail at the call
    return _random_windows(tokens, batch_size, seq_len, generator)


def _random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int,
                    generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    span = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
        windows = tokens[starts[:, None] + span]
        yield windows[:, :-1], windows[:, 1:]


def lm_eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every next-token prediction of ``tokens`` exactly once, in order: deterministic validation batches.

    Consecutive non-overlapping windows of ``seq_len`` are grouped ``batch_size`` at a time; the tokens left
    over at the end form one shorter window in a final batch of its own. A mean of per-batch mean losses
    weighted by target count is then the mean over all ``len(tokens) - 1`` predictions.
    """
    _check_windows(tokens, batch_size, seq_len)
    predictions = len(tokens) - 1
    full = predictions // seq_len
    windows = tokens[: full * seq_len + 1]
    inputs = windows[:-1].reshape(full, seq_len)
    targets = windows[1:].reshape(full, seq_len)
    batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, full, batch_size)]
    start = full * seq_len
    if start < predictions:
        batches.append((tokens[start:-1][None], tokens[start + 1:][None]))
    return batches
