import torch
from torch import nn

from pikv.distributed import GradientReducer, init_distributed
from pikv.testing import run_distributed


class TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(3, 3, bias=False)
        self.experts = nn.Module()
        self.experts.w = nn.Parameter(torch.zeros(2, 3))
        self.experts.idle = nn.Parameter(torch.zeros(4))  # never receives a gradient


def _reduce(rank, world_size, ep_size):
    ctx = init_distributed("cpu", "gloo", ep_size)
    model = TwoKinds()
    model.dense.weight.grad = torch.full((3, 3), float(rank + 1))
    model.experts.w.grad = torch.full((2, 3), float(10 * (rank + 1)))
    GradientReducer(model, world_size, ctx.expert_dp_group).reduce()
    return model.dense.weight.grad[0, 0].item(), model.experts.w.grad[0, 0].item(), model.experts.idle.grad.sum().item()


def test_dense_grads_are_averaged_over_all_ranks():
    out = run_distributed(_reduce, 2, 1)
    assert out == [(1.5, 15.0, 0.0)] * 2


def test_expert_grads_are_summed_over_expert_dp_group_and_divided_by_world():
    # world 4, EP 2: expert-DP groups are {0, 2} and {1, 3}.
    out = run_distributed(_reduce, 4, 2)
    dense = (1 + 2 + 3 + 4) / 4
    assert [o[0] for o in out] == [dense] * 4
    assert [o[1] for o in out] == [(10 + 30) / 4, (20 + 40) / 4, (10 + 30) / 4, (20 + 40) / 4]
