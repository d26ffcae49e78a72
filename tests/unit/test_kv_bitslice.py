"""Bit slices (pikv/kv/bitslice.py): every width 1-8 splits into 1/2/4/8-bit slices that recombine
to the code; a sliced store reads back the min-max round trip at its full width, and its error falls
with each bit as a quantizer's should."""

import pytest
import torch

from pikv.kv import bitslice
from pikv.kv.quant import TokenQuantStore
from tests.helpers import seeded


@pytest.mark.parametrize("bits", range(1, 9))
def test_slices_recombine_every_code(bits):
    parts = bitslice.slices(bits)
    assert sum(w for w, _ in parts) == bits and all(w in (1, 2, 4, 8) for w, _ in parts)
    codes = torch.arange(2 ** bits, dtype=torch.uint8)
    pieces = bitslice.split(codes, bits)
    assert all(int(p.max()) < 2 ** w for p, (w, _) in zip(pieces, parts))
    back = sum(p.int() << shift for p, (_, shift) in zip(pieces, parts))
    assert torch.equal(back, codes.int())
    assert len(bitslice.names("k", bits)) == len(parts) and bitslice.names("k", bits)[0] == "kc"


@pytest.mark.parametrize("bits", [0, 9])
def test_a_width_outside_one_to_eight_is_refused(bits):
    with pytest.raises(ValueError, match=rf"code width {bits} bits: allowed 1 to 8"):
        bitslice.slices(bits)


def test_sliced_store_reads_the_full_width_round_trip_and_errors_fall_per_bit():
    x = torch.randn(2, 2, 64, 32, generator=seeded(5))
    errors = []
    for bits in range(2, 9):
        store = TokenQuantStore(bits, 32)
        store.append(x, x, x)
        store.settle()  # read through the codes
        got = store._read("k", torch.float32)
        levels = 2 ** bits - 1  # min-max over the group (here the head dim), fp16 min and scale
        mn = x.amin(-1, keepdim=True).half().float()
        scale = ((x.amax(-1, keepdim=True).half().float() - mn) / levels).clamp_min(1e-8).half().float()
        want = torch.round((x - mn) / scale).clamp(0, levels) * scale + mn
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # the same fp32 products
        errors.append(float((got - x).pow(2).mean()))
    # each extra bit roughly quarters the squared error (uniform rounding): at least halves it here
    assert all(b < a / 2 for a, b in zip(errors, errors[1:])), errors
