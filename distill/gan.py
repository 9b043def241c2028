"""Adversarial term on frozen-teacher features (paper 004 §3.3, Eq. 11-12; after LADD, Sauer et al. 2024).

1. Noise real latents x0_gt and the student's x0_hat to tau with the teacher's schedule (x_tau = a x0 + b eps).
2. Run the frozen teacher F_phi on x_tau with the sample's caption; forward hooks keep some block outputs and the
   forward stops after the deepest requested block (encoder features cost about half a teacher call).
3. D_xi: per block a head conv 3x3 -> GroupNorm -> FiLM(pooled caption, tau) -> SiLU -> conv 1x1, a logit per position
   (Conv3d over (T, h, w) on UNet3D features, so a video head also judges motion).
4. Hinge: L_D = mean_heads E[ReLU(1 - D(real))] + E[ReLU(1 + D(fake))] (Eq. 12), L_G = -mean_heads E[D(fake)] (Eq. 11),
   E over samples and positions; the mean over heads keeps the scale independent of the number of blocks.
Blocks ("down.i", "mid", "up.i" of a diffusers UNet2D/3DConditionModel): every down block and the mid block by default,
multi-scale encoder features (LADD puts heads on several teacher blocks) that depend on x_tau alone; the up blocks mix
in skip connections and turn into the denoiser's own prediction, and stopping at "mid" halves the cost.
Update ratio: one D step per G step (LADD; the TDM code's 1:1 fake-score updates), AdamW betas (0, 0.95) at the fake
score's lr: the heads are small and read frozen features, so extra D steps saturate the hinge (zero loss, no signal
for G) sooner than they help. DMD2's variant (softplus head on the fake-score bottleneck) is in PAPER_NOTES §8.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.objective import ObjectiveTerm, StepContext
from distill.vsd import sample_timesteps
from lrm.config import ConfigError


class _Stop(Exception):
    """Raised by the deepest requested block's hook: skips the rest of the teacher's forward."""


def _unet(teacher: Any) -> nn.Module:
    model = getattr(teacher, "model", teacher)
    if not hasattr(model, "down_blocks") or not hasattr(model.config, "block_out_channels"):
        raise ValueError(f"the adversarial term needs a UNet2D/3DConditionModel teacher, got {type(model).__name__}")
    return model


def block_order(model: nn.Module) -> list[str]:
    """Block names in execution order: down.0, ..., mid, up.0, ..."""
    mid = ["mid"] if getattr(model, "mid_block", None) is not None else []
    return [f"down.{i}" for i in range(len(model.down_blocks))] + mid + [f"up.{i}" for i in range(len(model.up_blocks))]


def default_blocks(teacher: Any) -> list[str]:
    """Every down block and the mid block (see the module docstring)."""
    return [n for n in block_order(_unet(teacher)) if not n.startswith("up.")]


def _block(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    chans = list(model.config.block_out_channels)
    if name not in block_order(model):
        raise ValueError(f"unknown block {name!r}; valid: {block_order(model)}")
    if name == "mid":
        return model.mid_block, chans[-1]
    i = int(name.split(".")[1])
    return (model.down_blocks[i], chans[i]) if name.startswith("down") else (model.up_blocks[i], chans[::-1][i])


def teacher_features(teacher: Any, x_t: torch.Tensor, t: torch.Tensor, text_tokens: torch.Tensor,
                     text_mask: torch.Tensor | None, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of ``blocks`` of the teacher's UNet on ``x_t``: ``(B, C, h, w)``, video ``(B, C, T, h, w)``.
    Gradients flow to ``x_t`` unless called under ``torch.no_grad()``."""
    model = _unet(teacher)
    mods = [_block(model, n)[0] for n in blocks]  # validates the names
    last = max(blocks, key=block_order(model).index)
    feats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(module, inputs, output):
            feats[name] = output[0] if isinstance(output, tuple) else output
            if name == last:
                raise _Stop
        return fn

    handles = [m.register_forward_hook(hook(n)) for m, n in zip(mods, blocks)]
    try:
        teacher(x_t, t, text_tokens, text_mask)
    except _Stop:  # the deepest requested block is done
        pass
    finally:
        for h in handles:
            h.remove()
    if getattr(teacher, "is_video", False):  # UNet3D blocks see (B*T, C, h, w)
        B, T = x_t.shape[:2]
        feats = {n: f.reshape(B, T, *f.shape[1:]).transpose(1, 2) for n, f in feats.items()}
    return feats


class _Head(nn.Module):
    def __init__(self, channels: int, hidden: int, cond_dim: int, video: bool):
        super().__init__()
        conv = nn.Conv3d if video else nn.Conv2d
        self.conv = conv(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(math.gcd(32, hidden), hidden)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.out = conv(hidden, 1, 1)

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(f.to(self.conv.weight.dtype)))
        scale, shift = self.film(cond).chunk(2, dim=1)
        shape = (h.shape[0], h.shape[1]) + (1,) * (h.dim() - 2)
        h = h * (1 + scale.reshape(shape)) + shift.reshape(shape)
        return self.out(F.silu(h)).flatten(1)  # (B, positions)


class Discriminator(nn.Module):
    """D_xi: the heads only (the frozen teacher is passed to the loss functions, never held here)."""

    def __init__(self, channels: dict[str, int], text_dim: int, video: bool = False, hidden: int = 64,
                 time_dim: int = 32):
        super().__init__()
        self.blocks, self.time_dim = list(channels), 2 * (int(time_dim) // 2)
        self.heads = nn.ModuleDict({n.replace(".", "_"): _Head(c, hidden, text_dim + self.time_dim, video)
                                    for n, c in channels.items()})

    @classmethod
    def for_teacher(cls, teacher: Any, blocks: Sequence[str] | None = None, hidden: int = 64,
                    time_dim: int = 32) -> "Discriminator":
        """Heads sized from the UNet config (``block_out_channels``, ``cross_attention_dim``)."""
        model = _unet(teacher)
        names = list(blocks) if blocks is not None else default_blocks(teacher)
        return cls({n: _block(model, n)[1] for n in names}, int(model.config.cross_attention_dim),
                   video=getattr(teacher, "is_video", False), hidden=hidden, time_dim=time_dim)

    def cond(self, t: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """[masked-mean caption, sinusoidal(tau)], ``(B, D + time_dim)``."""
        m = torch.ones(text_tokens.shape[:2], device=text_tokens.device) if text_mask is None else text_mask.float()
        pooled = (text_tokens.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=pooled.device) / half)
        arg = t.to(pooled.device).float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([pooled, arg.sin(), arg.cos()], dim=1)

    def forward(self, features: dict[str, torch.Tensor], t: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None) -> list[torch.Tensor]:
        cond = self.cond(t, text_tokens, text_mask)
        return [self.heads[n.replace(".", "_")](features[n], cond) for n in self.blocks]


def hinge_d_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 12: mean over heads of mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake))."""
    terms = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 11: -mean over heads of mean D(fake)."""
    return -torch.stack([f.float().mean() for f in fake_logits]).mean()


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    params = [p.requires_grad_(False) for p in module.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _noised(teacher: Any, x0: torch.Tensor, t: torch.Tensor | None, noise: torch.Tensor | None):
    sch = teacher.schedule
    t = sample_timesteps(x0.shape[0], sch.num_train_timesteps, device=x0.device) if t is None else t
    return sch.add_noise(x0, torch.randn_like(x0) if noise is None else noise, t), t


def discriminator_loss(disc: Discriminator, teacher: Any, x_real: torch.Tensor, real_tokens: torch.Tensor,
                       real_mask: torch.Tensor | None, x_fake: torch.Tensor, fake_tokens: torch.Tensor,
                       fake_mask: torch.Tensor | None, t_real: torch.Tensor | None = None,
                       t_fake: torch.Tensor | None = None, noise_real: torch.Tensor | None = None,
                       noise_fake: torch.Tensor | None = None, autocast: Callable[[], Any] | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D on clean real latents (their captions) and student samples (theirs); tau ~ U[0.02 T, 0.98 T] unless given.
    Teacher features run without grad: only the heads get gradients."""
    with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
        xr, tr = _noised(teacher, x_real.detach(), t_real, noise_real)
        xf, tf = _noised(teacher, x_fake.detach(), t_fake, noise_fake)
        fr = teacher_features(teacher, xr, tr, real_tokens, real_mask, disc.blocks)
        ff = teacher_features(teacher, xf, tf, fake_tokens, fake_mask, disc.blocks)
    real, fake = disc(fr, tr, real_tokens, real_mask), disc(ff, tf, fake_tokens, fake_mask)
    mean = lambda logits: float(torch.stack([v.detach().float().mean() for v in logits]).mean())  # noqa: E731
    return hinge_d_loss(real, fake), {"d_real": mean(real), "d_fake": mean(fake)}


def generator_adv_loss(disc: Discriminator, teacher: Any, x_fake: torch.Tensor, text_tokens: torch.Tensor,
                       text_mask: torch.Tensor | None, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_G for the graded student sample ``x_fake``: the gradient goes through the frozen teacher's features into
    ``x_fake`` only (the heads are held frozen during the call; pass the unwrapped module, not a DDP wrapper)."""
    if any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen for the adversarial term: call teacher.requires_grad_(False)")
    with (autocast() if autocast is not None else nullcontext()):
        xf, tf = _noised(teacher, x_fake, t, noise)
        feats = teacher_features(teacher, xf, tf, text_tokens, text_mask, disc.blocks)
        with _frozen(disc):
            fake = disc(feats, tf, text_tokens, text_mask)
    loss = hinge_g_loss(fake)
    return loss, {"g_adv_d_fake": float(-loss.detach())}



class GANTerm(ObjectiveTerm):
    """L_gen (Eq. 11) on the backward-simulated x_hat; its own update: one hinge L_D step (Eq. 12) of the heads on
    the data latents (real) and the student samples (fake) of the generator step, AdamW betas (0, 0.95)."""

    name, needs_x_hat, needs_teacher, single_process = "gan", True, True, True

    def __init__(self, weight: float = 0.5, lr: float = 2e-5):
        super().__init__(weight)
        self.lr = float(lr)
        self.disc = self.opt = None

    def setup(self, trainer: Any) -> None:
        if trainer.lora is not None:
            raise ConfigError("use_gan with lora_rank > 0 is not supported (the discriminator's feature hooks on "
                              "the shared base would see every role's calls); set one of them off")
        if trainer.data.latents is None:
            raise ConfigError("the gan term needs real data latents (a data_cache, or DistillData latents)")
        self.disc = Discriminator.for_teacher(trainer.teacher).to(trainer.device)

    def setup_optimizers(self, trainer: Any) -> None:
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=self.lr, betas=(0.0, 0.95))

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        tr = ctx.trainer
        loss, _ = generator_adv_loss(self.disc, tr.teacher, ctx.x_hat, ctx.tok, ctx.mask, autocast=tr.autocast)
        return loss, {"loss_gan": float(loss.detach())}

    def update(self, trainer: Any) -> dict[str, Any]:
        self.disc.train()
        self.opt.zero_grad(set_to_none=True)
        last = [c for c in trainer.last if c.x_hat is not None and c.batch.latents is not None]
        total = 0.0
        for c in last:
            b = c.batch
            loss, _ = discriminator_loss(self.disc, trainer.teacher, b.latents, b.text_tokens, b.text_mask,
                                         c.x_hat, b.text_tokens, b.text_mask, autocast=trainer.autocast)
            (loss / len(last)).backward()
            total += float(loss.detach()) / len(last)
        gn = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), trainer.config.max_grad_norm or float("inf"))
        if trainer.guard.check(gn, "discriminator loss / gradient", trainer.step + 1, key="disc"):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss_disc": total}

    def modules(self) -> dict[str, Any]:
        return {"disc": self.disc}

    def optimizers(self) -> dict[str, Any]:
        return {"disc": self.opt}
