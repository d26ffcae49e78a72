"""Helpers shared by the test suites: the fp32 tolerances with their reasons, seeded inputs, the
forward/backward probe and randomised layer of the expert-parallel parity tests, and tiny
checkpoints written by the trainer's save_checkpoint (perturbed weights, a small tokenizer).

The end-to-end helpers (running train/main.py, reading metrics.jsonl) live in
tests/integration/conftest.py beside the fixtures that use them.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch

from pikv.config import to_dict
from pikv.data import train_bpe
from pikv.distributed import init_distributed
from pikv.kv import KVTrainState
from pikv.models import Transformer
from pikv.models.parallelize import apply_parallelism
from pikv.moe import create_moe
from pikv.testing import run_distributed
from pikv.training.checkpoint import TrainerState, save_checkpoint

# Two correct fp32 computations that add the same terms in another order (a per-token Python loop
# vs scatter-add, EP shards after all-to-all vs one process, a KV cache vs one pass) differ by a
# few ulps per addition: ~1e-6 on the O(1) values of these small layers. 1e-5 is 10x that and
# still far below any real bug (a wrong expert, token or weight moves values by O(0.1)).
REORDERED_FP32 = dict(atol=1e-5, rtol=1e-5)
# A scalar loss over a handful of terms (the aux loss: E products of global fractions), or its
# gradient, reduced in another order or all-reduced across ranks: within a few ulps (1.2e-7).
REORDERED_FP32_SCALAR = dict(atol=1e-6, rtol=1e-6)
# Same inputs, same code, same order: bit for bit.
EXACT = dict(atol=0, rtol=0)


def seeded(seed: int) -> torch.Generator:
    """A private generator: the numbers it draws depend on `seed` only, not on what ran before."""
    return torch.Generator().manual_seed(seed)


def random_moe(kind: str, hidden: int, experts: int, top_k: int, ffn: int, std: float = 0.3,
               **options) -> torch.nn.Module:
    """create_moe(kind, ...) with every weight drawn from N(0, std) under seed 0: large enough
    that routing and expert outputs differ clearly between tokens."""
    torch.manual_seed(0)
    layer = create_moe(kind, hidden, experts, top_k, ffn, deterministic=True, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, std)
    return layer


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, *inputs, aux_fn=None):
    """Output, input grad, every parameter grad (zeros where unused) and aux loss of
    (layer(x, *inputs) * grad_out).sum() + aux, where aux = aux_fn(layer, x) or layer.aux_loss."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x, *inputs)
    aux = layer.aux_loss if aux_fn is None else aux_fn(layer, x)
    ((y * grad_out).sum() + aux).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux.detach()


def _save_worker(rank, world_size, cfg, root, tokenizer_file, build):
    ep = cfg.parallel.expert_parallel_size
    ctx = init_distributed("cpu", "gloo", ep)  # the process group exists: this only builds the mesh
    model = apply_parallelism(build(), ctx)  # every rank builds the same model, then keeps its experts
    state = TrainerState(step=1, data_state={}, config=to_dict(cfg), world_size=world_size, ep_size=ep)
    return str(save_checkpoint(root, state, model, torch.optim.AdamW(model.parameters()), ctx,
                               tokenizer_file, keep=1))


def save_job_checkpoint(cfg, root, tokenizer_file, build, world_size: int = 1):
    """The trainer's save_checkpoint of the model `build()` returns (the same weights on every
    rank), in a forked world of `world_size` with cfg.parallel.expert_parallel_size: an EP
    checkpoint holds each rank's experts as its shard, as training writes it. Returns step_1/."""
    return Path(run_distributed(_save_worker, world_size, cfg, root, tokenizer_file, build)[0])


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of logit-visible scale; RMSNorm weights around 1 (not all ones)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        elif name.endswith("router.gate.weight"):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))  # decisive routing: no near-ties
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def tiny_tokenizer_file(folder) -> Path:
    """A 512-token byte-level BPE trained on seeded pseudo-words, saved as folder/tokenizer.json
    (a checkpoint's tokenizer without the data cache)."""
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "ne", "su", "mo", "la", "pe", "di", "vu", "sha", "ble", "tor", "ing", "est"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    path = Path(folder) / "tokenizer.json"
    train_bpe([" ".join(words[i:i + 12]) + "." for i in range(0, 3000, 12)], 512).save(str(path))
    return path


def tiny_lm(cfg, seed: int = 0) -> torch.nn.Module:
    """The Transformer of `cfg` with perturb_weights(seed): the same on every rank that calls it."""
    torch.manual_seed(seed)
    model = Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv)
    perturb_weights(model, seed)
    return model.eval()


def load_entry_point(path: str):
    """An entry point script of the repository (e.g. "train/generate.py") as a module, to call its
    main(argv) in-process."""
    file = Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(f"entry_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latent_single_pass(model, tokens: torch.Tensor, rank: int, prefill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits from position prefill - 1 on of the training-time single pass through the learned
    latent at `rank`, and of the same model on the full K/V (the reference that decoding from a
    latent cache must equal, and must differ from)."""
    kv = KVTrainState.attach(model)
    kv.set(rank)
    try:
        with torch.no_grad():
            one_pass = model(tokens[:, :-1])[:, prefill - 1:]
            kv.set(None)
            full = model(tokens[:, :-1])[:, prefill - 1:]
    finally:
        model.set_kv_train_state(None)
    return one_pass, full
