"""``lrm rewards list`` and ``lrm rewards score`` (a folder of images/videos, or Shapes samples)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _list(ns: argparse.Namespace) -> None:
    from reward_adapters.base import REWARDS, list_rewards

    names = list_rewards(ns.pattern)
    width = max((len(n) for n in names), default=10)
    for n in names:
        f = REWARDS._factories[n]
        mod = getattr(f, "modality", "")
        print(f"{n:<{width}}  {mod:<10}  {REWARDS.describe(n)}")


def _parse_options(items: list[str]) -> dict:
    opts = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--option expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def load_folder(folder: Path, prompt: str | None):
    """Images (PNG/JPEG/...) or videos (.npz with ``frames`` uint8 (T, H, W, 3)) plus their prompts.

    Prompts come from ``prompts.json`` in the folder (a list in sorted file order, or {filename: prompt}),
    or ``prompt`` for every file.
    """
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS + (".npz",))
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTS)}) or .npz videos in {folder}")
    items = []
    for p in files:
        if p.suffix == ".npz":
            a = np.load(p)["frames"]  # (T, H, W, 3) uint8
            items.append(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)
        else:
            a = np.asarray(Image.open(p).convert("RGB"))
            items.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255)
    prompts = None
    pj = folder / "prompts.json"
    if pj.is_file():
        data = json.loads(pj.read_text())
        prompts = [data[p.name] for p in files] if isinstance(data, dict) else list(data)
        if len(prompts) != len(files):
            raise SystemExit(f"{pj} has {len(prompts)} prompts for {len(files)} files")
    elif prompt is not None:
        prompts = [prompt] * len(files)
    return [p.name for p in files], items, prompts


def _score(ns: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from lrm.io import write_json
    from lrm.run import resolve_device
    from reward_adapters.base import create_reward

    opts = _parse_options(ns.option)
    opts.setdefault("device", str(resolve_device(ns.device)))
    reward = create_reward(ns.reward, **opts)
    if ns.shapes:
        from shapes import ShapesWorld

        world = ShapesWorld(ns.image_size, ns.num_frames or None, ns.seed)
        pixels, prompts, _ = world.batch(range(ns.shapes))
        names, items = [f"shapes-{i}" for i in range(ns.shapes)], list(pixels)
    elif ns.input:
        names, items, prompts = load_folder(Path(ns.input), ns.prompt)
    else:
        raise SystemExit("give --input FOLDER or --shapes N")
    scores = [float("nan")] * len(items)
    # Batch items of equal shape together.
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault(tuple(x.shape), []).append(i)
    bar = tqdm(total=len(items), desc=f"scoring {reward.name}", unit="item")
    for idx in groups.values():
        for s in range(0, len(idx), ns.batch_size):
            chunk = idx[s:s + ns.batch_size]
            x = torch.stack([items[i] for i in chunk])
            p = None if prompts is None else [prompts[i] for i in chunk]
            with torch.no_grad():
                out = reward(x, p).tolist()
            for i, v in zip(chunk, out):
                scores[i] = v
            bar.update(len(chunk))
    bar.close()
    t = torch.tensor(scores)
    print(f"{reward.name} ({reward.version}): n={len(scores)} mean={t.nanmean():.4f} "
          f"min={t.min():.4f} max={t.max():.4f}")
    if ns.out:
        write_json(ns.out, {"reward": reward.info(), "scores": dict(zip(names, scores)),
                            "prompts": prompts})
        print(f"wrote {ns.out}")


def register(sub: argparse._SubParsersAction) -> None:
    from lrm.cli import add_command

    p = sub.add_parser("rewards", help="pixel rewards: list them, score images/videos")
    s = p.add_subparsers(dest="rewards_command", metavar="SUBCOMMAND")
    add_command(s, "list", _list, "list registered rewards",
                lambda a: a.add_argument("pattern", nargs="?", default="*", help="glob on reward names"))

    def score_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("--reward", required=True, help="registered reward name (see `lrm rewards list`)")
        a.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="reward option (JSON value), repeatable: --option frames=4 --option weights=/path")
        a.add_argument("--input", help="folder of images / .npz videos (+ optional prompts.json)")
        a.add_argument("--prompt", help="one prompt for every file of --input")
        a.add_argument("--shapes", type=int, default=0, help="score this many Shapes samples instead")
        a.add_argument("--image-size", type=int, default=32, help="Shapes image size (32 or 64)")
        a.add_argument("--num-frames", type=int, default=0, help="Shapes: frames per video (0 = images)")
        a.add_argument("--seed", type=int, default=0, help="Shapes world seed")
        a.add_argument("--batch-size", type=int, default=64, help="items per reward call")
        a.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        a.add_argument("--out", help="JSON file for the scores")

    add_command(s, "score", _score, "score a folder of images/videos or Shapes samples with a reward", score_args)
    p.set_defaults(_handler=lambda ns, o: p.print_help(), _takes_overrides=False)
