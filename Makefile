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

# Rebuild the toy model's VAE and UNet in assets/toy the way they were made (stage commands, hardware and seconds in
# assets/toy/pretrain.json): the VAE from scratch on the world and its pattern images, a decoder-only round at 64 px,
# then the UNet on the shipped text encoder, frozen. Kept as shipped: the text encoder (trained jointly with an
# earlier UNet; the clip stage's text tower, frozen, did not teach the UNet shapes: README, "The toy world"), and
# clip/, dino/, classifier/. `python pretrain.py` alone runs every stage from scratch, the text tower included.
toy-model: $(VENV)/.runtime
	rm -rf runs/toy-text-encoder && mkdir -p runs && cp -r assets/toy/model/text_encoder runs/toy-text-encoder
	$(PY) pretrain.py --stage vae --threads 1 --work_dir runs/pretrain
	$(PY) pretrain.py --stage vae --init_from assets/toy/model --max_train_steps 1000 --train_batch_size 16 --threads 1 --work_dir runs/pretrain-round2
	$(PY) pretrain.py --stage sd --text_encoder runs/toy-text-encoder --threads 1 --work_dir runs/pretrain

clean:
	rm -rf $(VENV) runs
