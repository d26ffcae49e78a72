"""Data preparation throughput, and the trainer's memory and start-up on a 1 GB prepared corpus.

  python bench/data_prepare.py [--mb 10] [--big-gb 1] [--rounds 3] [--rss-rounds 2] [--out runs/bench]

Part 1, throughput: a ~`--mb` MB corpus (the embedded plays repeated, one .txt file per play) is
tokenized with PiKV's trained BPE (vocab 2048, the `make train` tokenizer) by
  - `tokenizers` encode_batch in one process (baseline: the texts already in memory, nothing read
    or written; tokenizers' own Rust threads),
  - the nanoGPT/Megatron loop: datasets.map(encode_batch, num_proc=2) into one np.memmap .bin,
  - `pikv.data.prepare` (read, split, tokenize, write shards + index + manifest) with --num-proc 1
    and 2, the tokenizer given as its tokenizer.json, and with --tokenizer bpe (trains the BPE too).
Cases interleave within each round (pikv.benchmark.run_rounds); reported: median seconds, MB/s of
text, CPU seconds (process + children) and the ratio to the baseline.

Part 2, memory: the corpus prepared once, then a ~`--big-gb` GB prepared directory made by
repeating its train shards (the same tokens, ~100x); the trainer (train/main.py, a small MoE, 8
steps) runs on each in a fresh subprocess per round; reported: peak RSS (VmHWM) and the
time from process start to the first logged step. The big directory is deleted at the end.
Writes <out>/data_prepare.{json,md}.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from pikv.benchmark import Transcript, machine_info, run_rounds, write_report  # noqa: E402
from pikv.data import PrepareSpec, prepare  # noqa: E402
from pikv.data.corpus import embedded_rows, resolve_cache_dir  # noqa: E402
from pikv.data.prepare import prepare_cached  # noqa: E402
from pikv.config import DataConfig  # noqa: E402
from pikv.data.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.vocab_size=2048", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.expert_ffn_hidden_size=64", "model.num_experts=4",
         "model.top_k=2", "data.seq_len=256", "train.batch_size=8", "train.max_steps=8", "train.eval_every=1000",
         "train.eval_batches=1", "train.checkpoint_every=1000", "logging.log_every=1", "logging.progress=false",
         "logging.wandb_mode=disabled"]


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def with_cpu(fn):
    def case():
        start = cpu_seconds()
        fn()
        return cpu_seconds() - start
    return case


def write_corpus(root: Path, mb: float) -> tuple[Path, list[str]]:
    plays = [text for _, text, _ in embedded_rows(resolve_cache_dir(DataConfig()))]
    texts, size = [], 0
    while size < mb * 1e6:
        for text in plays:
            texts.append(text)
            size += len(text.encode())
    src = root / "src"
    src.mkdir(parents=True)
    for i, text in enumerate(texts):
        (src / f"doc{i:04d}.txt").write_text(text)
    return src, texts


def nanogpt_loop(texts: list[str], tok_path: Path, out: Path):
    """nanoGPT openwebtext/prepare.py: datasets.map with num_proc, then one memmap .bin."""
    import datasets

    def run():
        tok = load_tokenizer(str(tok_path))

        def process(batch):
            ids = [e.ids + [0] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
            return {"ids": ids, "len": [len(x) for x in ids]}
        ds = datasets.Dataset.from_dict({"text": texts})
        mapped = ds.map(process, batched=True, num_proc=2, remove_columns=["text"])
        arr = np.memmap(out / "train.bin", dtype=np.uint16, mode="w+", shape=(int(np.sum(mapped["len"])),))
        pos = 0
        for batch in mapped.iter(batch_size=64):
            chunk = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
            arr[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        arr.flush()
    return run


def throughput(args, root: Path, emit: Transcript) -> dict:
    import datasets
    datasets.disable_caching()
    datasets.disable_progress_bars()
    src, texts = write_corpus(root, args.mb)
    nbytes = sum(len(t.encode()) for t in texts)
    tok_path = prepare_cached(PrepareSpec(source="embedded")) / "tokenizer.json"
    tok = load_tokenizer(str(tok_path))
    (root / "loop").mkdir()

    def pikv(num_proc, tokenizer):
        def run():
            out = root / "prep"
            shutil.rmtree(out, ignore_errors=True)
            prepare(PrepareSpec(source=str(src), tokenizer=tokenizer, cache_dir=str(root / "cache")), out,
                    num_proc=num_proc, shard_bytes=1 << 20)
        return run
    cases = {"tokenizers encode_batch (1 process)": lambda: tok.encode_batch(texts, add_special_tokens=False),
             "nanoGPT loop: datasets.map num_proc=2 + memmap": nanogpt_loop(texts, tok_path, root / "loop"),
             "pikv prepare --num-proc 1": pikv(1, str(tok_path)), "pikv prepare --num-proc 2": pikv(2, str(tok_path)),
             "pikv prepare --num-proc 2 --tokenizer bpe (trains it)": pikv(2, "bpe")}
    timings = run_rounds({k: with_cpu(v) for k, v in cases.items()}, rounds=args.rounds, warmup=1)
    emit(f"{nbytes / 1e6:.1f} MB of text in {len(texts)} documents; {args.rounds} rounds after 1 warm-up round\n")
    emit("| case | median s | MB/s | CPU s (median) | MB per CPU s | time vs baseline [interval] |")
    emit("|---|---|---|---|---|---|")
    rows = {}
    for name in cases:
        med, cpu = timings.median(name), float(np.median(timings.returned[name]))
        r = timings.ratio(name)
        rows[name] = {"median_s": med, "mb_per_s": nbytes / 1e6 / med, "cpu_s": cpu, "seconds": timings.seconds[name]}
        emit(f"| {name} | {med:.2f} | {nbytes / 1e6 / med:.2f} | {cpu:.2f} | {nbytes / 1e6 / cpu:.2f} | "
             f"{r['median']:.2f}x [{r['low']:.2f}, {r['high']:.2f}] |")
    return {"bytes": nbytes, "cases": rows, "src": src}


def repeat_prepared(small: Path, big: Path, gigabytes: float) -> int:
    """A prepared directory whose train split is the small one's train shards repeated."""
    shutil.copytree(small, big)
    manifest = json.loads((small / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    names = json.loads((small / "docs.json").read_text())
    shards, copies = list(train["shards"]), 1
    size = sum(s["tokens"] for s in shards) * 2
    while size < gigabytes * 1e9:
        for s in train["shards"]:
            k = len(shards)
            shutil.copyfile(small / s["file"], big / "train" / f"{k:05d}.bin")
            shutil.copyfile(small / s["file"].replace(".bin", ".idx.npy"), big / "train" / f"{k:05d}.idx.npy")
            shards.append({**s, "file": f"train/{k:05d}.bin"})
            size += s["tokens"] * 2
        copies += 1
    train.update(shards=shards, tokens=train["tokens"] * copies, docs=train["docs"] * copies,
                 bytes=train["bytes"] * copies)
    names["train"] = names["train"] * copies
    (big / "docs.json").write_text(json.dumps(names))
    (big / "manifest.json").write_text(json.dumps(manifest))
    return size


# Peak RSS of the trainer itself: VmHWM of its own address space, read as it exits. Not wait4's
# ru_maxrss: Linux carries the parent's high-water mark across fork + exec into the child's.
HWM_WRAPPER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    open(os.environ["PIKV_BENCH_HWM"], "w").write(hwm.split()[1])
"""


def train_once(data: Path, root: Path, tag: str):
    """One trainer subprocess: (peak RSS MiB, seconds from start to the first logged step)."""
    def run():
        import subprocess
        run_dir, log, hwm = root / "runs" / tag, root / f"{tag}.stderr", root / f"{tag}.hwm"
        shutil.rmtree(run_dir, ignore_errors=True)
        hwm.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PIKV_CACHE": str(root / "cache"),
               "PIKV_BENCH_HWM": str(hwm)}
        start = time.perf_counter()
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", HWM_WRAPPER, str(REPO / "train" / "main.py"), *MODEL,
                                     f"data.source={data}", f"train.output_dir={root / 'runs'}",
                                     f"train.run_name={tag}", "train.resume=never"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=err)
        metrics, first = run_dir / "metrics.jsonl", None
        while proc.poll() is None:
            if first is None and metrics.is_file() and metrics.stat().st_size > 0:
                first = time.perf_counter() - start
            time.sleep(0.01)
        if proc.returncode != 0 or first is None or not hwm.is_file():
            raise RuntimeError(f"trainer failed on {data} (exit {proc.returncode}): {log.read_text()[-2000:]}")
        return {"rss_mib": int(hwm.read_text()) / 1024, "first_step_s": first}
    return run


def memory(args, root: Path, src: Path, emit: Transcript) -> dict:
    small = prepare(PrepareSpec(source=str(src), cache_dir=str(root / "cache")), root / "small")
    big_bytes = repeat_prepared(small, root / "big", args.big_gb)
    small_bytes = json.loads((small / "manifest.json").read_text())["splits"]["train"]["tokens"] * 2
    cases = {"small": train_once(small, root, "small"), "big": train_once(root / "big", root, "big")}
    timings = run_rounds(cases, rounds=args.rss_rounds, warmup=0)
    rows = {}
    emit("\n| prepared train split | peak RSS MiB (median) | first step s (median) | whole run s (median) |")
    emit("|---|---|---|---|")
    for name, size in (("small", small_bytes), ("big", big_bytes)):
        got = timings.returned[name]
        rss, first = np.median([g["rss_mib"] for g in got]), np.median([g["first_step_s"] for g in got])
        rows[name] = {"train_bytes": size, "runs": got, "rss_mib": rss, "first_step_s": first,
                      "seconds": timings.seconds[name]}
        emit(f"| {name}: {size / 1e6:.0f} MB of uint16 tokens | {rss:.0f} | {first:.2f} | {timings.median(name):.1f} |")
    emit(f"\nbig / small: peak RSS {rows['big']['rss_mib'] / rows['small']['rss_mib']:.3f}x, time to first step "
         f"{rows['big']['first_step_s'] / rows['small']['first_step_s']:.3f}x ({args.rss_rounds} runs each, fresh "
         f"processes, alternating)")
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10, help="MB of text for the throughput corpus")
    ap.add_argument("--big-gb", type=float, default=1.0, help="GB of tokens in the big prepared directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss-rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--skip-memory", action="store_true", help="part 1 only")
    ap.add_argument("--skip-throughput", action="store_true", help="part 2 only")
    args = ap.parse_args(argv)
    machine = machine_info()
    emit = Transcript()
    root = Path(tempfile.mkdtemp(prefix="pikv-data-bench-"))
    try:
        if args.skip_throughput:
            part1 = {"src": write_corpus(root, args.mb)[0]}
        else:
            part1 = throughput(args, root, emit)
        part2 = {} if args.skip_memory else memory(args, root, part1.pop("src"), emit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    part1.pop("src", None)
    _, md = write_report(args.out, "data_prepare", machine, {"args": vars(args), "throughput": part1,
                                                            "memory": part2}, emit.text,
                         title="Data preparation and memory-mapped loading")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
