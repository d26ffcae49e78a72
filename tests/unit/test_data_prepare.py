"""Preparation (pikv/data/prepare.py): formats, the split, exact tokens, resume, errors, and the
loader on prepared (memory-mapped, sharded) data. References: `Tokenizer.encode` /
`pack_documents` on the whole text, and the loader over one concatenated array."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from pikv.data import (BlockLoader, DataError, PrepareSpec, PreparedDir, ShardedTokens, load_tokenizer, pack_documents,
                       prepare, train_bpe)
from pikv.data import sources
from pikv.data.encode import WordCacheEncoder, word_cache_applies

REPO = Path(__file__).resolve().parents[2]
# single-file sources split by ranges on purpose here; the warning itself is tested below
pytestmark = pytest.mark.filterwarnings("ignore:.*contiguous ranges:UserWarning")
SPLITS = ("train", "validation", "heldout")
# Text that exercises every branch of the GPT-2 pattern: contractions, Unicode letters and numbers,
# runs of spaces before words and newlines, CRLF, a literal separator, tabs, non-breaking spaces.
TRICKY = ("It's naïve café — 東京 🚀\tspaces   and\r\nCRLF, <|endoftext|> literal 12345 ½ ² x\u00a0y \n\n"
          "  z's 'S\n    indented\n\n\nTHE END.\nHAMLET. Who's there?\n  \n")


def _text(seed: int, n_lines: int) -> str:
    rng = np.random.default_rng(seed)
    syllables = ["ka", "the", "ro", "ing", "Ham", "let", "doth", "’tis", "ïve", "東京", "42", "!", "I'll", "O,"]
    words = [a + b for a in syllables for b in syllables] + ["  ", "\t"]
    lines = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n" + TRICKY


@pytest.fixture(scope="module")
def tok():
    return train_bpe([_text(s, 400) for s in range(4)], 400)


def _spec(source, tmp_path, **kw) -> PrepareSpec:
    kw.setdefault("vocab_size", 400)
    return PrepareSpec(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def _docs_and_tokens(out: Path):
    p = PreparedDir(out)
    return {s: p.documents(s) for s in SPLITS}, {s: np.asarray(p.tokens(s)) for s in SPLITS}, p


# ---------------------------------------------------------------- encoder


def test_word_cache_encoder_equals_tokenizers_encode(tok):
    enc = WordCacheEncoder(tok)
    assert enc.cached
    texts = [_text(9, 300), TRICKY, "", " leading", "a<|endoftext|>b"]
    tok.encode_special_tokens = True
    ref = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert [list(a) for a in enc.encode(texts, np.uint16)] == ref
    assert [list(a) for a in enc.encode(texts, np.uint16)] == ref  # warm cache, same ids


def test_other_tokenizers_use_encode_batch(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # a different pipeline: no word cache
    other = Tokenizer.from_str(json.dumps(spec))
    assert not word_cache_applies(other) and word_cache_applies(tok)
    wp = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    assert not word_cache_applies(wp)
    assert list(WordCacheEncoder(other).encode([TRICKY], np.uint16)[0]) == other.encode(TRICKY).ids


# ---------------------------------------------------------------- formats


def _write_sources(d: Path) -> dict[str, str]:
    """Eight documents across .txt, .jsonl, .jsonl.gz; returns name -> text."""
    d.mkdir(parents=True)
    texts = {f"t{i}": _text(i, 60) for i in range(3)}
    for name, text in texts.items():
        (d / f"{name}.txt").write_text(text)
    rows = [{"text": _text(10 + i, 30), "id": i} for i in range(3)]
    (d / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts.update({f"r:{i}": r["text"] for i, r in enumerate(rows)})
    with gzip.open(d / "z.jsonl.gz", "wt") as fh:
        for i in range(2):
            fh.write(json.dumps({"text": _text(20 + i, 30)}) + "\n")
            texts[f"z:{i}"] = _text(20 + i, 30)
    return texts


def _check_prepared(out: Path, tokenizer, texts: dict[str, str]) -> None:
    """Every document decoded back exactly, in one split only; tokens = pack_documents of them."""
    docs, tokens, _ = _docs_and_tokens(out)
    assert sorted(d.name for s in SPLITS for d in docs[s]) == sorted(texts)
    for s in SPLITS:
        assert all(d.text == texts[d.name] for d in docs[s])
        assert np.array_equal(tokens[s], pack_documents(tokenizer, docs[s]))


def test_directory_of_txt_jsonl_gz_by_documents(tmp_path, tok):
    texts = _write_sources(tmp_path / "src")
    out = prepare(_spec(tmp_path / "src", tmp_path, tokenizer=str(_save(tok, tmp_path)), validation_docs=1,
                        heldout_docs=2), tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_mode"] == "documents" and manifest["dtype"] == "uint16"
    assert [manifest["splits"][s]["docs"] for s in SPLITS] == [5, 1, 2]
    _check_prepared(out, tok, texts)
    glob_out = prepare(_spec(tmp_path / "src" / "*.txt", tmp_path, tokenizer=str(_save(tok, tmp_path)),
                             validation_docs=1, heldout_docs=1), tmp_path / "glob")
    assert PreparedDir(glob_out).manifest["splits"]["train"]["docs"] == 1


def _save(tok, tmp_path: Path) -> Path:
    tok.save(str(tmp_path / "tok.json"))
    return tmp_path / "tok.json"


def test_parquet_and_save_to_disk_written_by_datasets(tmp_path, tok):
    import datasets
    texts = {i: _text(30 + i, 40) for i in range(8)}
    ds = datasets.Dataset.from_dict({"content": list(texts.values()), "n": list(texts)})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "arrow"))
    datasets.DatasetDict({"a": ds.select(range(4)), "b": ds.select(range(4, 8))}).save_to_disk(str(tmp_path / "dd"))
    kw = dict(tokenizer=str(_save(tok, tmp_path)), text_field="content", validation_docs=1, heldout_docs=1)
    _check_prepared(prepare(_spec(tmp_path / "x.parquet", tmp_path, **kw), tmp_path / "p"), tok,
                    {f"x:{i}": t for i, t in texts.items()})
    _check_prepared(prepare(_spec(tmp_path / "arrow", tmp_path, **kw), tmp_path / "a"), tok,
                    {f"arrow:{i}": t for i, t in texts.items()})
    _check_prepared(prepare(_spec(tmp_path / "dd", tmp_path, **kw), tmp_path / "d"), tok,
                    {f"dd:{s}:{i}": texts[i + 4 * (s == "b")] for s in "ab" for i in range(4)})
    with pytest.raises(DataError, match=r"x.parquet: no text column 'text' \(columns: content, n\)"):
        prepare(_spec(tmp_path / "x.parquet", tmp_path, tokenizer=kw["tokenizer"]), tmp_path / "bad")


def test_large_text_file_in_pieces_is_tokenized_exactly(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 2048)  # ~60 pieces, cut at pre-token boundaries
    text = _text(5, 3000)
    (tmp_path / "big.txt").write_text(text)
    rows = list(sources.read_text_file(tmp_path / "big.txt", "big"))
    assert len(rows) > 20 and "".join(r[1] for r in rows) == text and [r[2] for r in rows].count(True) == 1
    out = prepare(_spec(tmp_path / "big.txt", tmp_path, validation_docs=0, heldout_docs=0), tmp_path / "out")
    trained = load_tokenizer(str(out / "tokenizer.json"))
    p = PreparedDir(out)
    docs = {s: p.documents(s) for s in SPLITS}
    assert "".join(docs[s][0].text for s in SPLITS) == text  # three contiguous ranges, nothing lost
    train_text = docs["train"][0].text
    assert trained.to_str() == train_bpe([train_text], 400).to_str()  # the BPE saw the train range only
    assert np.array_equal(np.asarray(p.tokens("train"))[1:], trained.encode(train_text).ids)


def test_single_small_file_splits_by_ranges_with_one_warning(tmp_path):
    text = _text(3, 2000)
    (tmp_path / "corpus.txt").write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = prepare(_spec(tmp_path / "corpus.txt", tmp_path, validation_fraction=0.1, heldout_fraction=0.05),
                      tmp_path / "out")
    assert [str(w.message) for w in caught if "contiguous ranges" in str(w.message)] and len(caught) == 1
    info = json.loads((out / "data_split.json").read_text())
    assert info["split_mode"] == "ranges"
    size = len(text.encode())
    for split, share in (("validation", 0.1), ("heldout", 0.05)):
        assert abs(info["splits"][split]["bytes"] - share * size) < 8, split  # cut at a character boundary
    assert sum(info["splits"][s]["bytes"] for s in SPLITS) == size


def test_num_proc_and_shard_size_do_not_change_tokens(tmp_path):
    _write_sources(tmp_path / "src")
    spec = _spec(tmp_path / "src", tmp_path, validation_docs=1, heldout_docs=1)
    one = prepare(spec, tmp_path / "one", num_proc=1)
    two = prepare(spec, tmp_path / "two", num_proc=2, shard_bytes=1000)
    assert len(PreparedDir(two).splits["train"]["shards"]) >= 3
    for s in SPLITS:
        a, b = PreparedDir(one).tokens(s), PreparedDir(two).tokens(s)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(PreparedDir(one).doc_starts(s), PreparedDir(two).doc_starts(s))
    assert prepare(spec, tmp_path / "one") == tmp_path / "one"  # complete: nothing redone
    with pytest.raises(DataError, match=r"already holds data prepared with different settings \(split_seed"):
        prepare(_spec(tmp_path / "src", tmp_path, validation_docs=1, heldout_docs=1, split_seed=5), tmp_path / "one")


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train" / "prepare_data.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_preparation_resumes_without_redoing_shards(tmp_path):
    _write_sources(tmp_path / "src")
    for i in range(30):
        (tmp_path / "src" / f"more{i}.txt").write_text(_text(100 + i, 400))
    args = ["--source", tmp_path / "src", "--vocab-size", 400, "--shard-size-mb", 0.01, "--cache-dir", tmp_path / "c"]
    assert _cli(*args, "--out", tmp_path / "straight").wait(300) == 0
    proc = _cli(*args, "--out", tmp_path / "killed")
    train = tmp_path / "killed" / "train"
    deadline = time.time() + 120
    while not (train.is_dir() and len(list(train.glob("*.bin"))) >= 2) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "finished before the kill: nothing tested"
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train.glob("*.bin")}
    assert done and (tmp_path / "killed" / ".work" / "plan.json").is_file()
    assert _cli(*args, "--out", tmp_path / "killed").wait(300) == 0
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in done.items())  # not redone
    for path in sorted((tmp_path / "straight").rglob("*")):
        twin = tmp_path / "killed" / path.relative_to(tmp_path / "straight")
        assert path.is_dir() or path.read_bytes() == twin.read_bytes(), path
    assert not (tmp_path / "killed" / ".work").exists()


# ---------------------------------------------------------------- errors


def test_bad_input_errors_name_file_and_problem(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" + _text(1, 500).encode())
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    cases = {"empty.txt": r"empty.txt: empty file", "latin1.txt": r"latin1.txt: byte 3 \(0xe9\) is not valid UTF-8",
             "rows.jsonl": r"rows.jsonl: line 2 has no text field 'text' \(fields: body\)",
             "broken.jsonl": r"broken.jsonl: line 2 is not JSON"}
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            prepare(_spec(tmp_path / name, tmp_path), tmp_path / f"out-{name}")
    out = prepare(_spec(tmp_path / "latin1.txt", tmp_path, errors="replace"), tmp_path / "ok")
    assert "caf\ufffd au lait" in "".join(d.text for s in SPLITS for d in PreparedDir(out).documents(s))


def test_truncated_shard_and_tokenizer_mismatch(tmp_path, tok):
    (tmp_path / "c.txt").write_text(_text(1, 500))
    out = prepare(_spec(tmp_path / "c.txt", tmp_path), tmp_path / "out")
    PreparedDir(out).check_tokenizer(load_tokenizer(str(out / "tokenizer.json")), "same")
    with pytest.raises(DataError, match=r"tok.json' does not match the tokenizer of the prepared data"):
        PreparedDir(out).check_tokenizer(tok, f"data.tokenizer {str(_save(tok, tmp_path))!r}")
    shard = out / "train" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"{shard}: truncated or damaged token shard: \d+ bytes, the manifest says"):
        PreparedDir(out)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    proc = _cli("--source", tmp_path / "bad.txt", "--out", tmp_path / "out", "--cache-dir", tmp_path / "c")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip() == f"error: {tmp_path / 'bad.txt'}: byte 3 (0xff) is not valid UTF-8; fix the file or pass " \
                          f"--errors replace (data.errors=replace)"


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
def test_gguf_file_that_is_no_model(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\0\0")
    with pytest.raises(ValueError, match=r"x.gguf': transformers could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "x.gguf"))


def test_gguf_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    (tmp_path / "x.gguf").write_bytes(b"GGUF\0\0")
    with pytest.raises(ValueError, match=r"x.gguf': reading a GGUF model's tokenizer needs the `gguf` package"):
        load_tokenizer(str(tmp_path / "x.gguf"))


# ---------------------------------------------------------------- the loader on prepared data


def _sharded(n: int, cuts: list[int]) -> tuple[np.ndarray, ShardedTokens]:
    flat = np.arange(n, dtype=np.int64) % 60000
    parts = np.split(flat.astype(np.uint16), cuts)
    return flat, ShardedTokens(parts)


def test_sharded_tokens_index_like_one_array():
    flat, sharded = _sharded(1000, [7, 8, 500])
    idx = np.random.default_rng(0).integers(0, 1000, size=(13, 9))
    assert len(sharded) == 1000 and np.array_equal(sharded[idx], flat[idx])
    assert np.array_equal(sharded[5:510], flat[5:510]) and int(sharded[-1]) == flat[-1]
    with pytest.raises(IndexError, match=r"out of range for 1000 tokens"):
        sharded[np.array([3, 1000])]


def test_loader_on_shards_exact_resume_and_dp_change():
    flat, sharded = _sharded(3001, [100, 1500, 1501, 2900])
    ref = BlockLoader(flat, 8, batch_size=8, seed=4)
    old = [BlockLoader(sharded, 8, batch_size=4, dp_rank=r, dp_size=2, seed=4) for r in range(2)]
    for _ in range(3):
        assert torch.equal(torch.cat([o.next_batch()[0] for o in old]), ref.next_batch()[0])
    state = json.loads(json.dumps(old[1].state_dict()))
    new = [BlockLoader(sharded, 8, batch_size=2, dp_rank=r, dp_size=4, seed=4) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    for _ in range(4):
        batch = [n.next_batch() for n in new]
        x, y = ref.next_batch()
        assert torch.equal(torch.cat([b[0] for b in batch]), x) and torch.equal(torch.cat([b[1] for b in batch]), y)


def test_a_failed_preparation_is_reported_on_every_rank(tmp_path):
    from pikv.config import DataConfig, JobConfig
    from pikv.data import prepare_data
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xc3(\n")
    cfg = JobConfig()
    cfg.data = DataConfig(source=str(tmp_path / "bad.txt"), cache_dir=str(tmp_path / "cache"))
    message = r"bad.txt: byte 5 \(0xc3\) is not valid UTF-8"
    with pytest.raises(DataError, match=message):
        prepare_data(cfg, None, True, lambda: None)  # the main rank
    with pytest.raises(DataError, match=message):  # another rank, after the barrier
        prepare_data(cfg, None, False, lambda: None)


def test_hub_dataset_prepares_through_the_same_rows(tmp_path, monkeypatch, tok):
    import datasets  # an offline stand-in for the hub: load_dataset returns a DatasetDict
    rows = {"train": [_text(40 + i, 30) for i in range(6)], "test": [_text(50, 30), ""]}
    fake = datasets.DatasetDict({s: datasets.Dataset.from_dict({"content": v}) for s, v in rows.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: fake if name == "someone/corpus" else None)
    out = prepare(_spec("someone/corpus", tmp_path, tokenizer=str(_save(tok, tmp_path)), text_field="content",
                        validation_docs=1, heldout_docs=1), tmp_path / "out")
    texts = {f"{s}:{i}": t for s, v in rows.items() for i, t in enumerate(v) if t}
    _check_prepared(out, tok, texts)  # the empty row is no document


def _write_gguf_with_tokenizer(path: Path, tok: Tokenizer) -> None:
    """A minimal Llama-architecture GGUF file whose tokenizer is `tok` (byte-level BPE), written with
    the gguf package the way llama.cpp's converter stores a GPT-2-style vocabulary."""
    import gguf

    spec = json.loads(tok.to_str())["model"]
    vocab = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64), writer.add_embedding_length(16), writer.add_block_count(1)
    writer.add_feed_forward_length(32), writer.add_head_count(2), writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_dimension_count(8), writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre("default"), writer.add_token_list(vocab)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in vocab])  # 3 = control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(0), writer.add_eos_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(vocab), 16), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
def test_gguf_model_tokenizer_encodes_as_the_tokenizer_it_was_written_from(tmp_path):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 50, trainer)
    _write_gguf_with_tokenizer(tmp_path / "model.gguf", tok)
    loaded = load_tokenizer(str(tmp_path / "model.gguf"))
    text = "hello world, the lazy fox jumps; unseen words too: zebra 123"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert loaded.get_vocab_size() == tok.get_vocab_size()
