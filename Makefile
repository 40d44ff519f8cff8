# longseq: `make demo` runs the main job, `make test` the test suite; both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NPROC  ?= 4
TORCH_VERSION ?= 2.13.0

.PHONY: install test demo clean

install: $(VENV)/.installed

# The venv sees the system's packages, so a GPU machine's own torch stays; torch==$(TORCH_VERSION)
# (a CPU build on this project's machines) is installed only when no torch is importable, because a
# bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest tests

demo: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node $(NPROC) -m longseq.train model=stdit_tiny parallel=dsp parallel.sp_size=2 train.steps=20 train.global_batch_size=8 optim.warmup_steps=2 train.out_dir=outputs/demo train.resume=none

clean:
	rm -rf $(VENV) build *.egg-info outputs
