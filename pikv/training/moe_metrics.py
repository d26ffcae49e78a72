"""Per-layer router statistics, accumulated over micro-batches and reduced over ranks.

Layers expose detached metric tensors after each forward; nothing here calls .item() until a
logging step, so the GPU is not synchronised on every micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


class MoEMetrics:
    def __init__(self, moe_layers: list[tuple[int, torch.nn.Module]], num_experts: int, device: torch.device):
        self.layers = moe_layers
        self.tokens_LE = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64, device=device)
        self.scalars_L2 = torch.zeros(len(moe_layers), 2, dtype=torch.float64, device=device)  # dropped, entropy
        self.count = 0
        self.history: list[list[float]] = []  # per logging step: load share of every (layer, expert)

    def accumulate(self) -> None:
        for i, (_, layer) in enumerate(self.layers):
            m = layer.metrics
            self.tokens_LE[i] += m["tokens_per_expert"].to(self.tokens_LE.dtype)
            self.scalars_L2[i, 0] += m["dropped_fraction"].double()
            self.scalars_L2[i, 1] += m["router_entropy"].double()
        self.count += 1

    def read(self) -> dict[str, object]:
        """Global statistics since the last read (collective: every rank must call it)."""
        if not self.layers:
            return {}
        packed = torch.cat([self.tokens_LE.flatten(), self.scalars_L2.flatten(),
                            torch.tensor([float(self.count)], dtype=torch.float64, device=self.tokens_LE.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        n_le = self.tokens_LE.numel()
        tokens_LE = packed[:n_le].view_as(self.tokens_LE).cpu()
        scalars_L2 = packed[n_le:-1].view_as(self.scalars_L2).cpu() / packed[-1].item()
        out: dict[str, object] = {}
        for i, (layer_idx, _) in enumerate(self.layers):
            load = tokens_LE[i]
            prefix = f"moe/layer{layer_idx}"
            out[f"{prefix}/tokens_per_expert"] = [int(x) for x in load.tolist()]
            out[f"{prefix}/max_over_mean_load"] = (load.max() / load.mean().clamp_min(1e-9)).item()
            out[f"{prefix}/dropped_fraction"] = scalars_L2[i, 0].item()
            out[f"{prefix}/router_entropy"] = scalars_L2[i, 1].item()
        self.history.append((tokens_LE / tokens_LE.sum(1, keepdim=True).clamp_min(1)).flatten().tolist())
        self.tokens_LE.zero_()
        self.scalars_L2.zero_()
        self.count = 0
        return out

    def save_heatmap(self, path: Path) -> Path:
        """Expert load share per (layer, expert) at the last logging step, as a PNG heatmap."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        share = torch.tensor(self.history[-1]).view(len(self.layers), -1)
        fig, ax = plt.subplots(figsize=(1 + 0.5 * share.shape[1], 1 + 0.5 * share.shape[0]))
        image = ax.imshow(share.numpy(), cmap="viridis", aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)), [str(i) for i, _ in self.layers])
        fig.colorbar(image, ax=ax, label="share of routed tokens")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
