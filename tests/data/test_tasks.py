"""Task files for multi-task fine-tuning: every format, header detection, column choices, errors with file and line."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from tests.conftest import SHARED

from leanformer.data.tasks import encode_labels, label_vocab, load_task, split_task

DATA = SHARED / "data"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_tsv_with_header_keeps_quotes_and_strips_padding(tmp_path):
    path = write(tmp_path, "train.tsv", 'sentence\tlabel\nit \'s "great" \t1\n\nawful , really \t0\n')
    data = load_task(path)
    assert data.texts == ['it \'s "great"', "awful , really"]  # quotes are text in TSV; the blank line is skipped
    assert data.labels == ["1", "0"] and data.lines == [2, 4] and data.pairs is None
    assert data.path == str(path) and len(data) == 2


def test_tsv_without_header_is_text_then_label(tmp_path):
    data = load_task(write(tmp_path, "t.tsv", "Stocks rose\tBusiness\nA goal\tSports\n"))
    assert data.texts == ["Stocks rose", "A goal"] and data.labels == ["Business", "Sports"] and data.lines == [1, 2]


def test_csv_is_quoted(tmp_path):
    data = load_task(write(tmp_path, "t.csv", 'id,text,label\n1,"Hello, world",pos\n2,"say ""hi""",neg\n'))
    assert data.texts == ["Hello, world", 'say "hi"'] and data.labels == ["pos", "neg"]


def test_header_gives_sentence_pairs(tmp_path):
    data = load_task(write(tmp_path, "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA cat.\tAn animal.\tyes\n"))
    assert data.texts == ["A cat."] and data.pairs == ["An animal."] and data.labels == ["yes"]


def test_jsonl_keys_and_integer_labels(tmp_path):
    lines = [json.dumps({"id": 1, "text": "fine day", "label": 1}), "",
             json.dumps({"id": 2, "text": "bad", "label": 0})]
    data = load_task(write(tmp_path, "t.jsonl", "\n".join(lines) + "\n"))
    assert data.texts == ["fine day", "bad"] and data.labels == ["1", "0"] and data.lines == [1, 3]
    other = load_task(write(tmp_path, "o.jsonl", json.dumps({"body": "x", "tag": "a"}) + "\n"), text="body",
                      label="tag")
    assert other.texts == ["x"] and other.labels == ["a"]


def test_column_overrides_by_index_and_name(tmp_path):
    cola = write(tmp_path, "cola.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    data = load_task(cola, text=3, label=1)
    assert data.texts == ["The cat sat.", "Cat the sat."] and data.labels == ["1", "0"]
    named = load_task(write(tmp_path, "n.tsv", "tweet\tmood\nhello\thappy\n"), text="tweet", label="mood")
    assert named.texts == ["hello"] and named.labels == ["happy"]
    swapped = load_task(write(tmp_path, "s.tsv", "pos\tnice one\n"), text=1, label=0)
    assert swapped.texts == ["nice one"] and swapped.labels == ["pos"]


def test_trec_label_format_and_latin1(tmp_path):
    path = write(tmp_path, "t.label", b"NUM:dist How far is it ?\nHUM:ind Who is a sister\xf0city ?\n")
    data = load_task(path)
    assert data.labels == ["NUM", "HUM"] and data.texts[0] == "How far is it ?"
    assert data.texts[1] == "Who is a sister\u00f0city ?"  # the Latin-1 byte read as Latin-1, nothing lost
    assert load_task(path, label="fine").labels == ["NUM:dist", "HUM:ind"]


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), [
    ("a.tsv", "sentence\tlabel\ngood\t1\nbad\n", {}, r"a\.tsv, line 3: 1 columns, expected 2"),
    ("b.tsv", "sentence\tlabel\n  \t1\n", {}, r"b\.tsv, line 2: empty text"),
    ("c.tsv", "good\t1\nbad\t \n", {}, r"c\.tsv, line 2: missing label"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', {}, r"d\.jsonl, line 2: not valid JSON"),
    ("e.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n', {}, r"e\.jsonl, line 2: expected a JSON object"),
    ("f.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, r"f\.jsonl, line 2: no key 'label'"),
    ("g.label", "NUM:dist How far ?\nno colon here\n", {}, r"g\.label, line 2: expected 'COARSE:fine"),
    ("h.tsv", "gj04\t1\t\tok\n", {}, r"h\.tsv: .*4 columns and no header.*text=3, label=1"),
    ("i.tsv", "a\tb\n", {"text": 5, "label": 1}, r"text column 5 does not exist"),
    ("j.tsv", "a\tb\n", {"text": "sentence"}, r"column 'sentence' given by name.*not a header"),
    ("k.txt", "a\tb\n", {}, r"unknown format '\.txt'"),
    ("l.tsv", "sentence\tlabel\n", {}, r"l\.tsv: no examples"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_task(write(tmp_path, name, content), **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_task(tmp_path / "nope.tsv")


def test_labels_are_the_sorted_training_labels_and_unknown_test_labels_are_refused(tmp_path):
    train = load_task(write(tmp_path, "train.tsv", "x\tb\ny\ta\nz\tb\n"))
    assert label_vocab(train) == ["a", "b"]
    assert torch.equal(encode_labels(train, label_vocab(train)), torch.tensor([1, 0, 1]))
    test = load_task(write(tmp_path, "test.tsv", "x\ta\ny\tc\n"))
    with pytest.raises(ValueError, match=r"test\.tsv, line 2: label 'c' does not occur in the training data"):
        encode_labels(test, label_vocab(train))


def test_split_holds_out_a_stratified_fraction(tmp_path):
    data = load_task(write(tmp_path, "t.tsv", "".join(f"text {i}\t{'ab'[i % 2]}\n" for i in range(40))))
    train, test = split_task(data, 0.25, seed=0)
    assert len(train) == 30 and len(test) == 10
    assert collections.Counter(test.labels) == {"a": 5, "b": 5}
    assert sorted(train.lines + test.lines) == data.lines  # a partition, lines kept for messages
    assert split_task(data, 0.25, seed=0)[1].lines == test.lines  # fixed by the seed


# the real files in ../shared/data (MANIFEST.md gives their formats and counts)
REAL = [
    ("sst2/train.tsv", {}, 60614, {"1": 33828, "0": 26786}),
    ("sst2/test.tsv", {}, 872, {"1": 444, "0": 428}),
    ("agnews/dev.tsv", {}, 10001, {"Sci/Tech": 2538, "World": 2509, "Business": 2496, "Sports": 2458}),
    ("agnews/test.tsv", {}, 7600, dict.fromkeys(("World", "Sports", "Business", "Sci/Tech"), 1900)),
    ("trec/train_5500.label", {}, 5452, {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835,
                                         "NUM": 896}),
    ("trec/TREC_10.label", {}, 500, {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65, "LOC": 81, "NUM": 113}),
    ("cola/in_domain_train.tsv", {"text": 3, "label": 1}, 8551, {"1": 6023, "0": 2528}),
    ("cola/in_domain_dev.tsv", {"text": 3, "label": 1}, 527, {"1": 365, "0": 162}),
]


@pytest.mark.parametrize(("name", "columns", "count", "labels"), REAL, ids=[r[0] for r in REAL])
def test_real_shared_files(name, columns, count, labels):
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared data {path} is not available")
    data = load_task(path, **columns)
    # agnews/dev.tsv: MANIFEST.md says 10,000 examples, its per-label counts (and the file) have 10,001
    assert len(data) == count and collections.Counter(data.labels) == labels
    assert all(data.texts) and data.pairs is None


def test_real_train_and_test_labels_agree():
    pairs = [("sst2/train.tsv", "sst2/test.tsv", {}), ("trec/train_5500.label", "trec/TREC_10.label", {}),
             ("cola/in_domain_train.tsv", "cola/in_domain_dev.tsv", {"text": 3, "label": 1})]
    for train_name, test_name, columns in pairs:
        if not (DATA / train_name).is_file():
            pytest.skip("shared data is not available")
        vocab = label_vocab(load_task(DATA / train_name, **columns))
        assert len(encode_labels(load_task(DATA / test_name, **columns), vocab))
    trec = load_task(DATA / "trec/train_5500.label")
    assert any("\u00f0" in text for text in trec.texts)  # the one Latin-1 byte, read as a character
    assert load_task(DATA / "sst2/train.tsv").lines[0] == 2  # line 1 is the header
