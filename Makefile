# longseq: `make demo` runs the main job, `make test` the test suite; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NPROC  ?= 4
TORCH_VERSION ?= 2.13.0
PIP    := $(BIN)/python -m pip install --progress-bar on

.PHONY: install install-test test demo clean

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The venv sees the system's packages, so a GPU machine's own torch stays; torch==$(TORCH_VERSION)
# (a CPU build on this project's machines) is installed only when no torch is importable, because a
# bare `torch` requirement would pull a multi-GB CUDA build. The demo needs only longseq's own
# requirements (torch, einops, hydra-core, numpy); the tests add the [test] extras (fla, diffusers, ...).
# tests/test_installed_wheel.py checks the declared requirements in a venv without the system's packages.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

test: install-test
	$(BIN)/python -m pytest tests

demo: install
	OMP_NUM_THREADS=1 $(BIN)/python -m longseq.train --nproc_per_node $(NPROC) model=stdit_tiny parallel=dsp parallel.sp_size=2 train.steps=20 train.global_batch_size=8 optim.warmup_steps=2 train.out_dir=outputs/demo train.resume=none train.print_ledger=true

clean:
	rm -rf $(VENV) build *.egg-info outputs
