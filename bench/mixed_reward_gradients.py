"""How hard each mixed-reward term (paper 004, Eq. 13-15) pulls on the student's x0, at the configs' weights.

For a batch of videos from the undistilled 4-step sampler of the shipped flow teacher (what a TDM student starts
from), the norm of d(weight * L)/d x0 of every term: the spatial term (colorfulness on the first / middle / last
frame) and the temporal term (temporal-flickering-float), each in pixel form (through the Shapes decoder) and, with
``--lrm_dir``, in latent form (the LRMs of bench/distill_shapes_ablation.py --fit_lrms_only). With the spread of
each gold across the batch, it says whether a term can move its gold at all in a few hundred steps.

    python bench/mixed_reward_gradients.py --lrm_dir runs/tdm/lrms --beta_spatial 0.01 --beta_temporal 1.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    from distill.models import load_shapes_teacher
    from distill.reward import PixelReward, spatial_loss, temporal_loss
    from distill.samplers import student_sample
    from eval.frechet import real_shapes
    from lrm.latent_space import VAE
    from lrm.text import TextEncoder
    from reward_adapters import create_reward

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrm_dir", default=None, help="folder with colorfulness/ and temporal-flickering-float/ LRMs")
    ap.add_argument("--beta_spatial", type=float, default=0.01)
    ap.add_argument("--beta_temporal", type=float, default=1.5)
    ap.add_argument("--n", type=int, default=16, help="videos (captions of real Shapes videos, seed 0)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    vae, teacher = VAE.shapes(), load_shapes_teacher("video-flow")
    real_px, caps = real_shapes(args.n, 2, 16)
    emb = TextEncoder("all-MiniLM-L6-v2")(list(caps))
    with torch.no_grad():
        x0 = student_sample(teacher, torch.randn(args.n, 16, 4, 8, 8), emb.tokens, emb.mask)
        pixels = vae.decode(x0)
    color = create_reward("colorfulness", frames="first-middle-last")
    flicker = create_reward("temporal-flickering-float")
    print(f"gold spread over the {args.n} videos (std): colorfulness {color(pixels, caps).std():.4g}, "
          f"temporal-flickering-float {flicker(pixels, caps).std():.4g}")
    terms = {"spatial, pixel": (args.beta_spatial, lambda x: spatial_loss(
                 x, r_iq=PixelReward(create_reward("colorfulness"), vae))[0]),
             "temporal, pixel": (args.beta_temporal, lambda x: temporal_loss(
                 x, PixelReward(create_reward("temporal-flickering-float"), vae))[0])}
    if args.lrm_dir:
        from latent_rewards import LatentReward

        lrm = {k: LatentReward.from_pretrained(Path(args.lrm_dir) / k)
               for k in ("colorfulness", "temporal-flickering-float")}
        terms["spatial, latent"] = (args.beta_spatial, lambda x: spatial_loss(x, r_iq=lrm["colorfulness"])[0])
        terms["temporal, latent"] = (args.beta_temporal,
                                     lambda x: temporal_loss(x, lrm["temporal-flickering-float"])[0])
    print("| term | weight | weighted loss | norm of d(weight L)/d x0 |\n| --- | --- | --- | --- |")
    for name, (w, loss_fn) in terms.items():
        x = x0.clone().requires_grad_(True)
        loss = w * loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
        print(f"| {name} | {w:g} | {loss.item():+.4f} | {g.norm().item():.3e} |")


if __name__ == "__main__":
    main()
