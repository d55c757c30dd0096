# Two entry points: `make train` (default CPU run) and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: train test bench clean

# --system-site-packages: a machine that already has a (GPU) torch keeps it; otherwise pin the
# CPU-local torch 2.13.0 so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m trainer.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_attention.py --precompile 15 $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
