"""Generation across processes (pikv/inference, train/generate.py) against one process.

Checkpoints are written by the trainer's save_checkpoint: an EP=2 one from two forked ranks (each
saving its own experts, as training does) and a single-process one, both of the same perturbed tiny
model (logit-visible weights, decisive routing). The reference is `Transformer.generate` (and the
same decode loop's logits) in the parent process, on the unsharded model.
"""

from functools import partial

import pytest
import torch

from pikv.config import load_config
from pikv.data import load_tokenizer
from pikv.distributed import init_distributed
from pikv.inference import GenerateOptions, encode_prompts, generate_texts, load_for_decoding, read_job
from pikv.inference.generate import TokenPicker, build_cache
from pikv.kv import make_cache
from pikv.kv.fit import calibrate_svd
from pikv.models.generation import decode_tokens, sample_next
from pikv.testing import run_distributed
from tests.helpers import REORDERED_FP32, load_entry_point, seeded, save_job_checkpoint, tiny_lm, tiny_tokenizer_file
from tests.integration.conftest import TINY

PROMPTS = ["kato rine sumo", "sumo kato rine", "torsu"]  # the first two encode to the same length (3 tokens)
NEW = 24


def job_config(ep: int):
    return load_config(None, TINY + [f"parallel.expert_parallel_size={ep}"])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tok = tiny_tokenizer_file(root)
    return {ep: save_job_checkpoint(job_config(ep), root / f"ep{ep}", tok, partial(tiny_lm, job_config(ep)),
                                    world_size=ep) for ep in (1, 2)}


def svd_bases(model, kv: str):
    """The svd storage's bases, calibrated on seeded random windows (None for other methods)."""
    calib = torch.randint(0, 512, (4, 48), generator=seeded(11))
    return calibrate_svd(model, calib) if kv == "svd" else None


def reference(kv: str, ratio, prompt_ids: list[list[int]]):
    """Per prompt: (tokens of Transformer.generate, the decode loop's logits [NEW, V]) in one process."""
    model = tiny_lm(job_config(1))
    bases = svd_bases(model, kv)
    out = []
    for ids in prompt_ids:
        prompt = torch.tensor([ids])
        def cache():  # the model's dtype, fp32: as train/generate.py's default --kv-dtype auto
            return make_cache(kv, model, ratio=ratio, total_tokens=len(ids) + NEW, store_dtype=None,
                              svd_bases=bases)
        tokens = model.generate(prompt, NEW, cache=cache())[0, len(ids):].tolist()
        logits = []
        list(decode_tokens(model, prompt, NEW, cache(), lambda l: logits.append(l[0].clone()) or sample_next(l)))
        out.append((tokens, torch.stack(logits)))
    return out


def _decode_worker(rank, world, ckpt, opts: dict, prompts):
    """Every rank: the report of generate_texts, and each prompt's decode logits (batch of one)."""
    ctx = init_distributed("cpu", "gloo", world)
    ckpt, cfg = read_job(ckpt)
    model = load_for_decoding(ckpt, cfg, ctx)
    tokenizer = load_tokenizer(str(ckpt / "tokenizer.json"))
    opts = GenerateOptions(**opts).check()
    ids = encode_prompts(tokenizer, prompts, opts.max_new_tokens, cfg.model.max_seq_len)
    bases = svd_bases(model, opts.kv)  # under EP: every rank's forward through the all-to-all
    report = generate_texts(model, tokenizer, prompts, ids, opts, ctx, svd_bases=bases)
    logits = []
    for i, p in enumerate(ids):
        rec = []
        picker = TokenPicker(opts, [i], ctx.device, world)
        cache = build_cache(opts, model, len(p) + opts.max_new_tokens, bases, ctx)
        list(decode_tokens(model, torch.tensor([p]), opts.max_new_tokens, cache,
                           lambda l: rec.append(l[0].clone()) or picker(l)))
        logits.append(torch.stack(rec))
    return report, logits


# Full cache, an eviction policy, a continuous storage format (low-rank projection): logits within fp32
# reordering. 4-bit codes are not continuous: a K/V element within an ulp of a rounding boundary
# flips one code, one quantisation step (measured 6.5e-5 on logits of magnitude 4 here, 2e-6 for
# the full cache); 1e-3 is 15x that and far below what a wrong expert or token moves (O(0.1)).
PARITY = [("full", None, REORDERED_FP32), ("h2o", 2.0, REORDERED_FP32), ("svd", 2.0, REORDERED_FP32),
          ("quant", 4.0, dict(atol=1e-3, rtol=0))]


@pytest.mark.parametrize("kv,ratio,tol", PARITY, ids=[p[0] for p in PARITY])
def test_ep2_decodes_the_tokens_and_logits_of_one_process(ckpts, kv, ratio, tol):
    """EP=2 checkpoint, two ranks, experts split as in training: same greedy tokens as one process,
    logits within fp32 reordering, each rank holding half of the experts."""
    opts = dict(max_new_tokens=NEW, kv=kv, ratio=ratio, batch_size=2)
    results = run_distributed(_decode_worker, 2, ckpts[2], opts, PROMPTS)
    ref = reference(kv, ratio, results[0][0].prompt_token_ids)
    assert len(results[0][0].prompt_token_ids[0]) == len(results[0][0].prompt_token_ids[1])  # one batch of 2
    for report, logits in results:
        assert report.token_ids == [tokens for tokens, _ in ref]
        for got, (_, want) in zip(logits, ref):
            torch.testing.assert_close(got, want, **tol)
    single = tiny_lm(job_config(1))
    experts = sum(p.numel() for layer in single.moe_layers() for p in layer.experts.parameters())
    report = results[0][0]
    assert report.expert_params_per_rank == [experts // 2] * 2 and experts > 0
    expert_bytes = 4 * experts // 2  # fp32: what each rank does not hold
    assert report.param_bytes_per_rank == [4 * single.num_params() - expert_bytes] * 2
    assert report.kv_bytes_per_rank == results[1][0].kv_bytes_per_rank  # gathered: every rank reports the same list
    # the cache is sharded over the ranks: KIVI shards in 32-token blocks, so a short sequence may sit on one rank
    assert sum(report.kv_bytes_per_rank) > 0 and len(report.kv_bytes_per_rank) == 2
    assert report.text == results[1][0].text


def test_checkpoints_decode_at_any_ep_size(ckpts):
    """A non-EP checkpoint with its experts sliced over two ranks, an EP=2 checkpoint in one
    process and over four ranks (one expert each), give the one-process tokens and logits."""
    opts = dict(max_new_tokens=NEW)
    ep1_on_2 = run_distributed(_decode_worker, 2, ckpts[1], opts, PROMPTS)[0]
    ep2_on_1 = run_distributed(_decode_worker, 1, ckpts[2], opts, PROMPTS)[0]
    ep2_on_4 = run_distributed(_decode_worker, 4, ckpts[2], opts, PROMPTS)[0]
    ref = reference("full", None, ep1_on_2[0].prompt_token_ids)
    for report, logits in (ep1_on_2, ep2_on_1, ep2_on_4):
        assert report.token_ids == [tokens for tokens, _ in ref]
        for got, (_, want) in zip(logits, ref):
            torch.testing.assert_close(got, want, **REORDERED_FP32)
    experts = ep2_on_1[0].expert_params_per_rank[0]
    assert ep1_on_2[0].expert_params_per_rank == [experts // 2] * 2
    assert ep2_on_4[0].expert_params_per_rank == [experts // 4] * 4


def test_seeded_sampling_is_the_same_for_any_world_and_batch_size(ckpts):
    opts = dict(max_new_tokens=NEW, temperature=1.0, top_k=50, seed=7)
    one = run_distributed(_decode_worker, 1, ckpts[2], {**opts, "batch_size": 1}, PROMPTS)[0][0]
    two = run_distributed(_decode_worker, 2, ckpts[2], {**opts, "batch_size": 2}, PROMPTS)
    again = run_distributed(_decode_worker, 1, ckpts[2], {**opts, "batch_size": 1}, PROMPTS)[0][0]
    other_seed = run_distributed(_decode_worker, 1, ckpts[2], {**opts, "seed": 8}, PROMPTS)[0][0]
    greedy = reference("full", None, one.prompt_token_ids)
    assert two[0][0].token_ids == one.token_ids == two[1][0].token_ids == again.token_ids
    assert other_seed.token_ids != one.token_ids  # sampling draws from the seed
    assert one.token_ids != [tokens for tokens, _ in greedy]  # and is not greedy decoding


def _cli_worker(rank, world, argv):
    import contextlib
    import io

    main = load_entry_point("train/generate.py").main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_world_size_that_does_not_divide_the_experts_is_one_clear_error(ckpts):
    results = run_distributed(_cli_worker, 3, ["--checkpoint", str(ckpts[2]), "--prompt", "kato",
                                                  "--max-new-tokens", "8"])
    assert [code for code, _ in results] == [2, 2, 2]
    assert results[0][1] == ("error: world size 3 does not divide model.num_experts=4: expert parallelism splits "
                             "the experts evenly over the ranks; run with a world size in [1, 2, 4]\n")
    assert results[1][1] == results[2][1] == ""  # one line, from rank 0


def test_a_budget_the_method_cannot_meet_is_one_error_line_after_loading(ckpts):
    results = run_distributed(_cli_worker, 2, ["--checkpoint", str(ckpts[2]), "--prompt", "kato",
                                                  "--max-new-tokens", "8", "--kv", "quant", "--ratio", "8"])
    assert [code for code, _ in results] == [2, 2]
    assert results[0][1].startswith("error: kv compression ratio 8.0 is impossible for quant: ")
    assert results[0][1].count("\n") == 1 and results[1][1] == ""
