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

# Optional pretrained-reward packages with broken pins: installed without their pins, with their real needs.
extras: install
	$(BIN)/pip install -q 'open_clip_torch>=3' 'protobuf>=4' clint ftfy fairscale regex
	$(BIN)/pip install -q --no-deps hpsv2 image-reward

clean:
	rm -rf $(VENV) runs .pytest_cache
