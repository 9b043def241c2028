# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes from these pins, which a fresh machine takes from local wheels instead of a multi-GB download.
TORCH := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-gpu lint extras clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lrm demo

test: install
	$(BIN)/python -m pytest -q -x --durations=15

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check .

# Optional original reward packages, used only by the parity tests and bench/reward_adapters_throughput.py
# (reward_adapters itself needs neither). Their pins are broken (hpsv2: protobuf<4, pytest==7.2.0; image-reward:
# timm==0.6.13), so both go in with --no-deps plus their real runtime needs: clint + args for hpsv2, fairscale
# for image-reward's BLIP ViT. The hpsv2 wheel lacks open_clip's BPE vocabulary: copied in from open_clip.
# image-reward does not import as a whole with transformers >= 5 (undeclared `clip`, transformers-4 helpers):
# reward_adapters.original_packages loads the modules scoring needs, with small shims.
extras: install
	$(BIN)/pip install -q 'open_clip_torch>=3' 'protobuf>=4' clint args ftfy regex
	$(BIN)/pip install -q --no-deps hpsv2==1.2.0 image-reward==1.5 fairscale==0.4.13
	$(BIN)/python -c "import importlib.util as u, os, shutil; \
	hp = os.path.dirname(u.find_spec('hpsv2').origin); oc = os.path.dirname(u.find_spec('open_clip').origin); \
	shutil.copyfile(os.path.join(oc, 'bpe_simple_vocab_16e6.txt.gz'), \
	                os.path.join(hp, 'src', 'open_clip', 'bpe_simple_vocab_16e6.txt.gz'))"
	$(BIN)/python -c "import hpsv2.img_score; print('hpsv2 ok')"
	$(BIN)/python -c "from reward_adapters.original_packages import load_imagereward; load_imagereward(); \
	print('image-reward ok')"

clean:
	rm -rf $(VENV) runs .pytest_cache
