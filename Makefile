# The two set-up commands (see README):
#   make demo   - creates .venv, installs the runtime dependencies, runs the offline DreamBooth demo
#   make test   - creates .venv, installs the test dependencies, runs the test suite
# TORCH picks the torch build: the default pin is the CPU wheel on our dev machines; on a CUDA machine
# `make demo TORCH=torch` takes PyPI's default (CUDA) build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup setup-test clean toy-model toy-faces

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

# The toy model that also draws faces (assets/toy/face_model) and PhotoVerse's adapter on it (assets/toy/photoverse),
# as they were made (README, "PhotoVerse on toy faces"): a decoder round and a UNet round of the shipped toy model
# with world.face images mixed in (identities 0-999; PhotoVerse's held-out ones are 1000 and up), then PhotoVerse's
# pretraining on 200 identities x 8 images.
toy-faces: $(VENV)/.runtime
	rm -rf runs/facemodel && mkdir -p runs/facemodel && cp -r assets/toy/model assets/toy/clip runs/facemodel/
	$(PY) pretrain.py --stage vae --init_from runs/facemodel/model --faces 0.3 --patterns 0.2 --max_train_steps 800 --train_batch_size 16 --threads 1 --work_dir runs/pretrain --output_dir runs/facemodel
	$(PY) pretrain.py --stage sd --init_from runs/facemodel/model --faces 0.25 --max_train_steps 1500 --learning_rate 3e-4 --warmup_steps 100 --threads 1 --work_dir runs/pretrain --output_dir runs/facemodel
	rm -rf assets/toy/face_model && cp -r runs/facemodel/model assets/toy/face_model && cp runs/facemodel/pretrain.json assets/toy/face_model/pretrain.json
	$(PY) world.py --faces runs/faces-pv --identities 200 --per_identity 8
	OMP_NUM_THREADS=1 $(PY) train.py --method photoverse --pretrained_model_name_or_path assets/toy/face_model --instance_data_dir runs/faces-pv --clip_model assets/toy/clip --dino_model assets/toy/dino --vision_layers last,1,2,3 --adapter_dim 64 --resolution 64 --train_batch_size 8 --learning_rate 5e-4 --max_train_steps 1500 --output_dir runs/pv-toy --device cpu --checkpointing_steps 500 --overwrite_output_dir
	mkdir -p assets/toy/photoverse && cp runs/pv-toy/photoverse.safetensors assets/toy/photoverse/

clean:
	rm -rf $(VENV) runs
