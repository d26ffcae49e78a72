"""Held-out evaluation of a PiKV checkpoint: perplexity and bits-per-byte.

  python train/eval.py --checkpoint runs/tiny                  # newest checkpoint of a run
  python train/eval.py --checkpoint runs/tiny/checkpoints/step_1200 --data my_texts/ --out results/

Without --data it scores the run's held-out documents (never used for training or validation);
with --data DIR prepared by train/prepare_data.py, that directory's held-out split (its tokenizer
must be the checkpoint's); with any other --data source, every document of it is scored.
Writes <out>/heldout_eval.json and <out>/heldout_eval.md.

KV-cache decoding evaluation (pikv/eval/kv.py, docs/kv.md), on the same documents:
  python train/eval.py --checkpoint runs/tiny --kv h2o,snapkv,learned --ratio 2,4,8 [--out DIR]
  python train/eval.py --checkpoint runs/tiny --kv pareto          # every single + composed method at 2,4,8,16
writes <out>/kv/results.{json,md,png} and logs them to the run's W&B run unless --no-wandb.
--probe adds the retrieval probe (passkey accuracy by needle depth, pikv/eval/probe.py) for the full
cache and every --kv method at every --ratio: in the `#key|` format when the run was trained with
data.probe_rate > 0 (then on by default), else in the passkey test's own wording after the document
separator (a pretrained or retrofitted model; `probe_for`). --no-probe skips it.
Without --kv it runs the run's kv.eval_policies at kv.eval_ratio (the KV table of `make train`);
--kv none skips it.

The original of a retrofitted model (docs/retrofit.md), scored with the same code and protocol:
  python train/eval.py --hf smollm2 --config configs/retrofit_smollm2.yaml --kv h2o,svd --ratio 4,8
--hf takes what model.init_from_hf takes (a HF model folder, a .gguf file, an alias); --config gives
the run's data.* settings (source, split, seq_len), so the documents and windows are the run's.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from pikv.config import DataConfig  # noqa: E402
from pikv.data import PreparedDir, is_prepared, iter_eval_batches, load_documents, load_tokenizer  # noqa: E402
from pikv.data import pack_documents, prepare_data, token_byte_lengths  # noqa: E402
from pikv.distributed import DistContext  # noqa: E402
from pikv.eval import evaluate_lm  # noqa: E402
from pikv.eval.kv import log_to_wandb, parse_specs, run_kv_evaluation  # noqa: E402
from pikv.eval.kv import markdown_table as kv_markdown_table  # noqa: E402
from pikv.eval.pareto import PARETO_RATIOS  # noqa: E402
from pikv.eval.probe import probe_for  # noqa: E402
from pikv.inference import stored_config  # noqa: E402  (shared with train/generate.py)
from pikv.kv import parse_method, resolve_policy  # noqa: E402
from pikv.models import Transformer  # noqa: E402
from pikv.models.pretrained import resolve_pretrained  # noqa: E402
from pikv.tasks import build_task, load_job  # noqa: E402
from pikv.training.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint  # noqa: E402
from pikv.training.distill import load_hf_teacher  # noqa: E402


def markdown_table(rows: dict[str, dict]) -> str:
    lines = ["| data | tokens | bytes | NLL (nats/token) | perplexity | bits/byte |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens']} | {r['bytes']} | {r['nll']:.4f} | {r['perplexity']:.2f} "
                     f"| {r['bits_per_byte']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subject = parser.add_mutually_exclusive_group(required=True)
    subject.add_argument("--checkpoint", type=Path)
    subject.add_argument("--hf", default=None, help="a pretrained Hugging Face model instead: a model folder, "
                         "a .gguf file or an alias (smollm2), as model.init_from_hf takes")
    parser.add_argument("--config", default=None, help="--hf: the YAML of the run to compare with (its data.* "
                        "keys choose the documents and seq_len; default: the defaults)")
    parser.add_argument("--data", default=None, help="a prepared directory (its held-out split), or a source: "
                        "a .txt/.jsonl/.parquet file, save_to_disk folder, directory or glob, or hub dataset")
    parser.add_argument("--text-field", default="text", help="text column for JSONL/hub data")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default <run>/eval)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kv", default=None, help="kv methods, comma separated: single names (h2o, quant, "
                        "learned) or STORAGE[@SHARE]+SELECTION (quant+snapkv, learned@2+h2o; docs/kv.md); 'pareto': "
                        "pikv.eval.pareto.PARETO_METHODS (singles and compositions) at --ratio 2,4,8,16 by default "
                        "(default: the config's kv.eval_policies; 'none' skips the KV evaluation)")
    parser.add_argument("--ratio", default=None, help="compression ratios, comma separated (default kv.eval_ratio; 2,4,8,16 with --kv pareto)")
    parser.add_argument("--prefill", type=int, default=None, help="context tokens (default seq_len / 2)")
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="held-out windows decoded per method (default 48 with --kv, 32 for the default table)")
    parser.add_argument("--kv-batch-size", type=int, default=16)
    parser.add_argument("--match-bytes", action=argparse.BooleanOptionalAction, default=None,
                        help="give each method the mildest budget whose measured ratio reaches --ratio "
                        "(equal measured bytes; pikv/eval/budget_match.py); default: on with --kv pareto")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                        help="the retrieval probe for the full cache and every --kv method and ratio (default: on "
                        "when the run was trained with data.probe_rate > 0)")
    parser.add_argument("--probe-windows", type=int, default=16, help="held-out windows the probe hides its needle "
                        "in (x 5 depths = probe sequences)")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the KV evaluation to the run's W&B run (default: the run's logging.wandb_mode)")
    return parser.parse_args(argv)


def evaluate_task_checkpoint(ckpt: Path, cfg, out: Optional[Path] = None) -> dict:
    """task=flex|time: one CPU process rebuilds the model, loads the checkpoint's weights and
    scores the held-out split; writes <out>/heldout_eval.json."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), ep_size=1)
    task = build_task(cfg, ckpt.parent.parent, ctx)
    model = task.build_model()
    load_model_weights(ckpt, model)
    result = task.evaluate(model, "heldout", None, ctx.device, None)
    out = out or ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "task": cfg.task, **result}, indent=1))
    print(f"held-out ({cfg.task}): {task.describe(result)}\nresults: {out / 'heldout_eval.json'}")
    return result


def run_data(cfg):
    """The run's prepared data (prepared into the cache now if it is not there)."""
    return prepare_data(cfg, None, True, lambda: None).prepared


def heldout_docs(args: argparse.Namespace, cfg, tokenizer, ckpt: Path) -> tuple[list, str, object]:
    """(documents, name, tokens) to score: the run's held-out split; with --data, a prepared
    directory's held-out split or every document of a source."""
    if args.data is not None and not is_prepared(args.data):
        docs = load_documents(DataConfig(source=args.data, text_field=args.text_field, cache_dir=cfg.data.cache_dir))
        return docs, args.data, pack_documents(tokenizer, docs)
    prepared = run_data(cfg) if args.data is None else PreparedDir(args.data)
    prepared.check_tokenizer(tokenizer, f"the checkpoint's tokenizer ({ckpt / 'tokenizer.json'})")
    docs = prepared.documents("heldout")
    name = f"heldout ({args.data or cfg.data.source}: {', '.join(d.name for d in docs[:8])}"
    return docs, name + (", ...)" if len(docs) > 8 else ")"), prepared.tokens("heldout")


def evaluate_perplexity(model, tokenizer, docs, tokens, data_name: str, ckpt: Path, cfg, args, out: Path) -> None:
    batches = iter_eval_batches(tokens, cfg.data.seq_len, args.batch_size)
    result = evaluate_lm(model, batches, token_byte_lengths(tokenizer), torch.device("cpu")).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "data": data_name, "documents": [d.name for d in docs],
              "seq_len": cfg.data.seq_len, **result}
    (out / "heldout_eval.json").write_text(json.dumps(report, indent=1))
    (out / "heldout_eval.md").write_text(f"# Held-out evaluation of `{ckpt}`\n\n" + markdown_table({data_name: result}))
    print(markdown_table({data_name: result}))
    print(f"results: {out / 'heldout_eval.json'} and {out / 'heldout_eval.md'}")


def evaluate_kv_table(model, tokenizer, docs, data_name: str, ckpt: Path, state, cfg, args, out: Path,
                      kv_specs, probe) -> None:
    length = cfg.data.seq_len
    train_docs = run_data(cfg).documents("train", limit=2)
    rows = run_kv_evaluation(model, tokenizer, docs, train_docs, kv_specs, out / "kv", length,
                             args.prefill or length // 2, args.max_sequences or (48 if args.kv else 32),
                             args.kv_batch_size, {"checkpoint": str(ckpt), "data": data_name}, probe=probe,
                             match_bytes=args.match_bytes, probe_fillers=args.probe_windows)
    print(kv_markdown_table(rows))
    print(f"kv results: {out / 'kv' / 'results.json'}, results.md, results.png")
    if not args.no_wandb and log_to_wandb(ckpt.parent.parent, cfg, rows, out / "kv", state.step):
        print(f"kv results logged to W&B ({cfg.logging.wandb_mode}) in {ckpt.parent.parent / 'wandb'}")


def load_hf(args: argparse.Namespace):
    """--hf: (model, tokenizer, config, resolved path) of a pretrained model as a job with
    model.init_from_hf would start (pikv/tasks/pretrained.py): dense, no KV compressor."""
    cfg = load_job(args.config, [f"model.init_from_hf={args.hf}", "kv.compressor=none", "kv.pca_init_windows=0"])
    path = resolve_pretrained(args.hf, cache_dir=cfg.data.cache_dir)
    model = load_hf_teacher(args.hf, cfg.data.cache_dir, cfg.model.max_seq_len)
    return model, load_tokenizer(cfg.data.tokenizer), cfg, path


def probe_of(args: argparse.Namespace, tokenizer, probe_rate: float, seq_len: int):
    """The retrieval probe to run (None: none): --probe / --no-probe, by default only for a run
    trained on it (probe_rate > 0), in the format it was trained on, else the natural wording.
    ValueError before any work when its sequences (seq_len tokens) cannot hold it."""
    on = args.probe if args.probe is not None else probe_rate > 0
    probe = probe_for(tokenizer, trained=probe_rate > 0) if on else None
    if probe is not None and args.probe_windows < 1:
        raise ValueError(f"--probe-windows must be >= 1, got {args.probe_windows}")
    if probe is not None and probe.overhead >= seq_len:
        raise ValueError(f"--probe: data.seq_len={seq_len} cannot hold the probe's {probe.overhead} tokens "
                         f"({probe.describe()}); use --no-probe or a model with longer windows")
    return probe


def kv_specs_of(args: argparse.Namespace, cfg) -> list[tuple[str, float]]:
    """(method, ratio) pairs of --kv / --ratio, else of the config's kv.eval_policies at kv.eval_ratio;
    `pareto` expands to PARETO_METHODS at 2,4,8,16. Learned storage needs a model trained with it:
    dropped from the defaults and from `pareto` for other models (named explicitly, it is an error row)."""
    pareto = "pareto" in [p.strip().lower() for p in (args.kv or "").split(",")]
    if args.match_bytes is None:
        args.match_bytes = pareto
    ratios = args.ratio or (PARETO_RATIOS if pareto else str(cfg.kv.eval_ratio))
    specs = parse_specs(args.kv or ",".join(cfg.kv.eval_policies), ratios)
    if (args.kv is None or pareto) and cfg.kv.compressor != "learned":
        named = {resolve_policy(p) for p in (args.kv or "").split(",") if p.strip() and p.strip().lower() != "pareto"}
        specs = [(p, r) for p, r in specs if parse_method(p).storage != "learned" or p in named]
    return specs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.config is not None and args.hf is None:
        print("error: --config is for --hf (a checkpoint carries its own config)", file=sys.stderr)
        return 2
    if args.hf is not None:
        return main_hf(args)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        state = read_trainer_state(ckpt)
        cfg = stored_config(ckpt, state)
        if cfg.task != "lm":  # Flex-MoE / Time-MoE: the task's own held-out evaluation
            evaluate_task_checkpoint(ckpt, cfg, args.out)
            return 0
        tokenizer = load_tokenizer(str(ckpt / "tokenizer.json"))
        docs, data_name, tokens = heldout_docs(args, cfg, tokenizer, ckpt)
        # older checkpoints have no data.probe_rate: not trained on the probe
        probe = probe_of(args, tokenizer, state.config["data"].get("probe_rate", 0), cfg.data.seq_len)
        model = Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv)
        load_model_weights(ckpt, model)
        kv_specs = []
        if (args.kv or "").lower() != "none":
            kv_specs = kv_specs_of(args, cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or ckpt.parent.parent / "eval"
    evaluate_perplexity(model, tokenizer, docs, tokens, data_name, ckpt, cfg, args, out)
    if kv_specs:
        evaluate_kv_table(model, tokenizer, docs, data_name, ckpt, state, cfg, args, out, kv_specs, probe)
    return 0


def main_hf(args: argparse.Namespace) -> int:
    """--hf: the same perplexity and KV evaluation as a checkpoint's (no W&B run to log to)."""
    try:
        model, tokenizer, cfg, path = load_hf(args)
        docs, data_name, tokens = heldout_docs(args, cfg, tokenizer, path)
        probe = probe_of(args, tokenizer, cfg.data.probe_rate, cfg.data.seq_len)  # --config's run: the same probe as its checkpoint
        kv_specs = []
        if (args.kv or "").lower() != "none":
            kv_specs = kv_specs_of(args, cfg)  # no compressor: learned methods only when named (an error row)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path(cfg.train.output_dir) / f"hf-{path.stem}" / "eval"
    args.no_wandb = True
    evaluate_perplexity(model, tokenizer, docs, tokens, data_name, path, cfg, args, out)
    if kv_specs:
        evaluate_kv_table(model, tokenizer, docs, data_name, path, None, cfg, args, out, kv_specs, probe)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
