# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo_out

.PHONY: venv demo test test-fast bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/make_tiny_model.py --out $(DEMO)/model
	$(PY) tools/make_demo_data.py --out $(DEMO)/data
	$(PY) train_network.py --config_file configs/demo.toml
	@echo "demo LoRA: $(DEMO)/lora/demo_lora.safetensors"

test: $(STAMP)
	$(PY) -m pytest -q tests

# the fast tests only (no end-to-end subprocess runs), while you work
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/step_overhead.py
	$(PY) bench/engine_overhead.py

clean:
	rm -rf $(DEMO)
