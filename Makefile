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

.PHONY: all venv build demo test test-rust test-python test-wheel wheel test-compat compat-venv lint bench peers-venv clean

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
	$(PY) -m pytest tests -q -m "not wheel" --ignore=tests/compat

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

# Compatibility suite (docs/compat.md): SGLang's and vLLM-Omni's own code as the oracle, in a
# separate venv. The engines are installed --no-deps (their full dependency sets pin CUDA-only
# wheels and a different torch); torch, diffusers, modelopt and dqfast itself come from $(VENV)
# through a site dir added by a .pth file, so nothing large is downloaded twice.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.dqfast-compat
COMPAT_ENGINES := sglang==0.5.23 vllm==0.30.0 vllm-omni==0.30.0 torchvision==0.28.0 cache-dit==1.5.1 \
	compressed-tensors==0.17.0 apache-tvm-ffi==0.1.11
# What the engines import on the way to their builders, parsers, loaders and DiT modules (real
# packages, with their own dependencies; versions as validated).
COMPAT_IMPORT_DEPS := transformers==5.13.0 orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 starlette==1.10.0 \
	msgspec==0.23.0 pyzmq==27.3.0 ipython==9.18.1 aiohttp==3.14.5 dill==0.4.1 sentencepiece==0.2.3 \
	gguf==0.19.0 addict==2.4.0 imageio==2.38.2 aenum==3.1.17 prettytable==3.18.0 av==18.1.0 loguru==0.7.3 \
	einops==0.8.2 cbor2==6.3.0 openai-harmony==0.0.8 openai==3.57.0 cachetools==8.0.2 cloudpickle==3.1.3 \
	uvloop==0.23.0 py-cpuinfo==9.0.0 prometheus_client==0.26.0 fastapi==0.165.0 partial-json-parser==0.2.1.1.post7 \
	xgrammar==0.2.9 llguidance==1.9.1 tiktoken==0.14.0 uvicorn==0.54.0

$(COMPAT_STAMP): $(DEPS_STAMP) Makefile
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python3.$$($(PY) -c 'import sys; print(sys.version_info[1])')/site-packages')" \
		> $$($(COMPAT_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_dqfast_main_venv.pth
	$(COMPAT_PY) -m pip install -q --no-compile --no-deps $(COMPAT_ENGINES)
	$(COMPAT_PY) -m pip install -q --no-compile $(COMPAT_IMPORT_DEPS)
	touch $@

compat-venv: $(COMPAT_STAMP)

test-compat: build $(COMPAT_STAMP)
	DQFAST_COMPAT=1 $(COMPAT_PY) -m pytest tests/compat -q -m compat -p no:cacheprovider

test: lint build test-rust test-python test-wheel test-compat

bench: build
	$(PY) benches/bench_fp8_build.py --family wan --blocks 4

# llm-compressor in a venv of its own (it pins its own torch): the same-run peer of
# `benches/bench_fp8_build.py --tools ...,llmc-w1,llmc-w2`.
peers-venv:
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q "llmcompressor==0.14.0.1"

clean:
	rm -rf target dist demo-out bench-out $(BUILD_STAMP)
