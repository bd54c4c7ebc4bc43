# Environments made from nothing: `make test` (both test suites) and `make demo` (train + test + predict on demo data).
# A torch already in the environment is kept (GPU users: install your CUDA build first, or point VENV at an
# environment that has it, or use VENV_FLAGS=--system-site-packages); otherwise the CPU build is installed.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_CPU ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ura_monai_installed

.PHONY: test test-core test-quick lint demo install clean label-env test-label

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test,lint]"
	touch $(STAMP)

install: $(STAMP)

# the README's test command (and CI's): lint (ruff, mypy), the core suite, then the MONAI Label suite in its own environment
test: lint test-core test-label

test-core: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# the quick loop while developing: the core suite without the tests marked slow (under 3 minutes on 2 cores)
test-quick: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# ruff lint and format check (config in pyproject.toml) and a lenient mypy run over the package
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy ura_monai

demo: $(STAMP)
	$(VENV)/bin/ura-monai demo --output demo_output

clean:
	rm -rf $(VENV) $(LABEL_VENV) demo_output outputs

# MONAI Label integration (ura_monai.label, apps/ura_net_label): its own environment, .venv-label, because
# MONAI Label 0.8.5 needs pydicom 2.4.5 where the core needs pydicom>=3 (see requirements-label.txt).
LABEL_VENV ?= .venv-label
LABEL_TORCH ?= torch==2.14.1 torchvision==0.29.1
LABEL_PY := $(LABEL_VENV)/bin/python
# MONAI Label with --no-deps: requirements-label.txt lists what it needs, less sam2 (see there)
LABEL_STAMP := $(LABEL_VENV)/.ura_monai_label_installed

# torch 2.14.1 and torchvision 0.29.1 are CUDA builds (about 5.6 GB installed): say so before pip runs out of disk
LABEL_MIN_FREE_GB ?= 7

$(LABEL_STAMP): pyproject.toml requirements-label.txt
	@$(PYTHON) -c "import os, shutil, sys; d = os.path.dirname(os.path.abspath('$(LABEL_VENV)')); free = shutil.disk_usage(d).free / 2**30; sys.exit(0 if free >= $(LABEL_MIN_FREE_GB) else f'$(LABEL_VENV) needs about 6 GB (torch 2.14.1 + torchvision 0.29.1, CUDA builds) but {d} has {free:.1f} GB free: free disk space there, or set LABEL_VENV=/a/larger/disk/venv-label')"
	test -x $(LABEL_PY) || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install -q --upgrade pip
	$(LABEL_PY) -m pip install -q $(LABEL_TORCH)
	$(LABEL_PY) -m pip install -q -r requirements-label.txt $(LABEL_TORCH) "pytest>=7"
	$(LABEL_PY) -m pip install -q --no-deps monailabel==0.8.5
	$(LABEL_PY) -m pip install -q --no-deps -e .
	touch $(LABEL_STAMP)

label-env: $(LABEL_STAMP)

test-label: $(LABEL_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(LABEL_PY) -m pytest -q -p no:cacheprovider tests_label
