# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject) to the builds that
# resolve from local files on the project machines; open_clip needs a
# torchvision built against the same torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo test wheel bench-report clean fixtures fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[qlora-oracle]' $(TORCH_PINS) || echo "bitsandbytes did not install: the NF4 oracle tests will skip"
	touch $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

# The suite includes tests/test_packaging.py: it builds the wheel, installs it into a fresh
# venv outside the repository and runs inspect, diff and merge-lora from there.
test: $(STAMP)
	$(PY) -m pytest

# A wheel for real installs (pip install dist/omgtool-*.whl); the mappings ship inside it.
wheel: $(STAMP)
	$(PY) -m pip wheel . --no-deps -q -w dist

# The long fuzz run (the short one is part of `make test`); failures are kept under FUZZ_OUT.
FUZZ_CASES ?= 20000
FUZZ_SEED ?= 1
FUZZ_OUT ?= /tmp/omgtool-fuzz-failures
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.run --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --out $(FUZZ_OUT)

fixtures: $(STAMP)
	$(PY) -m fixtures.generate --out fixtures/tiny
	$(PY) -m fixtures.llava --out fixtures/tiny
	$(PY) -m fixtures.qwen2 --out fixtures/tiny

# The benchmarks are heavy (real-size files under /tmp): run them one by one, e.g.
# `.venv/bin/python -m bench.bench_inspect`, then assemble docs/benchmarks.md:
bench-report: $(STAMP)
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) build dist *.egg-info

# Not part of `make test`: llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist
# on the package registry, unpacked under build/clients, never vendored) converts the tiny
# fixture's Llama export; the gguf package reads it back. LLAMA_TOKENIZE=1 also builds llama.cpp's
# llama-tokenize (cmake; minutes on 2 cores the first time) and compares its ids with training's.
.PHONY: clients
clients: $(STAMP)
	$(PY) -m tests.clients.llama_cpp $(if $(LLAMA_TOKENIZE),--llama-tokenize)
