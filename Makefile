# One environment, made from nothing: `make test` (tests) and `make demo` (train + test + predict on demo data).
# A torch already in the environment is kept (GPU users: install your CUDA build first, or point VENV at an
# environment that has it, or use VENV_FLAGS=--system-site-packages); otherwise the CPU build is installed.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_CPU ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ura_monai_installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/ura-monai demo --output demo_output

clean:
	rm -rf $(VENV) demo_output outputs
