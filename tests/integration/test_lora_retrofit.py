"""LoRA on the attention projections of a pretrained HF Llama (model.lora_rank; tests/hf_models.py, no
download), with the retrofit's per-group learning rates (train.param_groups): the loss goes down, only
the adapters and the compressor change, a resumed run is exact, two data-parallel processes follow the
one-process curve on the torch and the DeepSpeed engine, activation checkpointing changes nothing,
and train/eval.py --checkpoint loads the adapted model."""

import importlib.util
import json

import pytest
import torch

from pikv.tasks import load_job
from pikv.testing import run_distributed
from tests.hf_models import tiny_llama, write_texts
from tests.integration.conftest import REPO, RESUMED, SAME_CURVE_ABS, read_metrics

pytestmark = pytest.mark.slow
pytest.importorskip("transformers", reason="transformers is not installed")
STEPS = 8
GLOBAL_BATCH = 4
COMPRESSOR_LR = 1e-3


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_lora")
    texts = write_texts(root / "texts")
    tiny_llama(root / "model", texts, tie=True, std=0.02)
    return {"root": root, "texts": texts, "folder": root / "model"}


def _common(hf) -> list[str]:
    return [f"model.init_from_hf={hf['folder']}", f"data.source={hf['texts']}", "data.seq_len=64",
            "model.lora_rank=4", "model.lora_alpha=8", f"train.max_steps={STEPS}", "train.lr=3e-2",
            "train.warmup_steps=2", "train.checkpoint_every=100", "train.eval_every=1000", "train.eval_batches=2",
            f"train.output_dir={hf['root'] / 'runs'}", "logging.wandb_mode=offline", "logging.progress=false",
            "kv.cotrain_start=0.5", "train.freeze=[embed_tokens.*,layers.*.mlp.*,'*layernorm*',norm.*]",
            f"train.param_groups=[{{params: '*kv_compressor.*', lr: {COMPRESSOR_LR}}}]"]


def _fit(overrides: list[str]):
    from pikv.distributed import init_distributed
    from pikv.training import Trainer
    cfg = load_job(overrides=overrides)
    ctx = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.expert_parallel_size)
    trainer = Trainer(cfg, ctx)
    losses = trainer.fit().losses
    lrs = {g["name"]: g["lr"] for g in trainer.engine.optimizer.param_groups}
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return losses, lrs, state


def _single(rank, world, common):
    batch = [f"train.batch_size={GLOBAL_BATCH}"]
    straight = _fit(common + batch + ["train.run_name=straight"])
    first = _fit(common + batch + ["train.run_name=resumed", "train.exit_at_step=4"])[0]
    rest = _fit(common + batch + ["train.run_name=resumed"])[0]
    recomputed = _fit(common + batch + ["train.run_name=ckpt", "train.activation_checkpointing=full"])[0]
    return straight, first, rest, recomputed


def _data_parallel(rank, world, common, engines):
    batch = [f"train.batch_size={GLOBAL_BATCH // world}"]
    return {engine: _fit(common + batch + [f"train.run_name=dp_{engine}", f"train.engine={engine}"]
                         + (["train.zero_stage=1"] if engine == "deepspeed" else []))[:2] for engine in engines}


def test_lora_retrofit_trains_adapters_only_resumes_exactly_and_matches_under_dp(hf, tmp_path):
    from pikv.training.distill import load_hf_teacher
    from pikv.training.schedule import lr_at
    common = _common(hf)
    (straight, lrs, state), first, rest, recomputed = run_distributed(_single, 1, common, timeout_s=900)[0]
    lm = {step: row["lm_loss"] for step, row in read_metrics(hf["root"] / "runs" / "straight").items() if "lm_loss" in row}
    # only the attention adapters learn the LM (embeddings, FFNs, norms frozen) from the near-uniform
    # start: measured -0.099 over the 8 steps at this lr, -0.037 over 6 steps at lr 3e-3 (barely training)
    assert lm[STEPS] < lm[1] - 0.07, lm
    original = load_hf_teacher(str(hf["folder"])).state_dict()
    for name, tensor in state.items():
        if ".lora_" in name or "kv_compressor" in name:
            continue
        assert torch.equal(tensor, original[name]), name  # every base weight is the original's, bit for bit
    assert state["layers.0.self_attn.q_proj.lora_b"].abs().max() > 0  # the adapters trained
    # the schedule's value at the last step, scaled per group (only non-empty groups exist)
    shape = lr_at(STEPS, load_job(overrides=common).train) / 3e-2
    assert lrs == pytest.approx({"decay": 3e-2 * shape, "decay.lr0": COMPRESSOR_LR * shape})
    assert sorted(first) == [1, 2, 3, 4] and {**first, **rest} == pytest.approx(straight, **RESUMED)
    assert recomputed == pytest.approx(straight, **RESUMED)  # recompute replays the same kernels

    engines = ["torch"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    for curves in run_distributed(_data_parallel, 2, common, engines, timeout_s=900):
        for engine, (losses, dp_lrs) in curves.items():
            # the same global batch split over two ranks: another fp32 summation order only
            assert losses == pytest.approx(straight, abs=SAME_CURVE_ABS), engine
            assert {k: v for k, v in dp_lrs.items() if k in lrs} == pytest.approx(lrs), engine

    # train/eval.py --checkpoint rebuilds the adapted model from the run's config and loads A and B
    spec = importlib.util.spec_from_file_location("pikv_eval_entry", REPO / "train" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    assert module.main(["--checkpoint", str(hf["root"] / "runs" / "straight"), "--out", str(out), "--kv", "learned",
                        "--ratio", "4", "--max-sequences", "2"]) == 0
    assert json.loads((out / "heldout_eval.json").read_text())["tokens"] > 0
    assert "learned" in (out / "kv" / "results.json").read_text()
