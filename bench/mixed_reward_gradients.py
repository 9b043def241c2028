"""How hard each mixed-reward term (paper 004, Eq. 13-15) pulls on the student's x0, at the configs' weights.

For a batch of videos from the undistilled 4-step sampler of the shipped flow teacher (what a TDM student starts
from), the norm of d(weight * L)/d x0 of every term of ``--config`` (its ``spatial_rewards`` on the first / middle /
last frame, its ``temporal_reward`` on the clip, at its ``beta_spatial`` / ``beta_temporal``), each in pixel form
(through the Shapes decoder) and, with ``--lrm_dir``, in latent form (the LRMs of bench/distill_shapes_ablation.py
--fit_lrms_only, one folder per reward). With the spread of each gold across the batch, it says whether a term can
move its gold at all in a few hundred steps.

    python bench/mixed_reward_gradients.py --lrm_dir runs/tdm/lrms --beta_temporal 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    from distill.models import load_shapes_teacher
    from distill.reward import PixelReward, spatial_loss, temporal_loss
    from distill.samplers import student_sample
    from distill.trainer import DistillConfig
    from eval.frechet import real_shapes
    from lrm.config import load_config
    from lrm.latent_space import VAE
    from lrm.text import TextEncoder
    from reward_adapters import create_reward

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/distill_shapes_ablation_tdm_gan_mixed_pixel.yaml"),
                    help="a mixed-pixel-reward distill config: its rewards and weights")
    ap.add_argument("--lrm_dir", default=None, help="folder with one LatentReward per reward of --config")
    ap.add_argument("--beta_spatial", type=float, default=None, help="instead of the config's")
    ap.add_argument("--beta_temporal", type=float, default=None, help="instead of the config's")
    ap.add_argument("--n", type=int, default=16, help="videos (captions of real Shapes videos, seed 0)")
    args = ap.parse_args(argv)
    cfg = load_config(DistillConfig, args.config)
    (spatial,), temporal = cfg.spatial_rewards, cfg.temporal_reward
    b_s = cfg.beta_spatial if args.beta_spatial is None else args.beta_spatial
    b_t = cfg.beta_temporal if args.beta_temporal is None else args.beta_temporal

    torch.manual_seed(0)
    vae, teacher = VAE.shapes(), load_shapes_teacher("video-flow")
    real_px, caps = real_shapes(args.n, 2, 16)
    emb = TextEncoder("all-MiniLM-L6-v2")(list(caps))
    with torch.no_grad():
        x0 = student_sample(teacher, torch.randn(args.n, 16, 4, 8, 8), emb.tokens, emb.mask)
        pixels = vae.decode(x0)
    r_s, r_t = create_reward(spatial), create_reward(temporal)
    spread_s, spread_t = create_reward(spatial, frames="first-middle-last")(pixels, caps).std(), r_t(pixels, caps).std()
    print(f"gold spread over the {args.n} videos (std): {spatial} {spread_s:.4g}, {temporal} {spread_t:.4g}")
    terms = {"spatial, pixel": (b_s, lambda x: spatial_loss(x, r_iq=PixelReward(r_s, vae))[0]),
             "temporal, pixel": (b_t, lambda x: temporal_loss(x, PixelReward(r_t, vae))[0])}
    if args.lrm_dir:
        from latent_rewards import LatentReward

        lrm_s, lrm_t = (LatentReward.from_pretrained(Path(args.lrm_dir) / k) for k in (spatial, temporal))
        terms["spatial, latent"] = (b_s, lambda x: spatial_loss(x, r_iq=lrm_s)[0])
        terms["temporal, latent"] = (b_t, lambda x: temporal_loss(x, lrm_t)[0])
    print("| term | weight | weighted loss | norm of d(weight L)/d x0 |\n| --- | --- | --- | --- |")
    for name, (w, loss_fn) in terms.items():
        x = x0.clone().requires_grad_(True)
        loss = w * loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
        print(f"| {name} | {w:g} | {loss.item():+.4f} | {g.norm().item():.3e} |")

if __name__ == "__main__":
    main()
