# The two set-up commands (see README):
#   make demo   — venv + build + convert a small synthetic FLUX.1-shaped ModelOpt FP8 export
#   make test   — venv + build + cargo test + pytest (+ the wheel, installed into a torch-free venv)
#   make wheel  — manylinux_2_28 abi3 wheel (stripped) and sdist into dist/
# The virtual environment is created once and reused; torch (a large CUDA build on PyPI) is
# downloaded only the first time.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.dqfast-deps
BUILD_STAMP := $(VENV)/.dqfast-build
RUST_SRC := $(shell find rust -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: all venv build demo test test-rust test-python test-wheel wheel lint bench peers-venv clean

all: build

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
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
	$(PY) -m pytest tests -q -m "not wheel"

# Release artifacts: `--zig` links against glibc 2.28 with the ziglang package (no docker), so
# the wheel installs on RHEL 8 / Ubuntu 20.04 and later; the `wheel` profile strips debug info.
wheel: venv
	rm -rf dist
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin build -q \
		--profile wheel --zig --compatibility manylinux_2_28 --out dist
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin sdist --out dist

# The wheel installed into a fresh venv without torch, then a build and the extras' messages.
test-wheel: wheel
	$(PY) -m pytest tests/test_wheel.py -q -m wheel

# Style and type gates (also part of `make test`).
lint: venv
	cargo fmt --all --check
	cargo clippy --all-targets --release -q -- -D warnings
	$(VENV)/bin/ruff check -q .
	$(VENV)/bin/ruff format --check -q .
	$(VENV)/bin/mypy

test: lint build test-rust test-python test-wheel

bench: build
	$(PY) benches/bench_fp8_build.py --family wan --blocks 4

# llm-compressor in a venv of its own (it pins its own torch): the same-run peer of
# `benches/bench_fp8_build.py --tools ...,llmc-w1,llmc-w2`.
peers-venv:
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q "llmcompressor==0.14.0.1"

clean:
	rm -rf target dist demo-out bench-out $(BUILD_STAMP)
