# The two set-up commands (see README):
#   make demo   - creates .venv, installs the runtime dependencies, runs the offline DreamBooth demo
#   make test   - creates .venv, installs the test dependencies, runs the test suite
# TORCH picks the torch build: the default pin is the CPU wheel on our dev machines; on a CUDA machine
# `make demo TORCH=torch` takes PyPI's default (CUDA) build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup setup-test clean toy-model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: $(PY) requirements.txt
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

demo: $(VENV)/.runtime
	HF_HUB_OFFLINE=1 $(PY) train.py --demo

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Rebuild assets/toy (the shipped toy model) from scratch, exactly as it was made: the five stages, then second
# rounds of the VAE decoder, the factor classifier and the SD UNet + text encoder (times in assets/toy/pretrain.json)
toy-model: $(VENV)/.runtime
	$(PY) pretrain.py
	$(PY) pretrain.py --stage vae --init_from assets/toy/model --max_train_steps 2000 --train_batch_size 16
	$(PY) pretrain.py --stage classifier --init_from assets/toy/classifier --max_train_steps 2000 --learning_rate 5e-4
	$(PY) pretrain.py --stage sd --init_from assets/toy/model --max_train_steps 1500 --learning_rate 2e-4 --colour_dropout 0.3

clean:
	rm -rf $(VENV) runs
