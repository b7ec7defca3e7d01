# The two set-up commands (see README):
#   make demo   — venv + build + convert a small synthetic FLUX.1-shaped ModelOpt FP8 export
#   make test   — venv + build + cargo test + pytest
# The virtual environment is created once and reused; torch (a large CUDA build on PyPI) is
# downloaded only the first time.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.dqfast-deps
BUILD_STAMP := $(VENV)/.dqfast-build
RUST_SRC := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: all venv build demo test test-rust test-python lint bench peers-venv clean

all: build

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.7,<2"
	$(PIP) install -q torch==2.13.0 nvidia-modelopt==0.47.0 diffusers==0.42.1 "safetensors>=0.4" "pytest>=8" \
		"numpy>=1.24" "click>=8.1" "rich>=13" "ray>=2.9" "pyyaml>=6" \
		"ruff==0.17.6" "mypy==2.4.1"
	touch $@

venv: $(DEPS_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(RUST_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q
	touch $@

build: $(BUILD_STAMP)

demo: build
	$(VENV)/bin/dqfast demo --workdir demo-out

test-rust:
	cargo test -p dqfast-core --release

test-python: build
	$(PY) -m pytest tests -q

# Style and type gates (also part of `make test`).
lint: venv
	cargo fmt --all --check
	cargo clippy --all-targets --release -q -- -D warnings
	$(VENV)/bin/ruff check -q .
	$(VENV)/bin/ruff format --check -q .
	$(VENV)/bin/mypy

test: lint build test-rust test-python

bench: build
	$(PY) benches/bench_fp8_build.py --family wan --blocks 4

# llm-compressor in a venv of its own (it pins its own torch): the same-run peer of
# `benches/bench_fp8_build.py --tools ...,llmc-w1,llmc-w2`.
peers-venv:
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q "llmcompressor==0.14.0.1"

clean:
	rm -rf target demo-out bench-out $(BUILD_STAMP)
