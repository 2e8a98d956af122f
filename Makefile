# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject) to the builds that
# resolve from local files on the project machines; open_clip needs a
# torchvision built against the same torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench-report clean fixtures fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest

# The long fuzz run (the short one is part of `make test`); failures are kept under FUZZ_OUT.
FUZZ_CASES ?= 20000
FUZZ_SEED ?= 1
FUZZ_OUT ?= /tmp/omgtool-fuzz-failures
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.run --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --out $(FUZZ_OUT)

fixtures: $(STAMP)
	$(PY) -m fixtures.generate --out fixtures/tiny
	$(PY) -m fixtures.llava --out fixtures/tiny

# The benchmarks are heavy (real-size files under /tmp): run them one by one, e.g.
# `.venv/bin/python -m bench.bench_inspect`, then assemble docs/benchmarks.md:
bench-report: $(STAMP)
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) build *.egg-info
