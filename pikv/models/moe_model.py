"""What the trainer asks of every model with MoE layers (the language model, Flex-MoE, Time-MoE):
router losses, parameter counts and training FLOPs. Subclasses keep their blocks in `self.layers`, each with `is_moe` and
its FFN in `mlp`."""

from __future__ import annotations

import math

import torch
from torch import nn


class MoEModel(nn.Module):
    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """The LM's init (pikv/models/transformer.py): linear weights and experts normal(0, std),
        residual-output projections std / sqrt(2 * layers) (GPT-2), biases 0. Without it the
        default fan-in init starts routers with z-losses ~10x the LM's."""
        out_std = std / math.sqrt(2 * len(self.layers))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if name.endswith(("down_proj", "out_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "w2_EFH"):
                module.reset_parameters(std=std, out_std=out_std)

    def moe_layers(self) -> list[nn.Module]:
        return [block.mlp for block in self.layers if block.is_moe]

    def router_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted sums over MoE layers of the last forward's aux_loss and z_loss
        (the trainer applies MoEConfig.aux_loss_weight / z_loss_weight); zeros when dense."""
        zero = torch.zeros((), device=next(self.parameters()).device)
        out = {"aux_loss": zero, "z_loss": zero}
        for layer in self.moe_layers():
            if layer.aux_loss is not None:
                out = {"aux_loss": out["aux_loss"] + layer.aux_loss, "z_loss": out["z_loss"] + layer.z_loss}
        return out

    def num_params(self) -> int:
        """All parameters; a tied embedding / LM head is counted once."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: total minus the (E - top_k)/E share of each MoE layer's routed
        experts (router and shared experts stay fully active; expert choice: top_k on average)."""
        inactive = 0
        for layer in self.moe_layers():
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
            inactive += (layer.num_experts - layer.top_k) * per_expert
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int) -> float:
        """6 * active params + attention's 12 * L * H * seq_len (PaLM app. B convention)."""
        hidden = self.norm.weight.numel()
        return 6.0 * self.num_active_params() + 12.0 * len(self.layers) * hidden * seq_len
