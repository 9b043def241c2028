"""Write ``--num`` captioned Shapes images as PNG files + ``captions.csv`` (columns file, caption): the folder layout
``lrm cache build`` reads with ``source.type: folder``, as a user's own captioned images would be.

    python bench/device/make_image_folder.py --out runs/sd15/images --num 512 [--size 64]

The 64-px renders are upscaled by the cache build (``source.resize: [512, 512]``); this stands in for real images in
the SD-size workflow (bench/sd15_workflow.sh), where the rewards and models, not the pictures, are under test.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> Path:
    from shapes import ShapesWorld

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--size", type=int, default=64, choices=(32, 64))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(image_size=a.size, seed=a.seed)
    rows = []
    for s in range(0, a.num, 256):
        pixels, captions, _ = world.batch(list(range(s, min(a.num, s + 256))))
        for i, (img, cap) in enumerate(zip(pixels, captions)):
            name = f"{s + i:06d}.png"
            arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(out / name)
            rows.append({"file": name, "caption": cap})
    with open(out / "captions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "caption"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} images + captions.csv to {out}")
    return out


if __name__ == "__main__":
    main()
