# Sourced by the device scripts: the carried wheels (.whlsd/) and the trimmed diffusers (.dev/diffusers_trim.zip)
# into /tmp/site, on PYTHONPATH with the repository. Both are made here by bench/device/fetch_wheels.sh, then
# bench/device/trim_diffusers.py; carry [".whlsd", ".dev/diffusers_trim.zip"]. Usage: source bench/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlsd/*.whl \
  && python3 -m zipfile -e .dev/diffusers_trim.zip /tmp/site || { echo "device set-up failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:.
