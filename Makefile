# mod_megatron: two commands, `make train` and `make test`; each sets up .venv first.
#
#   make train                                   # tiny CPU run on the default corpus
#   make train CONFIG=configs/other.yaml ARGS="--train.iters=50 --mod.capacity=0.25"
#   make test                                    # the test suite (pytest -q)
#   make clean / make distclean

PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= configs/tiny-cpu.yaml
ARGS   ?=
# Extra flags for `python -m venv`, e.g. VENV_ARGS=--system-site-packages on a machine whose
# system Python already has a CUDA torch.
VENV_ARGS ?=
# torch for machines without an NVIDIA GPU: a CPU build that pip takes from this machine's disk.
# An unpinned torch would pull a multi-GB CUDA build, so it is installed before the package.
CPU_TORCH ?= torch==2.13.0

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv train test clean distclean

venv: $(STAMP)

# Re-run only when setup.py changes (or the venv is missing); `make venv` is a no-op otherwise.
$(STAMP): setup.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	@if nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: torch comes from the package requirements"; \
	else \
		echo "no NVIDIA GPU: installing CPU $(CPU_TORCH) first"; \
		$(VPY) -m pip install --quiet '$(CPU_TORCH)'; \
	fi
	DS_BUILD_OPS=0 $(VPY) -m pip install --quiet -e '.[test]'
	@touch $@

train: venv
	$(VENV)/bin/mod-train --config $(CONFIG) $(ARGS)

test: venv
	$(VPY) -m pytest -q

# Run outputs and prepared data (corpus, tokenizer, .bin/.idx); the venv stays.
clean:
	rm -rf runs data .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Everything `make` made, the venv and downloaded GPU wheels included.
distclean: clean
	rm -rf $(VENV) build *.egg-info .whl
