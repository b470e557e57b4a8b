# The two commands: `make demo` (the embedded default) and `make test` (the full suite CI runs);
# `make study` runs the demo over 3 seeds on Fashion-MNIST;
# `make check` is the inner loop: lint plus the tests that need neither Ray nor the whole pipeline.
# Each creates .venv on a fresh machine: torch/torchvision are installed first at the pinned
# versions this machine holds on disk (x86_64, Python 3.11), so pip never resolves a different
# multi-GB build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tailforge-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo study test check install clean

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	@# Fashion-MNIST (the fashion-mnist dataset) comes from Debian's package; nothing is downloaded at run time
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "could not install dataset-fashion-mnist; the fashion-mnist dataset will be unavailable"; \
	  else \
	    echo "note: the fashion-mnist dataset needs Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), or give fashion-mnist:PATH"; \
	  fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	@# the frost corruption's photographs only (the package's own code and dependencies are never used)
	$(PY) -m pip install --quiet --no-deps imagecorruptions==1.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tailforge demo

# every finding over 3 seeds on Fashion-MNIST (16 px on a CPU: 2 h 26 min on 2 cores plus the first diffusion model, docs/evaluation.md; 28 px with a GPU), cached in study-out
study: $(STAMP)
	$(VENV)/bin/tailforge study --dataset fashion-mnist --out study-out

test: $(STAMP)
	$(PY) -m pytest -q

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf demo-out study-out bench-out .pytest_cache
