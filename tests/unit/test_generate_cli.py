"""train/generate.py and pikv/inference in one process: bad input, prompts files, batching by length,
seeded sampling, and the CLI end to end under plain python (its tokens against Transformer.generate).

The checkpoint is written by the trainer's save_checkpoint (tests/helpers.py) from a perturbed tiny
model; the multi-process paths are in tests/distributed/test_generate.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from pikv.config import load_config
from pikv.data import load_tokenizer
from pikv.distributed import DistContext
from pikv.inference import GenerateOptions, encode_prompts, generate_texts, read_prompts
from pikv.inference.generate import length_batches
from tests.helpers import load_entry_point, save_job_checkpoint, tiny_lm, tiny_tokenizer_file
from tests.integration.conftest import REPO, TINY

CFG = load_config(None, TINY)
ONE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), ep_size=1)
# "kato rine sumo" and "sumo kato rine" encode to the same length (3 tokens), "torsu" to another (2)
PROMPTS = ["kato rine sumo", "torsu", "sumo kato rine", "kato rine sumo"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-cli")
    save_job_checkpoint(CFG, root / "checkpoints", tiny_tokenizer_file(root), lambda: tiny_lm(CFG))
    return root


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return load_tokenizer(str(run_dir / "checkpoints" / "step_1" / "tokenizer.json"))


def _main(argv, capsys) -> tuple[int, str]:
    code = load_entry_point("train/generate.py").main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--kv", "h3o"], "error: unknown kv policy 'h3o': allowed are full, window, streaming, h2o,"),
    (["--kv", "h2o"], "error: --kv h2o compresses the cache: give --ratio R"),
    (["--kv", "quant+snapkv", "--ratio", "0.5"], "error: --ratio 0.5 must be >= 1"),
    (["--kv", "full", "--ratio", "4"], "error: --ratio 4.0 with --kv full: the full cache keeps everything"),
    (["--top-k", "0"], "error: top_k=0 must be a positive integer or None"),
    (["--batch-size", "0"], "error: --batch-size 0 must be >= 1"),
])
def test_bad_options_are_one_error_line(run_dir, capsys, argv, message):
    code, err = _main(["--checkpoint", str(run_dir), "--prompt", "kato rine sumo"] + argv, capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_prompt_longer_than_max_seq_len_names_the_lengths(run_dir, tokenizer, capsys):
    prompt = "kato rine " * 40
    n = 1 + len(tokenizer.encode(prompt).ids)  # the leading end-of-text token
    assert n > 64
    code, err = _main(["--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "4"], capsys)
    assert code == 2 and err == (f"error: prompt 0 is {n} tokens (with the leading end-of-text token); with "
                                 f"--max-new-tokens 4 that makes {n + 4}, more than the model's max_seq_len 64\n")


def test_missing_checkpoint_and_bad_prompt_files_are_one_error_line(run_dir, tmp_path, capsys):
    code, err = _main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and err == f"error: --checkpoint {tmp_path / 'nope'}: no complete checkpoint there (expected " \
        "a step_<N> directory holding trainer.json, or a run directory with checkpoints/step_<N>/)\n"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "kato"}\n{"text": "rine"}\n')
    code, err = _main(["--checkpoint", str(run_dir), "--prompts", str(bad)], capsys)
    assert code == 2 and err == f'error: --prompts {bad} line 2: expected an object with a string "prompt" field\n'
    code, err = _main(["--checkpoint", str(run_dir), "--prompts", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and err == f"error: --prompts {tmp_path / 'none.txt'}: no such file\n"


def test_prompt_files_jsonl_or_one_per_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b", "id": 1}\n\n{"prompt": "line\\nbreak"}\n')
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert read_prompts(None, tmp_path / "p.jsonl") == ["a b", "line\nbreak"]
    assert read_prompts(None, tmp_path / "p.txt") == ["first prompt", "second"]
    assert read_prompts("one", None) == ["one"]


def test_batches_group_equal_lengths_in_order_of_first_appearance():
    assert length_batches([5, 3, 5, 5, 3], 2) == [[0, 2], [3], [1, 4]]
    assert length_batches([5, 3, 5], 1) == [[0], [2], [1]]


def _generate(tokenizer, **options):
    opts = GenerateOptions(max_new_tokens=12, **options).check()
    ids = encode_prompts(tokenizer, PROMPTS, opts.max_new_tokens, CFG.model.max_seq_len)
    return generate_texts(tiny_lm(CFG), tokenizer, PROMPTS, ids, opts, ONE_PROCESS)


@pytest.mark.parametrize("options", [{}, {"kv": "h2o", "ratio": 2.0}, {"temperature": 1.0, "top_k": 40, "seed": 3}])
def test_batched_prompts_get_the_tokens_they_get_alone(tokenizer, options):
    lengths = [len(p) for p in encode_prompts(tokenizer, PROMPTS, 1, 64)]
    assert lengths[0] == lengths[2] == lengths[3] != lengths[1]  # three share a batch at batch size 3
    batched = _generate(tokenizer, batch_size=3, **options)
    assert batched.token_ids == _generate(tokenizer, batch_size=1, **options).token_ids
    if "temperature" not in options:  # greedy: the same prompt twice, the same tokens (sampled: its own draws)
        assert batched.token_ids[0] == batched.token_ids[3]
    assert batched.text == [tokenizer.decode(t) for t in batched.token_ids]


def test_seeded_sampling_reproducible_and_seed_dependent(tokenizer):
    a = _generate(tokenizer, temperature=1.0, seed=1)
    assert _generate(tokenizer, temperature=1.0, seed=1).token_ids == a.token_ids
    assert _generate(tokenizer, temperature=1.0, seed=2).token_ids != a.token_ids


def test_cli_end_to_end_plain_python(run_dir, tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "train/generate.py"), "--checkpoint", str(run_dir),
                           "--prompts", str(prompts), "--max-new-tokens", "10", "--batch-size", "2",
                           "--out", str(out)], text=True, capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "generate.json").read_text())
    model = tiny_lm(CFG)
    for i, ids in enumerate(report["prompt_token_ids"]):  # Transformer.generate, its plain (fp32) cache
        assert report["token_ids"][i] == model.generate(torch.tensor([ids]), 10)[0, len(ids):].tolist()
        assert report["text"][i] == tokenizer.decode(report["token_ids"][i])
        assert f"--- prompt {i} ---\n{PROMPTS[i]}{report['text'][i]}" in proc.stdout
    assert report["prompts"] == PROMPTS[:3] and report["world_size"] == 1
    assert report["tokens_per_s"] > 0 and report["time_to_first_token_s"] > 0
    assert len(report["kv_bytes_per_rank"]) == 1 and report["kv_bytes_per_rank"][0] > 0
    assert report["param_bytes_per_rank"] == [4 * model.num_params()]
    for line in ("tokens/s (decode, after the first token): ", "time to first token: ", "KV bytes per rank: ["):
        assert line in proc.stdout
