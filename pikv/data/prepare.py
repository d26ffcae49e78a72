"""Source -> prepared directory: token shards read by memory map, document index, split, tokenizer.

  python -m pikv.data.prepare --source SRC --out DIR [--tokenizer T] [--num-proc N]   (= train/prepare_data.py)

The shape of nanoGPT's openwebtext/prepare.py (tokenize in parallel, write flat uint16 tokens for
np.memmap) with Megatron's indexed layout (a document index next to the tokens, several files):

  1. read   the source into `.work/rows.arrow` (Arrow IPC, memory-mapped later): one row per
            record or .txt piece (pikv/data/sources.py), with its document number
  2. split  by document, hashed on (split_seed, name) (pikv/data/corpus.py), or, with fewer
            documents than that needs, by contiguous byte ranges at the end of the text (one warning)
  3. tokenizer  trained on the train split only ('bpe') or loaded; saved as tokenizer.json
  4. shards every split is cut into shards of about `shard_bytes` of text; each shard is one job:
            tokenize (pikv/data/encode.py), write <split>/<k>.idx.npy (document starts) then
            <split>/<k>.bin, each through a temp file renamed into place. A killed run resumes
            with the shards that exist; the shard layout is fixed by the plan, not by --num-proc.
  5. manifest.json (the "complete" marker: source, tokenizer sha256, counts, shard list) and
            data_split.json; `.work/` is removed.

Each document in a split is preceded by the separator token, as pikv.data.pack_documents does.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from pikv.data.encode import WordCacheEncoder
from pikv.data.plan import PrepareSpec, make_plan, read_plan, write_json
from pikv.data.prepared import DOCS_FILE, MANIFEST, SPLIT_FILE, is_prepared, shard_paths
from pikv.config import DataConfig
from pikv.data import sources
from pikv.data.sources import DataError
from pikv.data.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer, tokenizer_hash, token_dtype

FORMAT = "pikv-prepared-v1"
SHARD_BYTES = 32 << 20
_WORKER: dict = {}  # per process: the rows table, the encoder, the dtype, the separator id


def _open_rows(work: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(work / "rows.arrow"))).read_all()


def _init_worker(work: Path, tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(tokenizer_path))
    _WORKER.update(rows=_open_rows(work), encoder=WordCacheEncoder(tok), eot=eot_id(tok),
                   dtype=token_dtype(tok.get_vocab_size()))


def _segment_texts(seg: dict, lo: int, hi: int) -> list[str]:
    column = _WORKER["rows"].column("text")
    return [column[int(r)].as_py()[int(s):(None if e < 0 else int(e))]
            for r, s, e in zip(seg["row"][lo:hi], seg["start"][lo:hi], seg["end"][lo:hi])]


def _write_shard(job: tuple) -> tuple[str, int, int]:
    """Tokenize segments [lo, hi) of a split into <split>/<k>.bin (+ .idx.npy); returns
    (split, shard, text bytes) for the progress bar."""
    out, split, k, seg, lo, hi = job
    bin_path, idx_path = shard_paths(out, split, k)
    dtype, eot = _WORKER["dtype"], _WORKER["eot"]
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    starts, written = [], 0
    with open(tmp, "wb") as fh:
        for a in range(lo, hi, 64):  # a few MB of text at a time: memory flat in the shard size
            b = min(a + 64, hi)
            for first, ids in zip(seg["first"][a:b], _WORKER["encoder"].encode(_segment_texts(seg, a, b), dtype)):
                if first:
                    starts.append(written)
                    np.array([eot], dtype=dtype).tofile(fh)
                    written += 1
                ids.tofile(fh)
                written += len(ids)
    idx_tmp = idx_path.with_name(idx_path.name + ".tmp.npy")
    np.save(idx_tmp, np.asarray(starts, dtype=np.int64))
    os.replace(idx_tmp, idx_path)
    os.replace(tmp, bin_path)  # last: a .bin that exists is a finished shard
    return split, k, int(seg["nbytes"][lo:hi].sum())


def _run_jobs(jobs: list[tuple], work: Path, tokenizer_path: Path, num_proc: int, progress: bool, total: int) -> None:
    from tqdm import tqdm

    done = total - sum(int(j[3]["nbytes"][j[4]:j[5]].sum()) for j in jobs)
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               file=sys.stderr)
    with bar:
        if num_proc <= 1 or len(jobs) <= 1:
            _init_worker(work, tokenizer_path)
            for job in jobs:
                bar.update(_write_shard(job)[2])
            return
        # fork: the workers share the memory-mapped rows; one tokenizer thread each (num_proc
        # processes on num_proc cores must not oversubscribe)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=(work, tokenizer_path)) as pool:
            for _, _, nbytes in pool.imap_unordered(_write_shard, jobs):
                bar.update(nbytes)


def _shard_jobs(out: Path, plan: dict, segments: dict) -> tuple[list[tuple], int]:
    """Every shard of the plan as a job, those already written left out; and the total bytes."""
    jobs, total = [], 0
    for split, bounds in plan["shards"].items():
        (out / split).mkdir(parents=True, exist_ok=True)
        seg = segments[split]
        for k, (lo, hi) in enumerate(bounds):
            total += int(seg["nbytes"][lo:hi].sum())
            if not shard_paths(out, split, k)[0].is_file():
                jobs.append((out, split, k, seg, lo, hi))
    return jobs, total


def _finish(out: Path, spec: PrepareSpec, plan: dict, segments: dict) -> dict:
    """manifest.json and data_split.json from the written shards."""
    tok = load_tokenizer(str(out / TOKENIZER_FILE))
    dtype = token_dtype(tok.get_vocab_size())
    splits = {}
    for split, bounds in plan["shards"].items():
        shards = []
        for k in range(len(bounds)):
            bin_path, idx_path = shard_paths(out, split, k)
            shards.append({"file": f"{split}/{bin_path.name}", "tokens": bin_path.stat().st_size // dtype.itemsize,
                           "docs": int(len(np.load(idx_path)))})
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards),
                         "bytes": int(segments[split]["nbytes"].sum()), "shards": shards}
    manifest = {"format": FORMAT, "key": plan["key"], "source": spec.source, "split_mode": plan["split_mode"],
                "tokenizer": {"spec": spec.tokenizer, "sha256": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(),
                              "eot_id": eot_id(tok)},
                "dtype": dtype.name, "splits": splits}
    info = {"source": spec.source, "split_mode": plan["split_mode"], "split_seed": spec.split_seed,
            "tokenizer": spec.tokenizer, "vocab_size": tok.get_vocab_size(), "splits": plan["split_info"]}
    for split, entry in splits.items():
        info["splits"][split]["tokens"] = entry["tokens"]
    write_json(out / SPLIT_FILE, info)
    write_json(out / DOCS_FILE, plan["names"])
    write_json(out / MANIFEST, manifest)  # last: its presence means complete
    return manifest


def prepare(spec: PrepareSpec, out: Path, num_proc: int = 1, shard_bytes: int = SHARD_BYTES,
            progress: bool = False) -> Path:
    """Prepare `spec.source` into `out` (or finish a killed run there); returns `out`."""
    out = Path(out)
    key = spec.key()
    if is_prepared(out):
        found = json.loads((out / MANIFEST).read_text())["key"]
        if found != key:
            raise DataError(f"{out}: already holds data prepared with different settings ({_differs(found, key)}); "
                            f"use another --out or remove it")
        return out
    work = out / ".work"
    plan = read_plan(work, key)
    if plan is None:
        if out.exists() and any(p.name != ".work" for p in out.iterdir()):
            raise DataError(f"{out}: exists and is not a prepared directory or an unfinished preparation; "
                            f"use another --out or remove it")
        plan = make_plan(spec, out, work, shard_bytes)
    if not (out / TOKENIZER_FILE).is_file():
        shutil.copyfile(work / TOKENIZER_FILE, out / TOKENIZER_FILE)
    segments = {s: dict(np.load(work / f"segments_{s}.npz")) for s in plan["shards"]}
    if plan["split_mode"] == "ranges" and plan.get("warning"):
        warnings.warn(plan["warning"], stacklevel=2)
    jobs, total = _shard_jobs(out, plan, segments)
    _run_jobs(jobs, work, out / TOKENIZER_FILE, num_proc, progress, total)
    _finish(out, spec, plan, segments)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _differs(found: dict, key: dict) -> str:
    return ", ".join(f"{k}: {found.get(k)!r} there, {key.get(k)!r} now" for k in sorted(set(found) | set(key))
                     if found.get(k) != key.get(k))[:400]


def cached_path(spec: PrepareSpec) -> Path:
    """<cache_dir>/prepared/<hash of the spec>/: where a training run prepares its source."""
    return Path(spec.cache_dir) / "prepared" / spec.cache_name()


def prepare_cached(spec: PrepareSpec) -> Path:
    """`prepare` into `cached_path(spec)`, one process at a time (jobs may share the cache)."""
    out = cached_path(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare(spec, out)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    d = DataConfig()
    ap = argparse.ArgumentParser(prog="train/prepare_data.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="'embedded', a .txt/.jsonl/.jsonl.gz/.parquet file, a "
                    "save_to_disk folder, a directory or glob of these, or a hub dataset name")
    ap.add_argument("--out", required=True, type=Path, help="the prepared directory (then: data.source=<out>)")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="'bpe' (train one on the train split), a "
                    "tokenizer.json, a model folder, a .gguf model file, or a hub name")
    ap.add_argument("--vocab-size", type=int, default=2048, help="--tokenizer bpe: its exact size (model.vocab_size)")
    ap.add_argument("--num-proc", type=int, default=1, help="tokenizing processes")
    ap.add_argument("--shard-size-mb", type=float, default=32, help="MiB of text per token shard")
    ap.add_argument("--text-field", default=d.text_field)
    ap.add_argument("--errors", default=d.errors, choices=sources.ERRORS, help="bytes that are not UTF-8")
    for name in ("validation_docs", "heldout_docs", "split_seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("validation_fraction", "heldout_fraction"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--cache-dir", default=d.cache_dir, help="embedded corpus / hub cache ('' = $PIKV_CACHE or "
                    "~/.cache/pikv)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        spec = PrepareSpec.from_args(args)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            out = prepare(spec, args.out, args.num_proc, int(args.shard_size_mb * (1 << 20)), progress=True)
    except ValueError as err:  # DataError, and a bad option (OptionError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST).read_text())
    counts = ", ".join(f"{s} {v['docs']} docs / {v['tokens']} tokens" for s, v in manifest["splits"].items())
    print(f"prepared {out}: {counts} ({manifest['dtype']}, split by {manifest['split_mode']})")
    print(f"train with: data.source={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
