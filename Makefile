# The two commands a newcomer types: `make test` and `make demo`. Both create/refresh .venv first.
#
# torch: nnU-Net's trainer lookup imports timm -> torchvision, so torch and torchvision must be a matching
# pair. We pin torch 2.14.1 + torchvision 0.29.1, PyPI's default builds (CUDA 13 inside, they run on CPU
# too); pip downloads both, and their nvidia-* wheels, from PyPI. For another build (a CUDA version your driver
# supports, or CPU only), name the pair and PyTorch's index for it (cu126, cu128, ..., cpu; see pytorch.org), e.g.
#   make test TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo docs bench table clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	# the official BraTS evaluator, only for the cross-check test: its pins (numpy<2.3, pandas<3 via panoptica)
	# would downgrade nnU-Net's stack, so it goes in without its dependencies plus the few it really imports
	$(PY) -m pip install --quiet "ruamel.yaml>=0.18.6,<1" "plotly>=5.16.1,<6" "typer>=0.15,<1"
	$(PY) -m pip install --quiet --no-deps "panoptica==2.1.7" "brats-evaluation==0.0.10"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/nndiff demo

# documentation/reference/ and the generated blocks of the README and the explanation pages, from the code
# (devtools/docs.py); DOCS_ARGS=--check writes nothing and fails naming every page that is out of date
DOCS_ARGS ?=
docs: install
	$(PY) -m devtools.docs $(DOCS_ARGS)

# speed of every head against nnU-Net and steps-accuracy curves -> benchmarks/results/*.json -> benchmarks/RESULTS.md
# (~1 h 35 min on 2 CPU cores). BENCH_ARGS=--quick: the default sampling settings are extrapolated instead of run;
# BENCH_ARGS="--part speed" or "--part accuracy": re-measure one part, keep the other's stored run
BENCH_ARGS ?=
bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

# the comparison table (issue 20): every head and stock nnU-Net at the same budget (2000 optimiser steps, the
# [variants.table] of trainer_configs/), 24 training + 20 held-out phantoms; hours on 2 CPU cores, resumable (re-run
# the same command after an interruption). TABLE_ARGS e.g. "--device cuda --shape 128 160 160 --spacing 1"
TABLE_ARGS ?=
table: install
	$(PY) -m benchmarks --part table $(TABLE_ARGS)

clean:
	rm -rf $(VENV) nndiff_demo bench_work bench_phantoms bench_table .pytest_cache build *.egg-info
