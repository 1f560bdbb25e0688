"""Text-classification task files read into `TaskData`: TSV, CSV, JSONL and TREC's ``.label`` format.

One reader for the files GLUE-style tasks ship in, so `leanformer finetune` needs no per-dataset code:

- ``.tsv``: tab-separated, never quoted (GLUE's files carry bare quotes inside sentences);
- ``.csv``: comma-separated with the usual double-quote quoting;
- ``.jsonl``: one JSON object per line, columns are keys;
- ``.label``: TREC (Li & Roth), ``COARSE:fine question words`` per line; the label is the coarse class.

A first row naming a known text column (``sentence``, ``text``, ``question``, ...) and a known label column
(``label``, ``labels``, ``class``) is a header, and the columns are taken from it; without a header a two-column
file is text then label, and any other layout needs its columns given (0-based indices). Lines are decoded as
UTF-8, falling back to Latin-1 line by line, since real files mix them (TREC's training file has one Latin-1
byte). Bad input raises ValueError naming the file and the line.

    sst2 = load_task("sst2/train.tsv")                    # header sentence<TAB>label
    cola = load_task("cola/in_domain_train.tsv", text=3, label=1)
    vocab = label_vocab(sst2)                             # ['0', '1']
    ids = encode_labels(load_task("sst2/test.tsv"), vocab)
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import is_int
from .split import stratified_split

__all__ = ["FORMATS", "LABEL_COLUMNS", "PAIR_COLUMNS", "TEXT_COLUMNS", "TaskData", "encode_labels", "label_vocab",
           "load_task", "split_task"]

# header names recognised without being asked for, in order of preference
TEXT_COLUMNS = ("sentence", "text", "question", "sentence1", "premise", "question1")
PAIR_COLUMNS = ("sentence2", "hypothesis", "question2")
LABEL_COLUMNS = ("label", "labels", "class")
FORMATS = (".tsv", ".csv", ".jsonl", ".label")
TREC_LABELS = ("coarse", "fine")

Column = int | str | None


@dataclass(frozen=True)
class TaskData:
    """The examples of one task file: texts, optional second texts (sentence pairs), labels as strings, and
    the line each example came from (for error messages about it later, e.g. an unknown test label)."""

    path: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TaskData:
        """The examples at ``indices``, in that order (they keep their file and line numbers)."""
        pick = lambda values: [values[i] for i in indices]
        return TaskData(self.path, pick(self.texts), None if self.pairs is None else pick(self.pairs),
                        pick(self.labels), pick(self.lines))


def load_task(path: str | Path, text: Column = None, pair: Column = None, label: Column = None) -> TaskData:
    """Read a task file (format by suffix, see the module docstring).

    text, pair, label: the columns to use, by header name or 0-based index (JSONL: key names); default: from
    the header, or text=0, label=1 for a two-column file without one. ``pair`` (a second text, e.g. GLUE's
    sentence2) defaults to a header column named sentence2/hypothesis/question2, else none. For TREC files only
    ``label`` may be given: "coarse" (default, 6 classes) or "fine" (e.g. "NUM:dist", 50 classes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path}: " + ("is a folder" if path.is_dir() else "no such file"))
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"task file {path}: unknown format {suffix or '(no suffix)'!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    for name, value in (("text", text), ("pair", pair), ("label", label)):
        if value is not None and not (isinstance(value, str) and value) and not (is_int(value) and value >= 0):
            raise ValueError(f"{name}={value!r}: expected a column name or a 0-based column index")
    lines = _decoded_lines(path)
    if suffix == ".label":
        data = _read_trec(path, lines, text, pair, label)
    elif suffix == ".jsonl":
        data = _read_jsonl(path, lines, text, pair, label)
    else:
        rows = _read_table(lines, "\t" if suffix == ".tsv" else ",", csv.QUOTE_NONE if suffix == ".tsv"
                           else csv.QUOTE_MINIMAL)
        data = _from_table(path, rows, text, pair, label)
    if not len(data):
        raise ValueError(f"task file {path}: no examples")
    return data


def label_vocab(data: TaskData) -> list[str]:
    """The task's classes: the distinct labels of its training file, sorted (label id = position)."""
    return sorted(set(data.labels))


def encode_labels(data: TaskData, vocab: Sequence[str]) -> torch.Tensor:
    """Label ids (int64) of ``data`` under ``vocab``; a label outside it raises ValueError naming file and line."""
    index = {name: i for i, name in enumerate(vocab)}
    for name, line in zip(data.labels, data.lines, strict=True):
        if name not in index:
            raise ValueError(f"{data.path}, line {line}: label {name!r} does not occur in the training data "
                             f"(its labels: {', '.join(vocab)})")
    return torch.tensor([index[name] for name in data.labels], dtype=torch.long)


def split_task(data: TaskData, test_fraction: float, seed: int) -> tuple[TaskData, TaskData]:
    """(train, test) parts of one file, ``test_fraction`` of every class in test, fixed by ``seed``."""
    train, test = stratified_split(encode_labels(data, label_vocab(data)), test_fraction, seed)
    return data.subset(train.tolist()), data.subset(test.tolist())


# -- reading ----------------------------------------------------------------------------------------------


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines with their endings, each UTF-8 if it decodes as such, else Latin-1 (never fails)."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    lines = []
    for raw in data.splitlines(keepends=True):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("latin-1"))
    return lines


def _read_table(lines: list[str], delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank record."""
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    return [(reader.line_num, fields) for fields in reader if any(f.strip() for f in fields)]


def _from_table(path: Path, rows: list[tuple[int, list[str]]], text: Column, pair: Column,
                label: Column) -> TaskData:
    if not rows:
        raise ValueError(f"task file {path}: no examples")
    first_line, first = rows[0]
    header = [f.strip() for f in first]
    lowered = [f.lower() for f in header]
    named = [c for c in (text, pair, label) if isinstance(c, str)]
    known = any(n in lowered for n in TEXT_COLUMNS) and any(n in lowered for n in LABEL_COLUMNS)
    has_header = all(n in header for n in named) if named else known
    width = len(first)

    def column(value: Column, role: str, defaults: tuple[str, ...], fallback: int | None) -> int | None:
        if isinstance(value, str):
            if not has_header:
                raise ValueError(f"task file {path}: column {value!r} given by name, but line {first_line} is not a "
                                 f"header naming it ({header}); give a 0-based index instead")
            return header.index(value)
        if value is not None:
            if value >= width:
                raise ValueError(f"task file {path}: {role} column {value} does not exist, line {first_line} has "
                                 f"{width} columns (indices are 0-based)")
            return value
        if has_header:
            found = [i for i, name in enumerate(lowered) if name in defaults]
            return found[0] if found else fallback
        return fallback

    text_at, label_at = (0, 1) if not has_header and width == 2 else (None, None)  # the plain text<TAB>label layout
    text_i = column(text, "text", TEXT_COLUMNS, text_at)
    label_i = column(label, "label", LABEL_COLUMNS, label_at)
    pair_i = column(pair, "pair", PAIR_COLUMNS, None)
    if text_i is None or label_i is None:
        where = (f"its header {header} names no text column ({', '.join(TEXT_COLUMNS)}) or no label column "
                 f"({', '.join(LABEL_COLUMNS)})" if has_header else
                 f"it has {width} columns and no header (a first line naming one of {', '.join(TEXT_COLUMNS)} and "
                 f"one of {', '.join(LABEL_COLUMNS)})")
        raise ValueError(f"task file {path}: {where}; give the columns, e.g. text=3, label=1")
    data = TaskData(str(path), [], None if pair_i is None else [], [], [])
    for line, fields in rows[1:] if has_header else rows:
        if len(fields) != width:
            raise ValueError(f"{path}, line {line}: {len(fields)} columns, expected {width} as on line {first_line}")
        _append(data, path, line, fields[text_i], None if pair_i is None else fields[pair_i], fields[label_i])
    return data


def _read_jsonl(path: Path, lines: list[str], text: Column, pair: Column, label: Column) -> TaskData:
    for name, value in (("text", text), ("pair", pair), ("label", label)):
        if is_int(value):
            raise ValueError(f"{name}={value}: JSONL lines are objects, give the column as a key name")
    keys: tuple[str | None, ...] | None = None
    data = TaskData(str(path), [], None, [], [])
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line}: not valid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}")
        if keys is None:  # the first object decides which keys hold what
            keys = (_pick_key(record, text, TEXT_COLUMNS), _pick_key(record, pair, PAIR_COLUMNS),
                    _pick_key(record, label, LABEL_COLUMNS))
            if keys[0] is None or keys[2] is None:
                raise ValueError(f"{path}, line {line}: no text key ({', '.join(TEXT_COLUMNS)}) or no label key "
                                 f"({', '.join(LABEL_COLUMNS)}) among {sorted(record)}; give the keys")
            data = TaskData(str(path), [], None if keys[1] is None else [], [], [])
        values = []
        for key in keys:
            if key is None:
                values.append(None)
                continue
            if key not in record:
                raise ValueError(f"{path}, line {line}: no key {key!r}")
            value = record[key]
            if is_int(value) and key == keys[2]:
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(f"{path}, line {line}: {key!r} is {type(value).__name__}, expected a string"
                                 + (" or an integer" if key == keys[2] else ""))
            values.append(value)
        _append(data, path, line, *values)
    return data


def _pick_key(record: dict, given: str | None, defaults: tuple[str, ...]) -> str | None:
    if given is not None:
        return given
    return next((key for key in record if key.lower() in defaults), None)


def _read_trec(path: Path, lines: list[str], text: Column, pair: Column, label: Column) -> TaskData:
    if text is not None or pair is not None or (label is not None and label not in TREC_LABELS):
        raise ValueError(f"task file {path}: TREC .label files have fixed columns; only label='coarse' or "
                         "label='fine' may be chosen")
    data = TaskData(str(path), [], None, [], [])
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        tag, _, question = raw.strip().partition(" ")
        coarse, colon, fine = tag.partition(":")
        if not (colon and coarse and fine):
            raise ValueError(f"{path}, line {line}: expected 'COARSE:fine question words', got {raw.strip()[:60]!r}")
        _append(data, path, line, question, None, tag if label == "fine" else coarse)
    return data


def _append(data: TaskData, path: Path, line: int, text: str, pair: str | None, label: str) -> None:
    """Add one example, refusing an empty text or label with the file and line."""
    text, label = text.strip(), label.strip()
    if not text:
        raise ValueError(f"{path}, line {line}: empty text")
    if pair is not None and not pair.strip():
        raise ValueError(f"{path}, line {line}: empty second text (pair)")
    if not label:
        raise ValueError(f"{path}, line {line}: missing label")
    data.texts.append(text)
    data.labels.append(label)
    data.lines.append(line)
    if data.pairs is not None:
        data.pairs.append(pair.strip())
