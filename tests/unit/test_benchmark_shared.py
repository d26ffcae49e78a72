"""The code bench/ shares from pikv.benchmark (besides the harness): corpus windows for SmolLM2, the
BOS lookup, and the PiKV-vs-kvpress table, on inputs whose answer is known by hand."""

import math

import pytest

from pikv.benchmark.kvpress_compare import comparison_markdown, comparison_rows
from pikv.benchmark.smollm2 import bos_id, window_ids


def test_windows_go_round_robin_over_documents_and_drop_partial_ones():
    docs = [list(range(0, 7)), list(range(100, 104)), list(range(200, 201))]  # 3 / 2 / 0 full windows of 2
    assert window_ids(docs, 2, 10) == [[0, 1], [100, 101], [2, 3], [102, 103], [4, 5]]
    assert window_ids(docs, 2, 3) == [[0, 1], [100, 101], [2, 3]]
    assert window_ids([], 2, 3) == []


class _Vocab:
    def get_vocab(self):
        return {"<|endoftext|>": 0, "<|im_start|>": 1}


def test_bos_is_looked_up_in_the_vocabulary():
    assert bos_id(_Vocab(), "<|im_start|>") == 1 and bos_id(_Vocab(), "7") == 7 and bos_id(_Vocab(), "none") is None
    with pytest.raises(ValueError, match=r"--bos '<s>' is not a token of this tokenizer"):
        bos_id(_Vocab(), "<s>")


def test_each_library_is_compared_with_its_own_full_cache():
    nll = {("kvpress", "full", 1.0): [1.0, 2.0], ("pikv", "full", 1.0): [1.5, 2.5],
           ("kvpress", "SnapKV", 2.0): [1.1, 2.1], ("pikv", "quant", 2.0): [1.5, 2.5]}
    kept = {k: [10.0, 12.0] for k in nll}
    peak = {("kvpress", "full", 1.0): [0, 0], ("pikv", "full", 1.0): [800, 1000],
            ("kvpress", "SnapKV", 2.0): [0, 0], ("pikv", "quant", 2.0): [400, 250]}
    rows = {(r["library"], r["method"]): r for r in comparison_rows(nll, kept, peak)}
    snap = rows[("kvpress", "SnapKV")]
    assert snap["ppl_change_pct"] == pytest.approx(100 * (math.exp(0.1) - 1))  # +0.1 nats on both sequences
    assert snap["ppl_change_ci95_pct"] == pytest.approx([100 * (math.exp(0.1) - 1)] * 2)
    quant = rows[("pikv", "quant")]
    assert quant["ppl_change_pct"] == pytest.approx(0.0) and quant["measured_ratio"] == pytest.approx(3.0)  # (2+4)/2
    assert "measured_ratio" not in snap and snap["kept_context_tokens"] == 11.0
    md = comparison_markdown(list(rows.values()), {"SnapKV vs snapkv @ 2x": 0.975})
    assert "| kvpress | SnapKV | 2 | 11.0 |  | 1.6000 | +10.5 [+10.5, +10.5] |" in md
    assert "| pikv | quant | 2 | 11.0 | 3.00 | 2.0000 | +0.0 [+0.0, +0.0] |" in md
    assert md.endswith("- SnapKV vs snapkv @ 2x: 97.50%\n")

