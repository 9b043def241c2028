"""Generators that need no trained diffusion model: the Shapes data distribution as a reference generator.

``ShapesDataGenerator`` renders a real Shapes sample for each prompt (the attributes the caption names, the
rest drawn from the sample's seed), optionally perturbs it, and encodes it with the VAE. It follows the
generator protocol of ``eval.evaluate`` and is the "perfect model" reference point for every metric, and
(with ``pixel_noise`` > 0) a controllable sequence of degraded generators for testing studies end to end.
"""

from __future__ import annotations

import numpy as np
import torch

from shapes.world import BACKGROUNDS, COLORS, DIRECTIONS, POSITIONS, SHAPES, SPEEDS, ShapesWorld, parse_caption


class ShapesDataGenerator:
    """``gen(noise, text_tokens, text_mask, prompts=..., seeds=...) -> latents`` from rendered Shapes samples.

    Args:
        vae: the latent space's VAE (``VAE.shapes()``); its ``encode`` maps pixels to latents.
        num_frames: None for images, else frames per video.
        image_size: 32 or 64.
        pixel_noise: std of Gaussian noise added to the pixels before encoding (then clamped to [0, 1]);
            0 = the data distribution itself.
        max_count: largest number of shapes when a prompt does not name a count.
    """

    nfe = None  # no network evaluations: rendering + VAE encoding only

    def __init__(self, vae, num_frames: int | None = None, image_size: int = 32, pixel_noise: float = 0.0,
                 max_count: int = 3):
        if pixel_noise < 0:
            raise ValueError(f"pixel_noise must be >= 0, got {pixel_noise}")
        self.vae = vae
        self.world = ShapesWorld(image_size=image_size, num_frames=num_frames, max_count=max_count)
        self.pixel_noise = float(pixel_noise)
        self.max_count = max_count

    def render(self, prompt: str, seed: int) -> np.ndarray:
        """Pixels ``(3, H, W)`` / ``(T, 3, H, W)`` of a sample that matches ``prompt``'s named attributes."""
        rng = np.random.default_rng([int(seed), 2027])
        a = parse_caption(prompt)
        shape = a["shape"] or str(rng.choice(SHAPES))
        color = a["color"] or str(rng.choice(list(COLORS)))
        background = a["background"] or str(rng.choice(list(BACKGROUNDS)))
        count = a["count"] or int(rng.integers(1, self.max_count + 1))
        position = (a["position"] or str(rng.choice(POSITIONS))) if count == 1 else None
        video = self.world.is_video
        direction = (a["direction"] or str(rng.choice(DIRECTIONS))) if video else None
        speed = (a["speed"] or str(rng.choice(SPEEDS))) if video else None
        size = float(rng.uniform(0.13, 0.17) if count == 1 else rng.uniform(0.09, 0.11))
        centers = self.world._place(rng, count, position, size, direction, speed)  # same placement rules as the world
        pixels = self.world.render(shape, color, background, centers, size, direction, speed)
        if self.pixel_noise > 0:
            pixels = np.clip(pixels + self.pixel_noise * rng.standard_normal(pixels.shape).astype(np.float32), 0, 1)
        return pixels

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, text_tokens=None, text_mask=None, prompts: list[str] | None = None,
                 seeds: list[int] | None = None) -> torch.Tensor:
        if prompts is None or seeds is None:
            raise ValueError("ShapesDataGenerator needs prompts= and seeds= (eval.evaluate passes them)")
        if len(prompts) != noise.shape[0] or len(seeds) != noise.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds for a batch of {noise.shape[0]}")
        pixels = torch.from_numpy(np.stack([self.render(p, s) for p, s in zip(prompts, seeds)]))
        return self.vae.encode(pixels.to(self.vae.device)).to(noise.device)  # (B, C, h, w) / (B, T, C, h, w)

    def __repr__(self) -> str:
        return f"ShapesDataGenerator(video={self.world.is_video}, pixel_noise={self.pixel_noise})"


def is_shapes_caption(prompt: str) -> bool:
    """Whether ``prompt`` reads as a Shapes world caption: it names a Shapes shape, a color and a background
    (``shapes.world.parse_caption``), as every ``make_caption`` phrasing does."""
    a = parse_caption(prompt)
    return a["shape"] is not None and a["color"] is not None and a["background"] is not None


def are_shapes_captions(prompts: list[str]) -> bool:
    """Every prompt is a Shapes caption: the Shapes attribute rewards (shapes-adherence, accuracy) apply."""
    return bool(prompts) and all(is_shapes_caption(p) for p in prompts)


def shapes_prompts(n: int, num_frames: int | None = None, seed: int = 0, start: int = 0) -> list[str]:
    """``n`` captions of the Shapes world (held-out seeds give a held-out prompt set)."""
    world = ShapesWorld(num_frames=num_frames, seed=seed)
    return [world.sample(i).caption for i in range(start, start + n)]


# ---- diffusion samplers over a distill.Denoiser ---------------------------------------------------------
class DenoiserGenerator:
    """A sampler closure over a ``distill`` ``Denoiser`` (teacher or student), in the generator protocol.

    Args:
        denoiser: the model to sample from.
        sampler: "ddim" (deterministic DDIM, ``steps`` trailing steps), "student" (k-step consistency sampler
            at ``timesteps``, e.g. DOLLAR's [999, 749, 499, 249]) or "stochastic" (DDIM(eta) posterior chain,
            the DDPO sampler; with a ``reference`` it reports the exact chain KL per sample).
        steps: DDIM steps ("ddim" / "stochastic" without ``timesteps``).
        timesteps: explicit timesteps (any order; used descending). Default for "student": 999, 749, 499, 249.
        guidance_scale: Imagen-form CFG scale s (None = conditional only); s != 1 costs 2 evaluations per step.
        eta: DDIM eta of the stochastic sampler (1 = DDPM posterior).
        reference: reference ``Denoiser`` for the stochastic chain KL: sum_t ||mu - mu_ref||^2 / (2 sigma_t^2) with
            both means at the sampled states (``eval.kl.gaussian_chain_kl``), final step at t = 0.
        text_encoder: the captions' encoder (``lrm.text.PipelineText``) for a denoiser that takes pooled text (FLUX /
            SD3 / HunyuanVideo: ``denoiser.null_pooled`` is set): the pooled vectors of the ``prompts`` the evaluation
            passes are computed with it when the call gives no ``text_pooled``.
    Noise for the student's re-noising and the stochastic chain comes from a generator seeded by the batch's
    sample seeds, so a run is reproducible for a fixed batch size.
    """

    def __init__(self, denoiser, sampler: str = "ddim", steps: int = 50, timesteps: list[int] | None = None,
                 guidance_scale: float | None = None, eta: float = 1.0, reference=None, text_encoder=None):
        if reference is not None and sampler != "stochastic":
            raise ValueError("a reference denoiser gives a chain KL only for sampler='stochastic'; for deterministic "
                             "samplers pass the reference as a generator to evaluate(reference=...) instead")
        from distill.inference import sampler_timesteps

        self.denoiser, self.sampler, self.reference = denoiser, sampler, reference
        self.text_encoder = text_encoder
        self.guidance_scale, self.eta = guidance_scale, eta
        # the student sampler takes its timesteps (DOLLAR's four by default), not the DDIM step count
        self.timesteps = sampler_timesteps(denoiser, sampler, None if sampler == "student" else steps, timesteps)
        cfg = guidance_scale is not None and guidance_scale != 1
        self.nfe = len(self.timesteps) * (2 if cfg else 1)

    def _generator(self, seeds, device) -> torch.Generator:
        s = int(np.random.SeedSequence([int(x) for x in (seeds or [0])]).generate_state(1)[0])
        return torch.Generator(device=device).manual_seed(s)

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, text_tokens=None, text_mask=None, seeds: list[int] | None = None,
                 text_pooled: torch.Tensor | None = None, prompts: list[str] | None = None):
        """``text_pooled``: the captions' pooled text (FLUX / SD3 / HunyuanVideo), passed to every network call;
        None: ``text_encoder(prompts).pooled`` when the denoiser takes pooled text and both are given."""
        from distill.data import takes_pooled
        from distill.inference import sample

        if text_pooled is None and takes_pooled(self.denoiser):
            if self.text_encoder is None or prompts is None:
                raise ValueError(f"{type(self.denoiser.model).__name__} takes pooled text: pass text_pooled=, or "
                                 "build DenoiserGenerator(..., text_encoder=PipelineText) and call it with prompts=")
            text_pooled = self.text_encoder(list(prompts)).pooled.to(noise.device)
        from distill.samplers import step_mean, stochastic_sample

        g = self._generator(seeds, noise.device)
        if self.sampler != "stochastic":
            return sample(self.denoiser, noise, text_tokens, text_mask, sampler=self.sampler,
                          timesteps=self.timesteps, guidance_scale=self.guidance_scale, generator=g,
                          pooled=text_pooled)
        traj = stochastic_sample(self.denoiser, noise, text_tokens, text_mask, self.timesteps, eta=self.eta,
                                 guidance_scale=self.guidance_scale, generator=g, grad_steps=0, pooled=text_pooled)
        out = {"latents": traj.x0, "nfe": self.nfe}
        if self.reference is not None:
            from eval.kl import gaussian_chain_kl

            ref_means = [step_mean(self.reference, x, int(t), int(s), text_tokens, text_mask, self.eta,
                                   self.guidance_scale, text_pooled)[0]
                         for x, t, s in zip(traj.latents[:-1], traj.timesteps, traj.prev_timesteps)]
            out["kl"] = gaussian_chain_kl(traj.means, ref_means, traj.stds)
        return out

    def __repr__(self) -> str:
        return f"DenoiserGenerator(sampler={self.sampler!r}, timesteps={self.timesteps}, nfe={self.nfe})"
