"""Build the device call's carry from .whl/ (bench/device/fetch_wheels.sh): the diffusers wheel without the pipelines
a run does not import (the whole wheel is too big for a call's 64 MiB together with the tree) as
``.dev/diffusers_trim.zip``, and the small wheels the image lacks in ``.whlsd/``. Both are git-ignored; on the device
``source bench/device/env.sh`` installs them.

    python3 bench/device/trim_diffusers.py [--keep stable_diffusion wan flux ...]
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("importlib_metadata", "lazy_importer", "open_clip_torch", "ftfy", "wcwidth")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", nargs="+", default=["stable_diffusion"],
                   help="diffusers/pipelines/ sub-packages to keep (the model classes are always kept)")
    ns = p.parse_args(argv)
    wheels = sorted((ROOT / ".whl").glob("diffusers-*.whl"))
    if not wheels:
        raise SystemExit("no .whl/diffusers-*.whl: run bash bench/device/fetch_wheels.sh first")
    out = ROOT / ".dev" / "diffusers_trim.zip"
    out.parent.mkdir(exist_ok=True)
    kept = 0
    with zipfile.ZipFile(wheels[-1]) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            parts = name.split("/")
            if parts[:2] == ["diffusers", "pipelines"] and len(parts) > 3 and parts[2] not in ns.keep:
                continue
            dst.writestr(name, src.read(name))
            kept += 1
    small = ROOT / ".whlsd"
    small.mkdir(exist_ok=True)
    for w in (ROOT / ".whl").glob("*.whl"):
        if w.name.split("-")[0].lower() in SMALL:
            shutil.copy2(w, small / w.name)
    print(f"{out}: {kept} files, {out.stat().st_size / 2**20:.1f} MiB; {small}: "
          f"{sorted(x.name for x in small.glob('*.whl'))}")


if __name__ == "__main__":
    main()
