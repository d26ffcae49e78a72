"""Held-out evaluation of a PiKV checkpoint: perplexity and bits-per-byte.

  python train/eval.py --checkpoint runs/tiny                  # newest checkpoint of a run
  python train/eval.py --checkpoint runs/tiny/checkpoints/step_1200 --data my_texts/ --out results/

Without --data it scores the run's held-out documents (never used for training or validation);
with --data, every document of the given local text/JSONL files (or hub dataset) is scored.
Writes <out>/heldout_eval.json and <out>/heldout_eval.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from pikv.config import DataConfig, from_dict  # noqa: E402
from pikv.data import iter_eval_batches, load_documents, load_tokenizer, pack_documents  # noqa: E402
from pikv.data import split_documents, token_byte_lengths  # noqa: E402
from pikv.eval import evaluate_lm  # noqa: E402
from pikv.models import Transformer  # noqa: E402
from pikv.training.checkpoint import complete_checkpoints, load_model_weights, read_trainer_state  # noqa: E402


def resolve_checkpoint(path: Path) -> Path:
    """A step_<N> directory, or a run / checkpoints directory (its newest complete checkpoint)."""
    if (path / "trainer.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise ValueError(f"--checkpoint {path}: no complete checkpoint there (expected a step_<N> directory "
                     "holding trainer.json, or a run directory with checkpoints/step_<N>/)")


def markdown_table(rows: dict[str, dict]) -> str:
    lines = ["| data | tokens | bytes | NLL (nats/token) | perplexity | bits/byte |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens']} | {r['bytes']} | {r['nll']:.4f} | {r['perplexity']:.2f} "
                     f"| {r['bits_per_byte']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", default=None, help="local .txt/.jsonl file, directory or glob, or hub dataset")
    parser.add_argument("--text-field", default="text", help="text column for JSONL/hub data")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default <run>/eval)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = from_dict(read_trainer_state(ckpt).config)
        tokenizer = load_tokenizer(str(ckpt / "tokenizer.json"))
        if args.data is None:
            docs = split_documents(load_documents(cfg.data), cfg.data)["heldout"]
            data_name = f"heldout ({cfg.data.source}: {', '.join(d.name for d in docs)})"
        else:
            docs = load_documents(DataConfig(source=args.data, text_field=args.text_field,
                                             cache_dir=cfg.data.cache_dir))
            data_name = args.data
        model = Transformer(cfg.model, cfg.moe)
        load_model_weights(ckpt, model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = pack_documents(tokenizer, docs)
    batches = iter_eval_batches(tokens, cfg.data.seq_len, args.batch_size)
    result = evaluate_lm(model, batches, token_byte_lengths(tokenizer), torch.device("cpu")).to_dict()
    out = args.out or ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "data": data_name, "documents": [d.name for d in docs],
              "seq_len": cfg.data.seq_len, **result}
    (out / "heldout_eval.json").write_text(json.dumps(report, indent=1))
    (out / "heldout_eval.md").write_text(f"# Held-out evaluation of `{ckpt}`\n\n" + markdown_table({data_name: result}))
    print(markdown_table({data_name: result}))
    print(f"results: {out / 'heldout_eval.json'} and {out / 'heldout_eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
