"""`kititans data` at scale: compressed and streamed inputs, deterministic parallel tokenization, shards,
dedup, append, limits, mixtures, and what happens when things go wrong. Every corpus is made here."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random

import numpy as np
import pytest
import torch

from kititans.cli import main
from kititans.config import DataConfig
from kititans.data import streams
from kititans.data.prepare import prepare_dataset
from kititans.data.readers import Corpus
from kititans.data.shards import MANIFEST, load_manifest, verify_shards
from kititans.data.tokendata import Mixture, TokenData
from kititans.errors import KititansError

zstandard = pytest.importorskip("zstandard")

WORDS = "the a cat dog ran sat on mat big red blue happy sad park home ball tree sun moon".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + f" (story {seed}-{i})."
        for i in range(n)
    ]


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def write_zst(path, text: str):
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return path


def cfg(sources, **over) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], **{"val_fraction": 0.1, "workers": 1, **over})


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(600)
    write_jsonl(d / "a.jsonl", docs[:300])
    write_jsonl(d / "b.jsonl", docs[300:])
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("tok")
    prepare_dataset(cfg([corpus_dir]), out / "ds", 320, progress=False)
    return out / "ds"


def test_compressed_inputs_read_like_plain_ones(tmp_path):
    docs = make_docs(40)
    text = "\n\n".join(docs)
    (tmp_path / "plain.txt").write_text(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write(text)
    with bz2.open(tmp_path / "b.md.bz2", "wt") as f:
        f.write(text)
    with lzma.open(tmp_path / "c.json.xz", "wt") as f:
        json.dump([{"text": d} for d in docs], f)
    write_zst(tmp_path / "d.jsonl.zst", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    plain = list(Corpus([str(tmp_path / "plain.txt")]))
    assert list(Corpus([str(tmp_path / "a.txt.gz")])) == plain == list(Corpus([str(tmp_path / "b.md.bz2")]))
    assert (
        list(Corpus([str(tmp_path / "c.json.xz")])) == docs == list(Corpus([str(tmp_path / "d.jsonl.zst")]))
    )
    assert len(Corpus([str(tmp_path)]).files) == 5  # a folder finds compressed files too


@pytest.mark.parametrize("suffix", [".txt.gz", ".jsonl.zst", ".txt.xz"])
def test_truncated_archives_name_file_and_offset_or_are_skipped(tmp_path, suffix):
    docs = make_docs(300)
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs) if "jsonl" in suffix else "\n\n".join(docs)
    raw = {
        ".txt.gz": gzip.compress,
        ".txt.xz": lzma.compress,
        ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b),
    }[suffix](body.encode())
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(raw[: len(raw) // 2])
    (tmp_path / "good.txt").write_text(docs[0])
    with pytest.raises(
        KititansError, match=rf"bad{suffix.replace('.', '[.]')}: truncated or corrupt .* byte"
    ):
        list(Corpus([str(bad)]))
    corpus = Corpus([str(bad), str(tmp_path / "good.txt")], skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        got = list(corpus)
    assert got[-1] == docs[0] and len(corpus.stats.skipped_files) == 1


def test_streaming_text_equals_split_text_at_every_chunk_boundary(tmp_path, monkeypatch):
    rng = random.Random(1)
    pieces = ["word", "x" * 700, "  ", "\t", "\n", "\n\n", "\n \n", "\n\n\n  \n", "é日本", " \n\t\n "]
    text = "".join(rng.choice(pieces) for _ in range(4000))
    path = tmp_path / "t.txt"
    path.write_text(text)
    for read_bytes in (7, 64, 1000):
        monkeypatch.setattr(streams, "READ_BYTES", read_bytes)
        assert list(Corpus([str(path)])) == streams.split_text(text), read_bytes


def test_json_array_streams_one_record_at_a_time(tmp_path, monkeypatch):
    docs = make_docs(200)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"text": d, "pad": "y" * 5000} for d in docs], indent=1))
    monkeypatch.setattr(streams, "READ_BYTES", 4096)
    assert list(Corpus([str(path)])) == docs
    path.write_text('[{"text": "ok"},\n{"text": "fine"}\n{"text": "no comma"}]')
    with pytest.raises(KititansError, match=r"big.json:3: not valid JSON \(expected ','"):
        list(Corpus([str(path)]))


def test_workers_give_byte_identical_shards(tmp_path, corpus_dir, tok_dir):
    out = {}
    for n in (1, 2):
        m = prepare_dataset(
            cfg([corpus_dir], workers=n, shard_mb=0.02), tmp_path / f"w{n}", 0, str(tok_dir), progress=False
        )
        out[n] = m
        assert len(m["splits"]["train"]["shards"]) > 2  # several shards at this cap
    assert out[1]["splits"] == out[2]["splits"]  # names, token counts and sha256 of every shard
    for s in out[1]["splits"]["train"]["shards"]:
        assert (tmp_path / "w1" / s["file"]).read_bytes() == (tmp_path / "w2" / s["file"]).read_bytes()
    verify_shards(tmp_path / "w2", checksums=True)


def test_sharded_data_samples_exactly_like_one_file(tmp_path, corpus_dir, tok_dir):
    one = TokenData(tok_dir)  # one shard per split
    prepare_dataset(cfg([corpus_dir], shard_mb=0.01), tmp_path / "many", 0, str(tok_dir), progress=False)
    many = TokenData(tmp_path / "many")
    assert len(many.manifest["splits"]["train"]["shards"]) > 3
    assert np.array_equal(np.asarray(one.splits["train"]), np.asarray(many.splits["train"]))
    for step in range(5):
        a = one.batch("train", 8, 64, torch.Generator().manual_seed(step))
        b = many.batch("train", 8, 64, torch.Generator().manual_seed(step))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(one.eval_batches(2, 4, 32), many.eval_batches(2, 4, 32))
    )


def test_format_1_datasets_still_load(tmp_path, tok_dir):
    new = TokenData(tok_dir)
    old = tmp_path / "v1"
    old.mkdir()
    m = load_manifest(tok_dir)
    for split in ("train", "val"):
        np.asarray(new.splits[split]).tofile(old / f"{split}.bin")
    v1 = {
        "dtype": m["dtype"],
        "vocab_size": m["vocab_size"],
        "tokenizer_sha256": m["tokenizer_sha256"],
        **{f"{s}_{k}": m[f"{s}_{k}"] for s in ("train", "val") for k in ("tokens", "documents")},
        "sources": ["x"],
        "val_fraction": 0.1,
        "seed": 0,
        "format_version": 1,
        "files": {"train": "train.bin", "val": "val.bin"},
    }
    (old / MANIFEST).write_text(json.dumps(v1))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (old / f).write_bytes((tok_dir / f).read_bytes())
    a = TokenData(old).batch("train", 4, 32, torch.Generator().manual_seed(0))
    b = new.batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0])


def test_dedup_drops_exact_duplicates_and_counts_them(tmp_path, tok_dir):
    docs = make_docs(100, seed=5)
    write_jsonl(tmp_path / "x.jsonl", docs + docs[:30])
    write_jsonl(tmp_path / "y.jsonl", docs[:10])
    m = prepare_dataset(
        cfg([tmp_path / "x.jsonl", tmp_path / "y.jsonl"]), tmp_path / "d", 0, str(tok_dir), progress=False
    )
    seg = m["segments"][-1]
    assert seg["duplicates"] == 40 and m["train_documents"] + m["val_documents"] == 100
    assert {s["source"].split("/")[-1]: s["duplicates"] for s in seg["sources"]} == {
        "x.jsonl": 30,
        "y.jsonl": 10,
    }
    m2 = prepare_dataset(
        cfg([tmp_path / "x.jsonl"], dedup=False), tmp_path / "nd", 0, str(tok_dir), progress=False
    )
    assert m2["train_documents"] + m2["val_documents"] == 130


def test_append_adds_shards_without_retokenizing(tmp_path, corpus_dir, tok_dir):
    ds = tmp_path / "ds"
    prepare_dataset(cfg([corpus_dir / "a.jsonl"]), ds, 0, str(tok_dir), progress=False)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ds.glob("*.bin")}
    more = make_docs(50, seed=9)
    write_jsonl(tmp_path / "more.jsonl", more + make_docs(300)[:20])  # 20 documents already in a.jsonl
    assert main(["data", str(tmp_path / "more.jsonl"), "--append", str(ds), "-q", "--workers", "1"]) == 0
    m = load_manifest(ds)
    assert m["segments"][-1]["duplicates"] == 20 and len(m["segments"]) == 2
    assert {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ds.glob("*.bin") if p.name in before
    } == before
    fresh = prepare_dataset(
        cfg([corpus_dir / "a.jsonl", tmp_path / "more.jsonl"]),
        tmp_path / "all",
        0,
        str(tok_dir),
        progress=False,
    )
    assert (m["train_tokens"], m["val_tokens"]) == (fresh["train_tokens"], fresh["val_tokens"])
    data = TokenData(ds)
    assert len(data.splits["train"]) == m["train_tokens"]
    other = tmp_path / "other"
    prepare_dataset(cfg([corpus_dir / "b.jsonl"]), other, 300, progress=False)  # its own tokenizer
    with pytest.raises(KititansError, match="is not the tokenizer of this dataset"):
        prepare_dataset(cfg([tmp_path / "more.jsonl"]), ds, 0, str(other), append=True, progress=False)


def test_max_docs_and_max_tokens(tmp_path, corpus_dir, tok_dir):
    m = prepare_dataset(cfg([corpus_dir], max_docs=50), tmp_path / "d", 0, str(tok_dir), progress=False)
    assert m["segments"][-1]["documents_read"] == 50
    for workers in (1, 2):
        m = prepare_dataset(
            cfg([corpus_dir], max_tokens=20_000, workers=workers),
            tmp_path / f"t{workers}",
            0,
            str(tok_dir),
            progress=False,
        )
        assert 20_000 <= m["train_tokens"] + m["val_tokens"] < 20_000 + 200
    assert load_manifest(tmp_path / "t1")["splits"] == load_manifest(tmp_path / "t2")["splits"]


def test_dataset_streams_local_hub_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    ds = tmp_path / "hub"
    (ds / "data").mkdir(parents=True)
    docs = make_docs(80)
    pq.write_table(pa.table({"text": docs[:60]}), ds / "data" / "train-00000.parquet")
    pq.write_table(pa.table({"text": docs[60:]}), ds / "data" / "test-00000.parquet")
    assert list(Corpus(dataset=str(ds))) == docs[:60]
    assert list(Corpus(dataset=str(ds), split="test")) == docs[60:]
    assert list(Corpus(dataset=str(ds), max_docs=5)) == docs[:5]
    with pytest.raises(KititansError, match="could not stream dataset .* split 'nope'"):
        list(Corpus(dataset=str(ds), split="nope"))
    assert datasets  # the same code path streams from the hub by name


def test_mixture_samples_by_weight(tmp_path, corpus_dir, tok_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_dataset(cfg([corpus_dir / "a.jsonl"]), a, 0, str(tok_dir), progress=False)
    prepare_dataset(cfg([corpus_dir / "b.jsonl"]), b, 0, str(tok_dir), progress=False)
    mix = Mixture([TokenData(a), TokenData(b)], [0.8, 0.2])
    rows = mix.sample("train", 4000, 32, torch.Generator().manual_seed(0))
    assert abs((rows[:, 0] == 0).float().mean().item() - 0.8) < 0.03
    x, y = mix.gather("train", rows[:8], 32)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    again = mix.sample("train", 4000, 32, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)
    with pytest.raises(KititansError, match="--weights has 3 values for 2"):
        Mixture([TokenData(a), TokenData(b)], [1, 1, 1])
    other = tmp_path / "o"
    prepare_dataset(cfg([corpus_dir / "b.jsonl"]), other, 300, progress=False)
    with pytest.raises(KititansError, match="different tokenizers"):
        Mixture([TokenData(a), TokenData(other)], [1, 1])


def test_japanese_report_uses_characters_per_token(tmp_path):
    rng = random.Random(0)
    kana = [chr(c) for c in range(0x3041, 0x3097)] + ["日本", "東京", "学校", "。"]
    docs = ["".join(rng.choice(kana) for _ in range(300)) for _ in range(200)]
    write_jsonl(tmp_path / "ja.jsonl", docs)
    m = prepare_dataset(cfg([tmp_path / "ja.jsonl"]), tmp_path / "ja", 600, progress=False)
    rep = m["tokenizer"]
    assert rep["tokens_per_word"] is None and rep["chars_per_token"] > 1.0
    assert rep["roundtrip_failures"] == 0 and rep["sample"]["documents"] > 0


def test_sample_is_the_same_in_any_read_order(tmp_path, corpus_dir):
    from kititans.data.sampling import draw_sample

    c1 = draw_sample(Corpus([str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.jsonl")]), cfg([]), False)
    c2 = draw_sample(
        Corpus([str(corpus_dir / "b.jsonl"), str(corpus_dir / "a.jsonl")]),
        cfg([], tokenizer_sample_mb=0.02),
        False,
    )
    c3 = draw_sample(
        Corpus([str(corpus_dir / "b.jsonl"), str(corpus_dir / "a.jsonl")]),
        cfg([], tokenizer_sample_mb=0.02),
        False,
    )
    assert c2.train == c3.train and 0 < c2.info["bytes"] <= 0.02e6 + 1000
    assert set(c2.train) <= set(c1.train)  # bottom-k: a smaller budget keeps a subset
