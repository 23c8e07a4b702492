# Every target bootstraps its own virtual environment in $(VENV) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.upa-installed

# Study settings. PROFILE=demo (the default) uses the embedded digits and a randomly initialised
# encoder on the CPU; PROFILE=gpu uses the CoOp datasets under DATA and pretrained weights.
# ARCH (backbone) and WEIGHTS replace the profile's choice when given; HF_CACHE names the
# Hugging Face hub cache that pretrained tags are resolved from.
DATA ?= data
DEVICE ?= auto

.PHONY: setup study test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[study,dev]"
	touch $(STAMP)

setup: $(STAMP)

# Executes every notebook with papermill (PROFILE=demo by default, or gpu), collects the tables
# into results/summary/ and builds the book into _build/html. ARCH and WEIGHTS replace the
# profile's backbone and weights only when given on the command line or in the environment.
study: $(STAMP)
	$(PY) -m upa.study --profile "$(or $(PROFILE),demo)" --data-root "$(DATA)" --device "$(DEVICE)" \
		$(if $(filter command line environment,$(origin ARCH)),--backbone "$(ARCH)") \
		$(if $(filter command line environment,$(origin WEIGHTS)),--weights "$(WEIGHTS)") \
		$(if $(HF_CACHE),--hf-cache-dir "$(HF_CACHE)")

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
