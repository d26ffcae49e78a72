"""train.compile: every block compiles without a graph break on the dropless MoE path, and 20
training steps give the eager losses."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.models.activation_checkpoint import apply_activation_checkpointing
from pikv.models.parallelize import apply_compile
from pikv.models.transformer import Transformer
from pikv.moe.router import ROUTERS

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  max_seq_len=32, num_experts=4, top_k=2, expert_ffn_hidden_size=32)


def _model(**moe):
    torch.manual_seed(0)
    return Transformer(CFG, MoEConfig(**moe)).train()


def _batch(step):
    """Counting sequences from random starts: learnable, so the loss must go down."""
    starts = torch.randint(0, CFG.vocab_size, (4, 1), generator=torch.Generator().manual_seed(step))
    return (starts + torch.arange(17)) % CFG.vocab_size


def _losses(model, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for step in range(steps):
        tokens = _batch(step)
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        router = model.router_losses()
        loss = (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + 0.01 * router["aux_loss"]
                + 0.001 * router["z_loss"])
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


GRAPHS = [dict(router=r) for r in ROUTERS] + [dict(capacity_factor=1.0), dict(every_n_layers=0),
                                              dict(num_shared_experts=1), dict(kind="pikv")]


@pytest.mark.parametrize("moe", GRAPHS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_a_block_is_one_graph(moe):
    """torch._dynamo.explain traces without running a backend: cheap, and it lists every break."""
    model = _model(**moe)
    torch._dynamo.reset()
    x = torch.randn(2, 16, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model.layers[0])(x, model.rope, 0)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_a_block_with_the_kv_compressor_is_one_graph():
    torch.manual_seed(0)
    model = Transformer(CFG, MoEConfig(), kv_cfg=KVConfig(compressor="learned")).train()
    torch._dynamo.reset()
    x = torch.randn(2, 16, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch._dynamo.explain(model.layers[0])(x, model.rope, 0).graph_break_count == 0


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_a_checkpointed_block_is_one_graph(ac):
    model = apply_activation_checkpointing(_model(), ac)
    torch._dynamo.reset()
    x = torch.randn(2, 16, CFG.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):  # as apply_compile
        explained = torch._dynamo.explain(lambda x: model.layers[0](x, model.rope, 0))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [b.reason for b in explained.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_twenty_compiled_steps_give_the_eager_losses(ac):
    torch._dynamo.reset()
    eager = _model()
    compiled = apply_compile(apply_activation_checkpointing(copy.deepcopy(eager), ac))
    ref, got = _losses(eager, 20), _losses(compiled, 20)
    # 1e-5 relative: inductor fuses the elementwise ops (other fp32 rounding), nothing else differs.
    assert got == pytest.approx(ref, rel=1e-5)
    assert ref[-1] < ref[0]  # it trains
