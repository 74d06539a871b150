from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kititans.config import DataConfig
from kititans.data.prepare import prepare_dataset
from kititans.data.readers import Corpus, split_text
from kititans.data.shards import is_val
from kititans.data.tokendata import TokenData
from kititans.data.tokenizer import train_tokenizer
from kititans.errors import KititansError

STORY = "Lily had a red ball. She played in the park.\n\nThen it rained, and she went home happy."


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_every_format(tmp_path):
    write(tmp_path / "a" / "story.txt", STORY)
    write(tmp_path / "a" / "notes.md", "# Notes\n\nSome markdown text.")
    write(
        tmp_path / "b.jsonl",
        json.dumps({"text": "a jsonl doc"})
        + "\n\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        )
        + "\n",
    )
    write(tmp_path / "c.json", json.dumps([{"text": "from a json list"}]))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), tmp_path / "d.parquet")
    docs = list(
        Corpus(
            [
                str(tmp_path / "a"),
                str(tmp_path / "*.jsonl"),
                str(tmp_path / "c.json"),
                str(tmp_path / "d.parquet"),
            ]
        )
    )
    assert STORY in docs and "a jsonl doc" in docs and "from a json list" in docs and "parquet two" in docs
    from kititans.data.chat import render_text
    from kititans.data.tokenizer import BOS, CHAT_TEMPLATE

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render_text(CHAT_TEMPLATE, msgs).removeprefix(BOS) in docs  # chat records use the template


@pytest.mark.parametrize(
    "content, message",
    [
        (b"ok text\n\xff\xfe broken", "invalid UTF-8 at byte offset 8"),
        (b"\x00\x01\x02binary", "looks like a binary file"),
    ],
)
def test_bad_files_fail_with_the_offset_or_are_skipped(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    write(tmp_path / "good.txt", STORY)
    with pytest.raises(KititansError, match=message):
        list(Corpus([str(bad)]))
    corpus = Corpus([str(tmp_path)], skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        docs = list(corpus)
    assert docs == [STORY]


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(KititansError, match=r"x.jsonl:2: not valid JSON"):
        list(Corpus([str(p)]))
    p = write(tmp_path / "y.jsonl", '{"body": "no text field"}\n')
    with pytest.raises(KititansError, match=r"y.jsonl:1: no 'text' text field"):
        list(Corpus([str(p)]))
    p = write(tmp_path / "z.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(KititansError, match=r"z.jsonl:1: unknown role 'robot'"):
        list(Corpus([str(p)]))


def test_empty_and_missing_inputs(tmp_path):
    write(tmp_path / "empty.txt", "   \n\n  ")
    with pytest.raises(KititansError, match="corpus is empty"):
        list(Corpus([str(tmp_path / "empty.txt")]))
    with pytest.raises(KititansError, match="no such file"):
        Corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(KititansError, match="no files match"):
        Corpus([str(tmp_path / "*.nothing")])


def test_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    write(tmp_path / "ds" / "train.jsonl", "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    docs = list(Corpus(dataset=str(tmp_path / "ds")))
    assert docs == [f"doc {i}" for i in range(5)]


def test_split_text_groups_paragraphs():
    docs = split_text("\n\n".join(["x" * 900] * 7), target=2000)
    assert len(docs) == 3 and all(d.strip() for d in docs)


def test_shards_split_is_deterministic_and_windows_are_exact(tmp_path):
    docs = [f"Story number {i}. " * 20 for i in range(300)]
    tok = train_tokenizer(docs, tmp_path / "tok", vocab_size=300)
    write(tmp_path / "fwd.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write(tmp_path / "rev.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    m1, m2 = (
        prepare_dataset(
            DataConfig(sources=[str(tmp_path / f"{name}.jsonl")], val_fraction=0.1, seed=3, workers=1),
            tmp_path / name,
            300,
            str(tmp_path / "tok"),
            progress=False,
        )
        for name in ("fwd", "rev")
    )
    assert (m1["train_documents"], m1["val_documents"]) == (m2["train_documents"], m2["val_documents"])
    assert m1["val_documents"] == sum(is_val(d, 3, 0.1) for d in docs) > 0
    assert m1["dtype"] == "uint16" and m1["train_tokens"] + m1["val_tokens"] == sum(
        len(tok.encode(d)) + 2 for d in docs
    )
    data = TokenData(tmp_path / "fwd")
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    x2, _ = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1])
    arr = np.asarray(data.splits["train"])
    assert arr[0] == tok.bos_id
    ev = data.eval_batches(2, 4, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev, data.eval_batches(2, 4, 16)))
