"""The retrieval probe: sequence layout, deterministic insertion into the loader (exact resume, any
number of ranks), errors, and the probe evaluation against a plain single-pass reference."""

import numpy as np
import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.tasks import load_job
from pikv.data import BlockLoader
from pikv.data.probe import NATURAL, PasskeyProbe, make_probe
from pikv.data.tokenizer import train_bpe
from pikv.eval.probe import DEPTHS, evaluate_probe
from pikv.models import Transformer

TEXT = ["Now is the winter of our discontent made glorious summer by this sun of York; " * 20,
        "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 20]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 300)


def test_probe_layout_hides_the_key_at_the_depth_and_asks_for_it_at_the_end(tok):
    probe = PasskeyProbe(tok, key_len=4)
    filler = np.arange(1000, 1040, dtype=np.int64)
    digit = {d: tok.encode(str(d)).ids[0] for d in range(10)}
    seq = probe.build(filler, np.array([3, 8, 9, 2]), pos=5)
    key, o, c = [digit[3], digit[8], digit[9], digit[2]], tok.encode("#").ids, tok.encode("|").ids
    body = 40 - probe.overhead
    expected = list(range(1000, 1005)) + o + key + c + list(range(1005, 1000 + body)) + o + key
    assert seq.tolist() == expected and len(seq) == 40
    assert tok.decode(seq[-(len(o) + 4):].tolist()) == "#3892"
    with pytest.raises(ValueError, match=r"probe needle position 99 must be in \[0, 29\]"):
        probe.build(filler, np.array([1, 2, 3, 4]), pos=99)


def test_natural_wording_asks_for_the_key_in_words(tok):
    probe = PasskeyProbe(tok, key_len=4, wording=NATURAL)
    filler = np.arange(1000, 1080, dtype=np.int64)
    seq = probe.build(filler, np.array([3, 8, 9, 2]), pos=7)
    ids = lambda text: tok.encode(text).ids  # noqa: E731
    assert seq[:7].tolist() == list(range(1000, 1007)) and len(seq) == 80
    needle = ids(NATURAL[0]) + [ids(str(d))[0] for d in (3, 8, 9, 2)] + ids(NATURAL[1])
    assert seq[7:7 + len(needle)].tolist() == needle
    assert tok.decode(seq[-(len(ids(NATURAL[2])) + 4):].tolist()).strip() == "What is the pass key? The pass key is 3892"
    assert probe.overhead == len(ids(NATURAL[0])) + len(ids(NATURAL[1])) + len(ids(NATURAL[2])) + 8
    assert "The pass key is" in probe.describe()


def test_bos_starts_every_probe_and_counts_toward_its_length(tok):
    plain, bos = PasskeyProbe(tok, wording=NATURAL), PasskeyProbe(tok, wording=NATURAL, bos_id=7)
    assert bos.overhead == plain.overhead + 1
    assert "BOS token 7 first" in bos.describe() and "BOS" not in plain.describe()
    filler, key = np.arange(1000, 1080, dtype=np.int64), np.array([3, 8, 9, 2])
    for pos in (0, 5, 80 - bos.overhead):  # BOS + the plain probe of the filler less its last token
        seq = bos.build(filler, key, pos)
        assert len(seq) == 80 and seq[0] == 7
        assert seq[1:].tolist() == plain.build(filler[:-1], key, pos).tolist()
    needle, answer = bos.open + bos.digits[key].tolist() + bos.close, bos.digits[key].tolist()
    assert bos.build(filler, key, 0)[1:1 + len(needle)].tolist() == needle  # depth 0: right after the BOS
    tail = bos.build(filler, key, 80 - bos.overhead)[-(len(needle) + len(bos.query) + 4):]
    assert tail.tolist() == needle + bos.query + answer  # depth 1: right before the query; answer last
    assert plain.build(filler, key, 0)[:len(needle)].tolist() == needle  # no BOS: the layout as before
    seqs, _ = bos.eval_set(filler[None], list(DEPTHS))
    assert seqs.shape == (5, 80) and (seqs[:, 0] == 7).all() and np.isin(seqs[:, -4:], bos.digits).all()
    assert np.array_equal(seqs[:, 1:], plain.eval_set(filler[None, :-1], list(DEPTHS))[0])


def test_insertion_is_a_pure_function_of_seed_and_sample_index(tok):
    probe = PasskeyProbe(tok, rate=0.3, seed=7)
    blocks = np.random.default_rng(0).integers(100, 200, size=(400, 33))
    whole = probe.insert(blocks, np.arange(400))
    split = np.concatenate([probe.insert(blocks[:150], np.arange(150)), probe.insert(blocks[150:], np.arange(150, 400))])
    assert np.array_equal(whole, split)
    changed = (whole != blocks).any(1)
    assert 0.22 < changed.mean() < 0.38  # ~rate
    query_key = whole[changed, -(len(probe.open) + 4):]
    assert (query_key[:, :len(probe.open)] == probe.open).all() and np.isin(query_key[:, -4:], probe.digits).all()
    assert not np.array_equal(PasskeyProbe(tok, rate=0.3, seed=8).insert(blocks, np.arange(400)), whole)
    assert np.array_equal(PasskeyProbe(tok, rate=0.0).insert(blocks, np.arange(400)), blocks)


def test_loader_with_probe_resumes_exactly_and_splits_the_global_batch_over_ranks(tok):
    tokens = np.random.default_rng(1).integers(100, 200, size=5000).astype(np.uint16)
    probe = PasskeyProbe(tok, rate=0.5, seed=3)
    one = BlockLoader(tokens, 32, 8, seed=3, probe=probe)
    batches = [one.next_batch()[0] for _ in range(5)]
    again = BlockLoader(tokens, 32, 8, seed=3, probe=probe)
    again.load_state_dict({**one.state_dict(), "consumed_samples": 24})
    assert torch.equal(again.next_batch()[0], batches[3])
    ranks = [BlockLoader(tokens, 32, 4, dp_rank=r, dp_size=2, seed=3, probe=probe) for r in range(2)]
    assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), batches[0])
    assert any((b == probe.open[0]).any() for b in batches)  # probes really are in the stream


def test_probe_errors(tok):
    with pytest.raises(ValueError, match=r"rate=1.5 must be in \[0, 1\]"):
        PasskeyProbe(tok, rate=1.5)
    with pytest.raises(ValueError, match=r"data.seq_len=16 is too short for the retrieval probe"):
        make_probe(tok, 0.1, 0, 16)
    assert make_probe(tok, 0.0, 0, 16) is None
    with pytest.raises(ValueError, match=r"'data.probe_rate' = -0.1 is invalid"):
        load_job(None, ["data.probe_rate=-0.1"])


class GreedyKeyProbe(PasskeyProbe):
    """Rows at even indices get the model's own greedy continuation as the answer, so a correct
    evaluation recalls exactly those (an untrained model recalls nothing by chance)."""

    def __init__(self, tok, model, bos_id=None):
        super().__init__(tok, bos_id=bos_id)
        self.model = model

    def eval_set(self, fillers, depths, seed=0):
        seqs, depth = super().eval_set(fillers, depths, seed)
        x = torch.from_numpy(seqs)
        with torch.no_grad():
            for j in range(self.key_len, 0, -1):
                x[::2, -j] = self.model(x[::2])[:, -j - 1].argmax(-1)
        return x.numpy(), depth


@pytest.mark.parametrize("bos_id", [None, 1])
def test_probe_evaluation_matches_a_single_pass_reference(tok, bos_id):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=32, max_seq_len=48)
    model = Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=KVConfig()).eval()
    probe = GreedyKeyProbe(tok, model, bos_id)
    fillers = torch.randint(20, 300, (4, 48))
    out = evaluate_probe(model, probe, fillers, [("window", 1.5), ("quest", 8.0)], batch_size=3)
    seqs, depth = probe.eval_set(fillers.numpy(), list(DEPTHS))
    x = torch.from_numpy(seqs)
    with torch.no_grad():  # reference: one causal pass; a key is recalled when all 4 argmaxes hit
        hit = (model(x)[:, -5:-1].argmax(-1) == x[:, -4:]).all(1).numpy()
    assert hit[::2].all() and hit.mean() < 1
    full = out[("full", 1.0)]
    assert full["accuracy"] == pytest.approx(hit.mean())
    assert full["by_depth"] == {f"{d:g}": pytest.approx(hit[depth == d].mean()) for d in DEPTHS}
    assert set(out[("window", 1.5)]["by_depth"]) == {f"{d:g}" for d in DEPTHS}
    assert "impossible" in out[("quest", 8.0)]["skipped"]
