"""Training from a pretrained HF Llama (model.init_from_hf; tests/hf_models.py, no download): loss
goes down in one process, two data-parallel processes follow the same curve on the torch and the
DeepSpeed engine, a resumed run restores its own checkpoint (exactly, without reading the HF model
again), and train/eval.py --hf scores the original model as the HF model itself does."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pikv.tasks import load_job
from pikv.testing import run_distributed
from tests.hf_models import tiny_llama, write_texts
from tests.integration.conftest import REPO, RESUMED, SAME_CURVE_ABS, read_metrics

pytestmark = pytest.mark.slow
pytest.importorskip("transformers", reason="transformers is not installed")
STEPS = 8
GLOBAL_BATCH = 4
# sparse upcycling: every expert starts as the HF model's FFN (deterministic routing for the EP parity)
UPCYCLED = ["moe.every_n_layers=1", "model.num_experts=4", "model.top_k=2"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    texts = write_texts(root / "texts")
    model = tiny_llama(root / "model", texts, tie=True, std=0.02)  # a near-uniform start: loss ~ln(vocab)
    return {"root": root, "texts": texts, "folder": root / "model", "model": model}


def _common(hf) -> list[str]:
    return [f"model.init_from_hf={hf['folder']}", f"data.source={hf['texts']}", "data.seq_len=64",
            f"train.max_steps={STEPS}", "train.lr=3e-3", "train.warmup_steps=2", "train.checkpoint_every=100",
            "train.eval_every=1000", "train.eval_batches=2", f"train.output_dir={hf['root'] / 'runs'}",
            "logging.wandb_mode=offline", "logging.progress=false", "kv.cotrain_start=0.5"]


def _fit(overrides: list[str], forbid_hf_load: bool = False) -> dict[int, float]:
    from pikv.distributed import init_distributed
    from pikv.training import Trainer, trainer as trainer_module
    cfg = load_job(overrides=overrides)
    ctx = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.expert_parallel_size)
    load = trainer_module.load_hf_teacher
    if forbid_hf_load:  # a resumed run must restore its checkpoint, not the pretrained weights
        def refuse(*args, **kwargs):
            raise AssertionError("a resumed run loaded the HF model")
        trainer_module.load_hf_teacher = refuse
    try:
        return Trainer(cfg, ctx).fit().losses
    finally:
        trainer_module.load_hf_teacher = load


def _single(rank, world, common):
    batch = [f"train.batch_size={GLOBAL_BATCH}"]
    straight = _fit(common + batch + ["train.run_name=straight"])
    first = _fit(common + batch + ["train.run_name=resumed", "train.exit_at_step=4"])
    rest = _fit(common + batch + ["train.run_name=resumed"], forbid_hf_load=True)
    upcycled = _fit(common + batch + UPCYCLED + ["train.run_name=upcycled"])
    return straight, first, rest, upcycled


def _data_parallel(rank, world, common, engines):
    batch = [f"train.batch_size={GLOBAL_BATCH // world}"]
    curves = {engine: _fit(common + batch + [f"train.run_name=dp_{engine}", f"train.engine={engine}"]
                           + (["train.zero_stage=1"] if engine == "deepspeed" else [])) for engine in engines}
    curves["ep"] = _fit(common + batch + UPCYCLED + ["train.run_name=ep", "parallel.expert_parallel_size=2"])
    return curves


def test_training_from_hf_one_process_dp_deepspeed_and_exact_resume(hf):
    common = _common(hf)
    straight, first, rest, upcycled = run_distributed(_single, 1, common, timeout_s=900)[0]
    assert sorted(straight) == list(range(1, STEPS + 1))
    # from a random 2-layer model the first steps drop the loss by far more than noise (~0.05)
    assert straight[STEPS] < straight[1] - 0.3, straight
    assert sorted(first) == [1, 2, 3, 4] and sorted(rest) == list(range(5, STEPS + 1))
    assert {**first, **rest} == pytest.approx(straight, **RESUMED)
    run_dir = hf["root"] / "runs" / "straight"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lm_loss", "kv_attn_error", "tokens_per_s"} <= set(rows[0])
    assert (run_dir / "wandb").is_dir()

    engines = ["torch"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    for curves in run_distributed(_data_parallel, 2, common, engines, timeout_s=900):
        for engine, losses in curves.items():
            # the same global batch split over two ranks (EP: experts sharded too): another fp32
            # summation order only
            assert losses == pytest.approx(upcycled if engine == "ep" else straight, abs=SAME_CURVE_ABS), engine
    assert upcycled[STEPS] < upcycled[1] - 0.3, upcycled


def _eval_script():
    spec = importlib.util.spec_from_file_location("pikv_eval_entry", REPO / "train" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_hf_gives_the_hf_models_own_nll(hf, tmp_path):
    from tokenizers import Tokenizer
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(p.read_text()[-3000:] for p in sorted(hf["texts"].glob("*.txt"))[:3]))
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  seq_len: 64\n  source: {hf['texts']}\ntrain:\n  output_dir: {tmp_path / 'runs'}\n")
    out = tmp_path / "out"
    code = _eval_script().main(["--hf", str(hf["folder"]), "--config", str(config), "--data", str(heldout),
                                "--out", str(out), "--kv", "h2o", "--ratio", "2", "--max-sequences", "4"])
    assert code == 0
    got = json.loads((out / "heldout_eval.json").read_text())

    # The reference: the HF model itself on [EOT] + the text's tokens, in blocks of 65 at stride 64.
    tok = Tokenizer.from_file(str(hf["folder"] / "tokenizer.json"))
    ids = np.array([tok.token_to_id("<|endoftext|>")] + tok.encode(heldout.read_text()).ids)
    n = (len(ids) - 1) // 64
    blocks = torch.from_numpy(ids[np.arange(n)[:, None] * 64 + np.arange(65)[None, :]])
    with torch.no_grad():
        logits = hf["model"](blocks[:, :-1]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert got["tokens"] == n * 64
    # fp32 logits identical (the port), summed in float64 by eval vs a float32 mean here
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert "h2o" in (out / "kv" / "results.json").read_text()  # the KV table ran on the original model
    assert "not allowed with argument" in _eval_usage_error(["--hf", str(hf["folder"]), "--checkpoint", "runs/x"])
    assert _eval_script().main(["--checkpoint", "runs/x", "--config", str(config)]) == 2  # --config is for --hf


def _eval_usage_error(argv):
    """argparse's message for bad arguments (it exits 2)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        _eval_script().main(argv)
    return err.getvalue()


def _recipe(rank, world, common, folder, engines):
    """A plain run and a retrofit-recipe run (frozen embeddings, KD from the original model, PCA-initialised
    compressor) of 3 steps per engine; each recipe run's weights after training."""
    from pikv.distributed import init_distributed
    from pikv.training import Trainer
    short = common + ["train.max_steps=3", f"train.batch_size={GLOBAL_BATCH}"]
    ctx = init_distributed("cpu", "gloo", 1)
    Trainer(load_job(overrides=short + ["train.run_name=plain"]), ctx).fit()
    recipe = short + ["train.freeze=[embed_tokens.*]", "train.mode=distill", f"distill.teacher={folder}",
                      "kv.pca_init_windows=8"]
    from pikv.training import distill

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher = model.init_from_hf was loaded a second time")
    distill.load_hf_teacher = refuse  # the trainer holds its own reference: the initial load still works
    weights = {}
    for engine in engines:
        trainer = Trainer(load_job(overrides=recipe + [f"train.run_name=recipe_{engine}", f"train.engine={engine}"]), ctx)
        trainer.fit()
        weights[engine] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights


def test_retrofit_recipe_parts_freeze_distill_from_the_original_and_pca_init(hf):
    engines = ["torch"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    runs = run_distributed(_recipe, 1, _common(hf), str(hf["folder"]), engines, timeout_s=900)[0]
    original = hf["model"].state_dict()
    for engine, weights in runs.items():
        # frozen: the (tied) embedding is the original's, bit for bit; attention trained
        assert torch.equal(weights["embed_tokens.weight"], original["model.embed_tokens.weight"]), engine
        assert not torch.equal(weights["layers.0.self_attn.q_proj.weight"],
                               original["model.layers.0.self_attn.q_proj.weight"]), engine
    plain = read_metrics(hf["root"] / "runs" / "plain")
    recipe = read_metrics(hf["root"] / "runs" / "recipe_torch")
    # the student starts as the teacher: KD of the first step is 0 up to fp32 rounding of two equal
    # softmaxes (measured < 1e-7); later steps move away from it
    assert recipe[1]["kd_loss"] < 1e-6 and recipe[3]["kd_loss"] > recipe[1]["kd_loss"]
    # PCA of the model's own keys/values vs a random compressor, same first batch: a much smaller error
    assert recipe[1]["kv_attn_error"] < 0.5 * plain[1]["kv_attn_error"], (recipe[1], plain[1])
