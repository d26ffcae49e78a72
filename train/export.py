"""Export a PiKV checkpoint to another framework's format.

  python train/export.py --checkpoint runs/tiny --out exported/tiny --format hf
  python train/export.py --checkpoint runs/tiny/checkpoints/step_450 --out exported/tiny --format hf \\
      --layout per_expert --dtype bfloat16

--format hf writes a Hugging Face model (config.json, model.safetensors, tokenizer files) that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load: a
Mixtral for an all-MoE, softmax-top-k, renormalised, dropless model; a LlamaForCausalLM for a dense
one (a retrofitted model, docs/retrofit.md: LoRA merged, the learned KV compressor left out, as HF
has no place for it). Other models are errors naming the key (see pikv/export.py).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.export import DTYPES, HF_LAYOUTS, export_hf  # noqa: E402

FORMATS = ("hf",)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a step_<N> directory, or a run directory (its newest complete checkpoint)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="hf: Hugging Face Mixtral (MoE) or Llama (dense)")
    parser.add_argument("--layout", default="auto", choices=HF_LAYOUTS,
                        help="Mixtral's expert weight layout: auto = the installed transformers' own (fused on 5.x); "
                             "per_expert = block_sparse_moe.experts.<e>.w1/w2/w3 (transformers 4.x, vLLM)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the saved weights")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.out, layout=args.layout, dtype=args.dtype)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
