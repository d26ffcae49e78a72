"""The four MoE kinds of `create_moe`, as in the original PiKV README, then the two variants on
their real data sets for a few seconds each (CPU, well under a minute).

  python examples/moe_example.py

Full training runs use the same trainer as the language model:
  python train/main.py --config configs/flex_diabetes.yaml
  python train/main.py --config configs/time_statsmodels.yaml
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pikv.config import load_config  # noqa: E402
from pikv.data.multimodal import NUM_COMBOS, combo_mask, combo_name, load_multimodal  # noqa: E402
from pikv.data.timeseries import load_series, make_windows, seasonal_naive  # noqa: E402
from pikv.models.flex_moe import FlexMoE  # noqa: E402
from pikv.models.time_moe import TimeMoE  # noqa: E402
from pikv.moe import create_moe  # noqa: E402


def four_kinds() -> None:
    x = torch.randn(2, 16, 512)  # [batch, tokens, hidden]
    base_moe = create_moe("base", hidden_size=512, num_experts=8, top_k=2)  # Mixtral-style sparse MoE
    # Flex-MoE: each token also carries its sample's modality combination (here 3 modalities ->
    # 7 combinations; 6 = all observed routes by the G-Router, others get their S-Router expert).
    flex_moe = create_moe("flex", hidden_size=512, num_experts=16, top_k=4, num_modalities=3)
    time_moe = create_moe("time", hidden_size=512, num_experts=8, top_k=2)  # + gated shared expert
    # PiKV: LoRA experts on a shared base, distillation from the FFN they were upcycled from.
    pikv_moe = create_moe("pikv", hidden_size=512, num_experts=8, top_k=2, rank=16, alpha=1.0,
                          use_distillation=True)
    combos = torch.randint(0, 7, (2, 16))
    for name, layer, out in (("base", base_moe, base_moe(x)), ("flex", flex_moe, flex_moe(x, combos)),
                             ("time", time_moe, time_moe(x)), ("pikv", pikv_moe, pikv_moe(x))):
        params = sum(p.numel() for p in layer.parameters())
        print(f"{name:5s} {tuple(x.shape)} -> {tuple(out.shape)}, {params:,} parameters, "
              f"aux loss {layer.aux_loss.item():.3f}")


def flex_on_diabetes(steps: int = 80) -> None:
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "flex_diabetes.yaml"),
                      ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=4"])
    data = load_multimodal("random", 0.5, 0.15, 0.2, seed=0)
    torch.manual_seed(0)
    model = FlexMoE(cfg.model, cfg.moe, cfg.flex)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    tr = data["train"]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.choice(len(tr.labels), 32)
        logits = model(torch.from_numpy(tr.features[ids]), torch.from_numpy(tr.observed[ids]))
        loss = F.cross_entropy(logits, torch.from_numpy(tr.labels[ids])) + 0.01 * model.router_losses()["aux_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = data["heldout"]
    with torch.no_grad():
        for c in range(NUM_COMBOS):
            obs = torch.from_numpy(np.tile(combo_mask(c), (len(test.labels), 1)))
            acc = (model(torch.from_numpy(test.features), obs).argmax(-1).numpy() == test.labels).mean()
            print(f"flex  held-out accuracy with {combo_name(c):24s} {acc:.3f}")


def time_on_series(steps: int = 80, horizon: int = 24) -> None:
    cfg = load_config(None, ["task=time", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=64",
                             "data.seq_len=64", "moe.num_shared_experts=1", "moe.renormalize=false"])
    train, heldout = load_series()
    windows = make_windows(train, 64, 24, 0.0, 0.8).windows
    torch.manual_seed(0)
    model = TimeMoE(cfg.model, cfg.moe, heads=[1, 8, 24])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        w = torch.from_numpy(windows[rng.choice(len(windows), 32)])
        preds = model.split_heads(model(w[:, :64]))
        loss = sum(F.huber_loss(p, w[:, 1:].unfold(1, p.shape[-1], 1)[:, :64], delta=2.0) for p in preds) / 3
        opt.zero_grad()
        (loss + 0.02 * model.router_losses()["aux_loss"]).backward()
        opt.step()
    test = make_windows(heldout, 64, horizon, 0.0, 1.0, stride=8)
    ctx, target = test.windows[:, :64], test.windows[:, 64:]
    pred = model.eval().forecast(torch.from_numpy(ctx), horizon).numpy()
    naive = seasonal_naive(ctx, test.seasons, horizon)
    print(f"time  held-out series, horizon {horizon}: MSE {np.mean((pred - target) ** 2):.3f} "
          f"(seasonal naive {np.mean((naive - target) ** 2):.3f}) over {len(target)} windows")


if __name__ == "__main__":
    four_kinds()
    flex_on_diabetes()
    time_on_series()
