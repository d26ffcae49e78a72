"""How much of an evicting selection's loss could any selection recover? Oracles and fitted scores
beside PiKV's H2O on frozen SmolLM2-135M, at equal measured bytes, with the Pareto protocol of
bench/kv_learned_smollm2.py (512-token windows, 384 prefilled, 128 decoded, budget every step).

Selections added here (research probes, not in the library: none beat H2O without foresight;
docs/benchmarks.md, "Where H2O's loss at 4x comes from"):
- oracle: evicts by the attention each stored token will receive from the window's remaining
  decode queries under the full cache (the HF model's eager attention), H2O's recent share protected;
  oracle_newest (only the newest token protected), oracle_decode (H2O at the prefill's eviction),
  oracle_prefill (the oracle at the prefill's eviction only), oracle_next16 (the next 16 queries only);
- vatp: H2O's accumulated attention weighted by each token's value norm (Guo et al. 2024);
- fitted / fitted_ema: a log-linear retention score per layer and kv head (log accumulated attention,
  log age, [log EMA(16) of attention,] the pre-RoPE key), ridge-fitted to the log of the oracle's
  target at the prefill's eviction on --fit-sequences windows that follow the evaluated ones.

The Selection interface gives new tokens' metadata no keys or values (no library selection needs
them), so vatp / fitted read them from a wrapper around KVCache.attend, local to this script.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/kv_selection_oracle.py --split train --sequences 16 --ratio 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import pikv.eval.kv as ekv
from pikv.benchmark.smollm2 import load_smollm2, sequences
from pikv.eval.budget_match import match_budget
from pikv.kv.attention import group_sum
from pikv.kv import make_cache
from pikv.kv.cache import KVCache
from pikv.kv.selection import H2O, SELECTIONS

EPS = 1e-6
STATE: dict = {"future": {}, "prefill": 384, "weights": {}}  # future: layer -> [B, G, Q + 1, N]
_STEP: dict = {}  # the layer and new tokens of the KVCache.attend call in progress


def _attend(self, li, q, k, v, *, k_pre_BGTD=None, **kw):
    _STEP.update(li=li, k=k_pre_BGTD, v=v)
    return _cache_attend(self, li, q, k, v, k_pre_BGTD=k_pre_BGTD, **kw)


_cache_attend, KVCache.attend = KVCache.attend, _attend


@torch.no_grad()
def future_attention(hf, seq_BN: torch.Tensor, G: int, prefill: int) -> dict:
    """layer -> [B, G, Q + 1, N]: row i sums the attention (over each kv head's query heads) that
    every key gets from the queries at prefill + i onward (the last row: none left)."""
    out = {}
    for li, a_BNTS in enumerate(hf(seq_BN, output_attentions=True).attentions):
        B, N, T, S = a_BNTS.shape
        a = a_BNTS.view(B, G, N // G, T, S).sum(2)[:, :, prefill:]
        r = a.flip(2).cumsum(2).flip(2)
        out[li] = torch.cat([r, torch.zeros_like(r[:, :, :1])], 2)
    return out


class Oracle(H2O):
    name, phases, horizon, newest_only = "oracle", ("prefill", "decode"), None, False

    def update(self, cache, li, p_BNTS, start):
        super().update(cache, li, p_BNTS, start)
        self.next_query = start + p_BNTS.shape[2]

    def protect(self, cache, li):
        return (0, 1) if self.newest_only else super().protect(cache, li)

    def scores(self, cache, li):
        R = STATE["future"].get(li)
        pos_BHS = cache.positions(li).long()
        phase = "prefill" if self.next_query <= STATE["prefill"] else "decode"
        if R is None or R.shape[0] != pos_BHS.shape[0] or phase not in self.phases:
            return super().scores(cache, li)  # budget matching's dry run (bytes only) or H2O's phase
        last = R.shape[2] - 1
        i = min(max(self.next_query - STATE["prefill"], 0), last)
        future = R[:, :, i] if self.horizon is None else R[:, :, i] - R[:, :, min(i + self.horizon, last)]
        return future.gather(-1, pos_BHS).double()


class OracleNewest(Oracle):
    name, newest_only = "oracle_newest", True


class OracleDecode(Oracle):
    name, phases = "oracle_decode", ("decode",)


class OraclePrefill(Oracle):
    name, phases = "oracle_prefill", ("prefill",)


class OracleNext16(Oracle):
    name, horizon = "oracle_next16", 16


class VATP(H2O):
    """Attention times the value's L2 norm (the paper uses L1), accumulated as H2O accumulates."""
    name = "vatp"

    def new_meta(self, cache, B, H, T, start, device):
        return {**super().new_meta(cache, B, H, T, start, device), "vnorm": _STEP["v"].float().norm(dim=-1).half()}

    def update(self, cache, li, p_BNTS, start):
        score, vnorm_BHS = cache.meta[li].view("score"), cache.meta[li].view("vnorm").float()
        B, N, T, S = p_BNTS.shape
        H = score.shape[1]
        weighted = p_BNTS.float().view(B, H, N // H, T, S) * vnorm_BHS[:, :, None, None, :S]
        score += group_sum(weighted.view(B, N, T, S), H)


class Fitted(Oracle):
    """score = a log(accumulated attention) [+ e log(EMA16)] + b log(age) + w . k_pre + c, per layer
    and kv head (STATE["weights"][name][layer]: [G, F]); the key term is computed once per token."""
    name, ema = "fitted", False

    def new_meta(self, cache, B, H, T, start, device):
        w_GF, k_BGTD = STATE["weights"][self.name][_STEP["li"]], _STEP["k"].float()
        prior = torch.einsum("bgtd,gd->bgt", k_BGTD, w_GF[:, -1 - k_BGTD.shape[-1]:-1]) + w_GF[:, -1, None]
        meta = {**super().new_meta(cache, B, H, T, start, device), "prior": prior.half()}
        if self.ema:
            meta["ema"] = torch.zeros(B, H, T, device=device)
        return meta

    def update(self, cache, li, p_BNTS, start):
        super().update(cache, li, p_BNTS, start)
        if self.ema:
            ema, T = cache.meta[li].view("ema"), p_BNTS.shape[2]
            decay = (1 - 1 / 16) ** torch.arange(T - 1, -1, -1, dtype=torch.float32)
            ema.mul_((1 - 1 / 16) ** T).add_(group_sum(p_BNTS.float() * decay[:, None], ema.shape[1]))

    def scores(self, cache, li):
        meta, w_GF = cache.meta[li], STATE["weights"][self.name][li]
        age = (self.next_query - meta.view("pos").float()).clamp_min(1)
        feats = [meta.view("score")] + ([meta.view("ema")] if self.ema else []) + [age]
        s = meta.view("prior").float()
        for j, f in enumerate(feats):
            s = s + w_GF[:, j, None] * (f + EPS).log()
        return s.double()


class FittedEMA(Fitted):
    name, ema = "fitted_ema", True


PROBES = (Oracle, OracleNewest, OracleDecode, OraclePrefill, OracleNext16, VATP, Fitted, FittedEMA)


@torch.no_grad()
def fit_scores(hf, seq_XN: torch.Tensor, G: int, prefill: int, recent: int) -> dict:
    """name -> layer -> [G, F] ridge weights (lambda 1) of the fitted scores, on the candidates
    (tokens older than the recent share) of the prefill's eviction."""
    keys: dict = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, li=li: keys.__setitem__(li, o))
             for li, layer in enumerate(hf.model.layers)]
    rows: dict = {}
    for b in range(0, len(seq_XN), 4):
        x = seq_XN[b:b + 4]
        atts = hf(x, output_attentions=True).attentions
        B, N = x.shape
        for li, a_BNTS in enumerate(atts):
            a = a_BNTS.view(B, G, -1, N, N).sum(2)
            past = a[:, :, :prefill, :prefill]
            decay = (1 - 1 / 16) ** torch.arange(prefill - 1, -1, -1.0)
            rows.setdefault(li, []).append(dict(
                h2o=past.sum(2), ema=(past * decay[:, None]).sum(2),
                age=(prefill - torch.arange(prefill, dtype=torch.float32)).expand(B, G, prefill),
                k=keys[li].view(B, N, G, -1).transpose(1, 2)[:, :, :prefill],
                target=a[:, :, prefill:N - 1, :prefill].sum(2)))
    for h in hooks:
        h.remove()
    cand = prefill - recent
    weights: dict = {"fitted": {}, "fitted_ema": {}}
    for li, parts in rows.items():
        f = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        y = (f["target"][:, :, :cand] + EPS).log()
        for name, cols in (("fitted", ["h2o", "age"]), ("fitted_ema", ["h2o", "ema", "age"])):
            X = torch.cat([(f[c][:, :, :cand] + EPS).log()[..., None] for c in cols] + [f["k"][:, :, :cand],
                          torch.ones_like(y)[..., None]], -1).double()
            per_head = []
            for g in range(G):
                Xg, yg = X[:, g].reshape(-1, X.shape[-1]), y[:, g].reshape(-1).double()
                A = Xg.T @ Xg + torch.eye(Xg.shape[1], dtype=torch.float64)
                per_head.append(torch.linalg.solve(A, Xg.T @ yg).float())
            weights[name][li] = torch.stack(per_head)
    return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="train", choices=["train", "heldout"])
    ap.add_argument("--sequences", type=int, default=16, help="windows evaluated")
    ap.add_argument("--fit-sequences", type=int, default=16, help="the windows after them, for the fitted scores")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--storage", default="rquant", help="storage beside every selection (a STORAGE[:FORMAT] name)")
    ap.add_argument("--selections", default="h2o," + ",".join(p.name for p in PROBES))
    ap.add_argument("--out", type=Path, default=Path("runs/kv_selection_oracle"))
    args = ap.parse_args()
    for probe in PROBES:
        SELECTIONS[probe.name] = probe
    length, prefill = 512, STATE["prefill"]
    hf, tok, model = load_smollm2(length + 8, None)
    G = model.cfg.num_kv_heads
    seqs = sequences(tok, length, args.sequences + args.fit_sequences, split=args.split)
    seq_XN, fit_XN = seqs[:args.sequences], seqs[args.sequences:]
    policies = [f"{args.storage}+{s}" for s in args.selections.split(",")]
    if any(p.startswith("fitted") for p in args.selections.split(",")):
        if len(fit_XN) == 0:
            raise SystemExit(f"--fit-sequences {args.fit_sequences}: the {args.split} split has no windows left "
                             f"after the {args.sequences} evaluated")
        # the candidates of H2O's prefill eviction at the budget the evaluation gives it
        budget, _ = match_budget(model, f"{args.storage}+h2o", args.ratio, length, prefill)
        probe = make_cache(f"{args.storage}+h2o", model, ratio=budget, total_tokens=length)
        STATE["weights"] = fit_scores(hf, fit_XN, G, prefill, probe.selection.protect(probe, 0)[1])
    score_batch = ekv._score_batch

    def with_future(model_, seq_BN, prefill_, rows, acc, svd_bases):
        STATE["future"] = future_attention(hf, seq_BN, G, prefill_)
        return score_batch(model_, seq_BN, prefill_, rows, acc, svd_bases)

    if any(s.startswith("oracle") for s in args.selections.split(",")):  # only the oracles read the future
        ekv._score_batch = with_future
    t0 = time.time()
    rows = ekv.evaluate_kv(model, seq_XN, prefill, [(p, args.ratio) for p in policies], batch_size=8,
                           match_bytes=True, progress=lambda m: print(m, flush=True))
    ekv.write_results(rows, args.out, {"bench": "kv_selection_oracle", "split": args.split,
                                       "sequences": len(seq_XN), "fit_sequences": len(fit_XN)})
    print((args.out / "results.md").read_text())
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
