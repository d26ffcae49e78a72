"""Low-rank KV projections fitted to a frozen model from calibration text: the `svd` policy's
per-head bases (`calibrate_svd`), and the learned compressor (pikv/kv/learned.py) fitted to a
pretrained model, e.g. SmolLM2 loaded through pikv.eval.hf_llama, saved / loaded as safetensors.

PiKV's own models train the compressor jointly (distillation, then co-training; docs/kv.md). A
pretrained model whose weights stay frozen can only get the first half: the compressor learns by
distillation alone. Two steps, as post-training low-rank KV methods do (Palu, arXiv:2407.21118)
and as MLA conversions of pretrained models start (MHA2MLA, arXiv:2502.14837, which then also
fine-tunes the model):
1. `pca_init_`: each layer's `down`/`up` start as the principal directions of its concatenated
   pre-RoPE keys and values on calibration text. That is the best linear autoencoder in squared
   error at every rank at once, so it suits the nested (Matryoshka) ranks as they are.
2. `fit_compressors`: the same side distillation as the joint training's first phase
   (LatentKVCompressor.side_attn_error: each layer's attention output through the latent vs through
   the full K/V, teacher-forced on the full-cache model), cycling over the ranks of the budgets.
What this reaches on SmolLM2, and where it falls short of co-training: docs/kv.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from pikv.kv.learned import KVTrainState, TrainSchedule, compressors


@torch.no_grad()
def kv_second_moments(model, tokens_XN: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, sum over the tokens of x x^T (float64 [C, C]) where x = [pre-RoPE keys; values]
    of all kv heads, in the layout LatentKVCompressor.encode reads (keys head by head, then values)."""
    seen = {}
    hooks = [getattr(block.self_attn, name).register_forward_hook(
                 lambda mod, inp, out, key=(i, name): seen.__setitem__(key, out))
             for i, block in enumerate(model.layers) for name in ("k_proj", "v_proj")]
    moments = []
    was = model.training
    model.eval()
    try:
        for b0 in range(0, len(tokens_XN), batch_size):
            model.hidden_states(tokens_XN[b0:b0 + batch_size])  # no logits needed
            for i in range(len(model.layers)):
                x_XC = torch.cat([seen[(i, "k_proj")], seen[(i, "v_proj")]], -1).flatten(0, -2).double()
                if len(moments) <= i:
                    moments.append(torch.zeros(x_XC.shape[1], x_XC.shape[1], dtype=torch.float64))
                moments[i] += x_XC.T @ x_XC
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return moments


def principal_directions(m_CC: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` leading eigenvectors of a second-moment matrix (columns, float64) and their
    eigenvalues, by decreasing eigenvalue: the right singular vectors of the data it sums."""
    vals, vecs = torch.linalg.eigh(m_CC)  # ascending
    order = vals.argsort(descending=True)[:rank]
    return vecs[:, order], vals[order]


@torch.no_grad()
def calibrate_svd(model, tokens_XN: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `svd` policy's bases: per layer and kv head, the right singular vectors of the
    calibration set's pre-RoPE keys and values, ordered by singular value: [(Uk_GDD, Uv_GDD)] per
    layer (rank r = the first r columns). Post-training low-rank KV projection (Palu,
    arXiv:2407.21118; Eigen Attention, arXiv:2408.05646)."""
    G, D = model.cfg.num_kv_heads, model.cfg.hidden_size // model.cfg.num_heads
    bases = []
    for m_CC in kv_second_moments(model, tokens_XN, batch_size):
        blocks = [torch.stack([principal_directions(m_CC[o + g * D:o + (g + 1) * D, o + g * D:o + (g + 1) * D], D)[0]
                               for g in range(G)]).float() for o in (0, G * D)]
        bases.append((blocks[0], blocks[1]))
    return bases


@torch.no_grad()
def pca_init_(model, tokens_XN: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Set every layer's compressor to the principal directions of its [pre-RoPE keys; values]
    vectors on tokens_XN (pikv.kv.learned's nested ranks = their leading prefixes). Returns each
    layer's eigenvalues.

    Unweighted on purpose: SmolLM2's keys carry ~10x the values' energy, so most of the rank goes to
    keys. Scaling the values up to the keys' energy first was measured worse (attention-output
    error at 4x 0.46 vs 0.36, at 8x 1.76 vs 1.02): an error in a key moves the softmax itself."""
    comps = compressors(model)
    eigenvalues = []
    for comp, m_CC in zip(comps, kv_second_moments(model, tokens_XN, batch_size)):
        dims = comp.encoded_dims()  # the decoupled latent encodes neither rotated key dims
        u_CR, vals = principal_directions(m_CC[dims][:, dims], comp.max_rank)
        comp.down.weight.copy_(u_CR.T)
        comp.up.weight.copy_(u_CR)
        eigenvalues.append(vals)
    return eigenvalues


def fit_compressors(model, batches: Iterable[torch.Tensor], ratios: list[float], steps: int, length: int,
                    lr_schedule: Callable[[int], float],
                    progress: Optional[Callable[[int, int, float], None]] = None) -> list[tuple[int, int, float]]:
    """Train only the compressors by side distillation for `steps` batches (the model's own
    weights are frozen and untouched), cycling over the latent ranks of `ratios` at sequences of
    `length` tokens. `lr_schedule(step)`: AdamW's learning rate of optimizer step `step`
    (1-based), e.g. the training's schedule `functools.partial(pikv.training.schedule.lr_at,
    cfg=TrainConfig(lr=3e-5, warmup_steps=10, max_steps=steps, min_lr_ratio=0.1))` (the
    measured settings). After a PCA initialisation keep lr small: AdamW's first, sign-like steps
    otherwise undo it (on SmolLM2 the 2x error rose 30x in 3 steps at 1e-3). Returns (step, rank,
    mean per-layer attention error) per step.

    Per-layer side distillation rather than the KL of the output distribution through the latent:
    on SmolLM2 the KL fit (96 steps, same lr, backpropagated through the frozen model at ~2x the
    cost) was worse at every ratio (docs/benchmarks.md)."""
    comps = compressors(model)
    c0 = comps[0]
    schedule = TrainSchedule(c0.G, c0.D, ratios, full_every=0, cotrain_start=1.0, max_steps=steps,
                             bits=c0.bits, window=c0.window, length=length, rotary_dims=c0.rot)
    params = [p for c in comps for p in c.parameters()]
    own = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr_schedule(1), weight_decay=0.0)
    state = KVTrainState.attach(model)
    log = []
    model.train()
    try:
        for step, batch in zip(range(steps), batches):
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step + 1)
            rank, through_latent = schedule.at(step)
            state.set(rank, through_latent)
            model.hidden_states(batch)  # the losses are per layer: no LM head
            loss = state.pop_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append((step, rank, float(loss.detach()) / len(comps)))
            if progress:
                progress(step, rank, log[-1][2])
    finally:
        model.set_kv_train_state(None)
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return log


def save_compressors(model, path: Path, meta: dict) -> None:
    """The compressors' weights as safetensors, with their settings and `meta` in the header."""
    from safetensors.torch import save_file
    comps = compressors(model)
    state = {f"layers.{i}.{k}": v.detach().contiguous() for i, c in enumerate(comps) for k, v in c.state_dict().items()}
    settings = {"num_layers": len(comps), "max_rank": comps[0].max_rank, "bits": comps[0].bits,
                "window": comps[0].window, **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"pikv_kv_compressor": json.dumps(settings)})
    tmp.replace(path)  # atomic: a reader never sees half a file


def load_compressors(model, path: Path) -> dict:
    """Load what save_compressors wrote into `model`'s compressors; returns the saved settings.
    ValueError when the file does not match the model (layers, rank, bits, window)."""
    from safetensors import safe_open
    comps = compressors(model)
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get("pikv_kv_compressor")
        if header is None:
            raise ValueError(f"{path} is not a PiKV KV-compressor file (no 'pikv_kv_compressor' metadata)")
        settings = json.loads(header)
        want = {"num_layers": len(comps), "max_rank": comps[0].max_rank, "bits": comps[0].bits,
                "window": comps[0].window}
        bad = {k: (settings.get(k), v) for k, v in want.items() if settings.get(k) != v}
        if bad:
            raise ValueError(f"{path} does not fit this model: (file, model) = {bad}")
        for i, c in enumerate(comps):
            c.load_state_dict({k: f.get_tensor(f"layers.{i}.{k}") for k in c.state_dict()})
    return settings
