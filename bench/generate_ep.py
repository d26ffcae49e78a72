"""train/generate.py in one process vs W processes (experts split over the ranks), in the same run.

  OMP_NUM_THREADS=1 python bench/generate_ep.py --checkpoint runs/tiny [--world 2] [--rounds 5] [--out runs/bench]

Each round runs `python train/generate.py` and `torchrun --nproc_per_node W train/generate.py` on the
same prompt (greedy, same options), in rotating order (pikv.benchmark), and reads what generate.py
measured itself (generate.json): decode tokens/s, time to first token, parameter and KV bytes per
rank. Process start-up and checkpoint loading are outside those numbers. Reports medians and the
per-round ratio W / 1 with its interval, and checks both produced the same tokens.
Writes <out>/generate_ep.{json,md}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pikv.benchmark import Transcript, machine_info, median_interval, run_rounds, write_report

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--prompt", default="To be, or not to be: that is the question.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kv", default="full")
    parser.add_argument("--ratio", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    return parser.parse_args()


def case(launcher: list[str], args: argparse.Namespace, folder: Path):
    """A callable running generate.py under `launcher`; returns its generate.json."""
    gen = ["--checkpoint", args.checkpoint, "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens),
           "--kv", args.kv, "--out", str(folder)] + (["--ratio", args.ratio] if args.ratio else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run() -> dict:
        proc = subprocess.run(launcher + [str(REPO / "train/generate.py")] + gen, env=env, text=True,
                              capture_output=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(launcher)} train/generate.py failed:\n{proc.stderr[-3000:]}")
        return json.loads((folder / "generate.json").read_text())
    return run


def main() -> None:
    args = parse_args()
    machine = machine_info(sys.argv)
    tmp = Path(tempfile.mkdtemp())
    names = ("1 process", f"{args.world} processes (EP={args.world})")
    cases = {names[0]: case([sys.executable], args, tmp / "one"),
             names[1]: case([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={args.world}"], args, tmp / "many")}
    t = run_rounds(cases, rounds=args.rounds, warmup=args.warmup)
    reports = t.returned
    same_tokens = all(a["token_ids"] == b["token_ids"] for a, b in zip(reports[names[0]], reports[names[1]]))
    emit = Transcript()
    emit(f"checkpoint `{args.checkpoint}`, prompt of {len(reports[names[0]][0]['prompt_token_ids'][0])} tokens, "
         f"{args.max_new_tokens} new tokens, --kv {args.kv}, {args.rounds} rounds; same tokens: {same_tokens}")
    emit()
    emit("| case | decode tokens/s (median) | time to first token ms (median) | parameter bytes per rank | "
         "KV bytes per rank |")
    emit("|---|---|---|---|---|")
    summary = {}
    for name in names:
        rs = reports[name]
        tps, ttft = statistics.median(r["tokens_per_s"] for r in rs), statistics.median(
            r["time_to_first_token_s"] for r in rs)
        summary[name] = {"tokens_per_s": tps, "time_to_first_token_s": ttft,
                         "param_bytes_per_rank": rs[0]["param_bytes_per_rank"],
                         "kv_bytes_per_rank": rs[0]["kv_bytes_per_rank"]}
        emit(f"| {name} | {tps:.1f} | {ttft * 1000:.1f} | {rs[0]['param_bytes_per_rank']} | "
             f"{rs[0]['kv_bytes_per_rank']} |")
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(reports[names[0]], reports[names[1]])]
    lo, hi, coverage = median_interval(ratios)
    emit()
    emit(f"decode tokens/s, {names[1]} / 1 process, per round: median {statistics.median(ratios):.2f}x "
         f"([{lo:.2f}, {hi:.2f}], {coverage:.0%} interval for the median)")
    write_report(args.out, "generate_ep", machine, {"args": vars(args), "summary": summary, "ratio_rounds": ratios,
                                                    "same_tokens": same_tokens}, emit.text,
                 title="train/generate.py: one process vs expert parallelism at decode")


if __name__ == "__main__":
    main()
