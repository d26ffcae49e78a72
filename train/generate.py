"""Generate text from a PiKV checkpoint, in one process or many (docs/generate.md).

  python train/generate.py --checkpoint runs/tiny --prompt "Once upon a time" --max-new-tokens 32
  python train/generate.py --checkpoint runs/tiny --prompts prompts.jsonl --kv h2o --ratio 4 --out gen/
  torchrun --nproc_per_node 2 train/generate.py --checkpoint runs/tiny --prompt "..."   # experts split over 2 ranks

Prints each prompt and its continuation, then decode tokens/s, time to first token and KV bytes per
rank (rank 0); with --out DIR also writes DIR/generate.json. Prompts of different lengths go into
separate batches (grouped by length, no padding), so batching never changes a prompt's tokens.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# One intra-op thread per process unless the user says otherwise (as train/main.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.data import load_tokenizer  # noqa: E402
from pikv.distributed import destroy_distributed, init_distributed, launch_world_size, report_error  # noqa: E402
from pikv.inference import (GenerateOptions, check_expert_split, encode_prompts, format_report,  # noqa: E402
                            generate_texts, load_for_decoding, needs_svd, read_job, read_prompts, svd_calibration)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a step_<N> directory or a run directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", default=None, help="one prompt")
    source.add_argument("--prompts", default=None, type=Path,
                        help="a .jsonl file (one object with a \"prompt\" field per line) or a text file "
                             "(one prompt per line)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt i samples from its own generator seeded by (seed, i)")
    parser.add_argument("--kv", default="full", help="KV method: full, a single name (h2o, quant, learned, ...) "
                        "or STORAGE[@SHARE]+SELECTION (quant+snapkv; docs/kv.md)")
    parser.add_argument("--ratio", type=float, default=None, help="KV compression ratio vs an fp16 full cache "
                        "(needed unless --kv full)")
    parser.add_argument("--kv-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="the cache's storage dtype (auto: the model's)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per batch (same-length prompts only)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=None, help="write OUT/generate.json")
    return parser.parse_args(argv)


def error(message: str) -> int:
    """One line on stderr (rank 0 only under torchrun); exit status 2."""
    report_error(message)
    return 2


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, args.top_k, args.seed, args.kv, args.ratio,
                           args.batch_size, args.kv_dtype)
    try:  # every check that needs no process group, before any work
        opts.check()
        ckpt, cfg = read_job(args.checkpoint)
        prompts = read_prompts(args.prompt, args.prompts)
        tokenizer = load_tokenizer(str(ckpt / "tokenizer.json"))
        prompt_ids = encode_prompts(tokenizer, prompts, opts.max_new_tokens, cfg.model.max_seq_len)
        check_expert_split(cfg, launch_world_size())
    except ValueError as err:
        return error(str(err))
    ctx = init_distributed(args.device)
    try:
        if ctx.world_size > 1:  # the EP groups over every rank (the first call made the process group)
            ctx = init_distributed(args.device, ep_size=ctx.world_size)
        model = load_for_decoding(ckpt, cfg, ctx)
        bases = svd_calibration(model, tokenizer, cfg, ctx) if needs_svd(opts) else None
        report = generate_texts(model, tokenizer, prompts, prompt_ids, opts, ctx, svd_bases=bases)
    except ValueError as err:  # raised alike on every rank
        return error(str(err))
    finally:
        destroy_distributed()
    if ctx.is_main:
        print(format_report(report))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / "generate.json"
            path.write_text(json.dumps({"checkpoint": str(ckpt), **report.to_dict()}, indent=1))
            print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
