"""DDPO_SF baseline (DOLLAR supp. §8.6, Alg. 2) with the ddpo-pytorch options.

Policy-gradient fine-tuning of the student on a black-box pixel reward:

1. sample with the stochastic posterior along the student's timesteps ([999, 749, 499, 249] -> 0, DDIM eta = 1,
   DOLLAR Eq. 25), recording every transition (x_t, x_{t_prev}) and its log-prob (Eq. 26), without autograd. The
   log-prob is the MEAN of the per-element Gaussian log-density over the latent (``reduction="mean"``), as in
   ddpo-pytorch and TRL: the PPO clip range 1e-4 is tuned for it (``"sum"``, the exact density, makes every
   log-ratio C*H*W times larger);
2. decode x0 and score it with the pixel reward (detached; optionally in a worker thread while the next sample
   batch is drawn);
3. advantages: rewards normalised per prompt (buffer of the last ``buffer_size`` rewards of that prompt once it
   holds ``min_count``; batch-global statistics before that, std + 1e-6) or globally (std + 1e-8), clipped to
   +-``adv_clip``;
4. for each inner epoch and train batch, re-evaluate log p_theta(x_{t_prev} | x_t) on the last ``grad_steps``
   transitions only (truncation: earlier steps carry no gradient) and take the PPO clipped objective
   ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, r = exp(logp - logp_old). With one inner epoch fully on-policy
   r = 1 and its gradient is REINFORCE's ``-A grad logp`` (DDPO_SF, Eq. in Alg. 2).

On a flow student (Wan, SD3, FLUX, HunyuanVideo) step 1 is the same DDIM(eta) chain written for ``x_t = a_t x0 +
b_t eps`` with a = 1 - s, b = s: exactly DDIM(eta) of the variance-preserving process ``x_t / sqrt(a^2 + b^2)`` with
``abar = a^2 / (a^2 + b^2)`` (``FlowSchedule.alphas_cumprod``), x0 / eps from the velocity output; eta = 1 gives
that process's DDPM posterior std. It is not Flow-GRPO's SDE sampler (another per-step noise level). The chain ends
at ``final_timestep`` (None: 0 on DDPM schedules, 1 on flow schedules, whose t = 0 carries no noise).

Formulas follow ddpo-pytorch (Black et al. 2023, ``ddpo_pytorch/stat_tracking.py``, ``train.py`` and
``diffusers_patch/ddim_with_logprob.py``) and TRL 0.11 (``DDPOTrainer.calculate_loss``); parity is tested in
tests/distill/test_ddpo_parity.py. Not taken from them: training on every timestep (here truncation to the last
``grad_steps``, DOLLAR) and CFG in the student (a distilled student samples without it).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from distill.data import DistillData
from distill.kl import chain_step_kl
from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import gaussian_log_prob, step_mean, stochastic_sample


class PerPromptStatTracker:
    """Per-prompt reward normalisation (ddpo-pytorch ``PerPromptStatTracker``).

    ``update(prompts, rewards)`` appends each reward to its prompt's buffer (the last ``buffer_size``) and returns
    ``(r - mean) / (std + 1e-6)`` with the prompt's buffer statistics once it holds ``min_count`` rewards, and the
    statistics of the whole batch before that.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        if min_count > buffer_size:
            raise ValueError(f"min_count ({min_count}) > buffer_size ({buffer_size}): a prompt's buffer could never "
                             "reach min_count; raise buffer_size or lower min_count")
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards) -> np.ndarray:
        prompts = list(prompts)
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(prompts) != r.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {r.shape[0]} rewards")
        adv = np.empty_like(r)
        g_mean, g_std = r.mean(), r.std()
        for p in dict.fromkeys(prompts):
            idx = np.array([i for i, q in enumerate(prompts) if q == p])
            buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = g_mean, g_std
            else:
                mean, std = float(np.mean(buf)), float(np.std(buf))
            adv[idx] = (r[idx] - mean) / (std + 1e-6)
        return adv

    def get_stats(self) -> dict[str, float]:
        lens = [len(v) for v in self.stats.values()]
        return {"num_prompts": len(lens), "mean_count": float(np.mean(lens)) if lens else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for exact resume)."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def global_advantages(rewards) -> np.ndarray:
    """``(r - mean) / (std + 1e-8)`` over the whole batch (ddpo-pytorch / TRL without per-prompt tracking)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    return (r - r.mean()) / (r.std() + 1e-8)


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4,
             adv_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate for one transition, all ``(B,)``; returns ``(loss, info)``.

    ``loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``, ``r = exp(logp - logp_old)``, ``A`` clipped to
    ``+-adv_clip``. info: ``approx_kl = 0.5 mean((logp - logp_old)^2)``, ``clipfrac`` (fraction with
    ``|r - 1| > eps``), ``ratio`` (mean). The defaults (eps = 1e-4, adv_clip = 5) are ddpo-pytorch's, tuned for
    element-MEAN log-probs (``reduction="mean"``).
    """
    # ddpo-pytorch scripts/train.py / TRL 0.11 DDPOTrainer.calculate_loss + loss
    adv = advantages.float().clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob.float() - old_log_prob.detach().float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    d = (log_prob.detach().float() - old_log_prob.detach().float())
    info = {"approx_kl": float(0.5 * (d ** 2).mean()), "clipfrac": float(((ratio.detach() - 1).abs() > clip_range)
                                                                        .float().mean()),
            "ratio": float(ratio.detach().mean())}
    return loss, info


def reinforce_loss(log_prob: torch.Tensor, advantages: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """DDPO_SF's score-function surrogate ``-mean(A logp)`` (gradient ``-E[A grad logp]``)."""
    return -(advantages.float().clamp(-adv_clip, adv_clip) * log_prob.float()).mean()


@dataclass
class DDPOSamples:
    """One sample batch of the stochastic chain. ``latents`` (B, K + 1, ...) = x_{t_0} ... x_{final};
    ``log_probs`` (B, K) under the sampling policy, reduced over the latent elements by ``log_prob_reduction``
    (``"mean"``: DDPO's convention; ``"sum"``: exact density); ``timesteps`` / ``prev_timesteps`` (K,) long."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor | None
    prompts: list[str]
    rewards: torch.Tensor | Future | None = None  # (B,) float32 CPU, or a Future of it
    log_prob_reduction: str = "mean"  # how ``log_probs`` were reduced; re-evaluation uses the same
    text_pooled: torch.Tensor | None = None  # (B, P) pooled text of FLUX / SD3 / HunyuanVideo captions

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[:, -1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @classmethod
    def from_trajectory(cls, traj, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                        prompts: list[str], text_pooled: torch.Tensor | None = None) -> "DDPOSamples":
        """Stack a ``samplers.SampleTrajectory`` (K + 1 latents) for re-evaluation."""
        return cls(torch.stack(traj.latents, 1), traj.log_probs.detach(), traj.timesteps, traj.prev_timesteps,
                   text_tokens, text_mask, list(prompts), log_prob_reduction=traj.log_prob_reduction,
                   text_pooled=text_pooled)

    def resolve_rewards(self) -> torch.Tensor:
        if isinstance(self.rewards, Future):
            self.rewards = self.rewards.result()
        if self.rewards is None:
            raise RuntimeError("this sample batch has no rewards yet")
        return torch.as_tensor(self.rewards, dtype=torch.float32).reshape(-1)

    def subset(self, idx: torch.Tensor) -> "DDPOSamples":
        dev = self.latents.device
        i = idx.to(dev)
        return DDPOSamples(self.latents[i], self.log_probs[i], self.timesteps, self.prev_timesteps,
                           self.text_tokens[i], None if self.text_mask is None else self.text_mask[i],
                           [self.prompts[j] for j in idx.tolist()], None, self.log_prob_reduction,
                           None if self.text_pooled is None else self.text_pooled[i])


@torch.no_grad()
def sample_chain(denoiser, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                 prompts: list[str], timesteps: Sequence[int], eta: float = 1.0, final_timestep: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 reduction: str = "mean", pooled: torch.Tensor | None = None) -> DDPOSamples:
    """Step 1: the stochastic posterior chain (Eq. 25-26) without autograd, stacked for re-evaluation; log-probs
    reduced over the latent elements by ``reduction`` (``"mean"``: ddpo-pytorch / TRL; ``"sum"``: exact density)."""
    traj = stochastic_sample(denoiser, noise, text_tokens, text_mask, list(timesteps), eta=eta,
                             guidance_scale=guidance_scale, generator=generator, grad_steps=0,
                             final_timestep=final_timestep, reduction=reduction, pooled=pooled)
    return DDPOSamples.from_trajectory(traj, text_tokens, text_mask, prompts, pooled)


def trained_step_indices(num_steps: int, grad_steps: int) -> list[int]:
    """Truncation: the indices of the last ``grad_steps`` transitions (DOLLAR: 2 of 4 -> t = 499, 249)."""
    if not 1 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [1, {num_steps}] (the chain has {num_steps} transitions), "
                         f"got {grad_steps}")
    return list(range(num_steps - grad_steps, num_steps))


def _reduction_of(samples: DDPOSamples, reduction: str | None) -> str:
    if reduction is None:
        return samples.log_prob_reduction
    if reduction != samples.log_prob_reduction:
        raise ValueError(f"reduction {reduction!r} differs from the {samples.log_prob_reduction!r} the samples' "
                         "log_probs were recorded with: the PPO ratio would compare two different quantities; "
                         "sample with the same reduction (or pass reduction=None)")
    return reduction


def transition_mean_log_prob(denoiser, samples: DDPOSamples, k: int, eta: float = 1.0,
                             guidance_scale: float | None = None,
                             reduction: str | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(log p_theta(x_{k+1} | x_k) (B,), mu_theta, sigma)`` of transition ``k`` under the current weights (the
    mean is what a per-step KL to a reference chain needs). ``reduction`` of the log-prob over the latent elements:
    ``None`` = the samples' ``log_prob_reduction`` (default ``"mean"``, DDPO's convention); ``"mean"`` / ``"sum"``
    must match it."""
    red = _reduction_of(samples, reduction)
    t, s = int(samples.timesteps[k]), int(samples.prev_timesteps[k])
    mu, sigma, _ = step_mean(denoiser, samples.latents[:, k], t, s, samples.text_tokens, samples.text_mask, eta,
                             guidance_scale, samples.text_pooled)
    return gaussian_log_prob(samples.latents[:, k + 1].detach(), mu, sigma, red), mu, sigma


def transition_log_prob(denoiser, samples: DDPOSamples, k: int, eta: float = 1.0,
                        guidance_scale: float | None = None, reduction: str | None = None) -> torch.Tensor:
    """log p_theta(x_{k+1} | x_k) of transition ``k`` of ``samples`` under the current weights, ``(B,)``
    (``reduction`` as in ``transition_mean_log_prob``)."""
    return transition_mean_log_prob(denoiser, samples, k, eta, guidance_scale, reduction)[0]


def concat_samples(batches: list[DDPOSamples]) -> DDPOSamples:
    """One ``DDPOSamples`` of several batches (captions padded to the longest)."""
    b0 = batches[0]
    L = max(b.text_tokens.shape[1] for b in batches)

    def pad(t, L):
        if t.shape[1] == L:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], L - t.shape[1], *t.shape[2:])], 1)

    return DDPOSamples(torch.cat([b.latents for b in batches]), torch.cat([b.log_probs for b in batches]),
                       b0.timesteps, b0.prev_timesteps, torch.cat([pad(b.text_tokens, L) for b in batches]),
                       None if b0.text_mask is None else torch.cat([pad(b.text_mask, L) for b in batches]),
                       [p for b in batches for p in b.prompts], torch.cat([b.resolve_rewards() for b in batches]),
                       log_prob_reduction=b0.log_prob_reduction,
                       text_pooled=None if b0.text_pooled is None else torch.cat([b.text_pooled for b in batches]))


class DDPOTerm(ObjectiveTerm):
    """Alg. 2 as a driver term: it owns the student update of a trainer step (steps 1-4 above: ``num_sample_batches``
    chains, rewards in a worker thread while the next batch samples, advantages, ``inner_epochs`` x (samples /
    ``train_batch_size``) PPO optimizer steps), adding the other terms' losses (VSD, CD) at each optimizer step and,
    with a ``kl`` term, its per-step Gaussian KL on the trained transitions (logged ``kl``: the full chain's)."""

    name, driver, single_process = "ddpo", True, True

    def __init__(self, reward: Any, sample_batch_size: int = 16, num_sample_batches: int = 2,
                 train_batch_size: int = 16, inner_epochs: int = 1, grad_steps: int = 2, eta: float = 1.0,
                 final_timestep: int | None = None, per_prompt_stats: bool = True, buffer_size: int = 16,
                 min_count: int = 16,
                 adv_clip: float = 5.0, clip_range: float = 1e-4, reduction: str = "mean", async_reward: bool = True):
        super().__init__(1.0)
        self.reward, self.sample_batch_size, self.num_sample_batches = reward, sample_batch_size, num_sample_batches
        self.train_batch_size, self.inner_epochs, self.grad_steps = train_batch_size, inner_epochs, grad_steps
        self.eta, self.final_timestep, self.per_prompt_stats = eta, final_timestep, per_prompt_stats
        self.adv_clip, self.clip_range, self.reduction = adv_clip, clip_range, reduction
        self.tracker = PerPromptStatTracker(buffer_size, min_count)
        self._exec = None
        if async_reward:
            from concurrent.futures import ThreadPoolExecutor

            self._exec = ThreadPoolExecutor(max_workers=1)

    def _reward_job(self, trainer: Any, latents: torch.Tensor, prompts: list[str]):
        pixels = trainer.vae.decode(latents.float(), clamp=True)  # decode on the main thread (GPU stream order)

        def job():
            with torch.no_grad():
                return self.reward(pixels, prompts).float().cpu()

        return self._exec.submit(job) if self._exec is not None else job()

    @torch.no_grad()
    def _sample(self, trainer: Any, kl_term: Any) -> tuple[DDPOSamples, torch.Tensor | None, torch.Tensor | None]:
        """One sample batch; with a KL term also pi_ref's means at every sampled state ``(B, K, ...)`` and the
        per-sample full-chain KL ``(B,)`` of the sampling policy."""
        b = trainer.sample_batch(self.sample_batch_size)
        tok, mask, pooled = b.text_tokens, b.text_mask, b.text_pooled
        with trainer.autocast():  # the stochastic chain, keeping the trajectory's per-step means
            traj = stochastic_sample(trainer.student, trainer.noise(self.sample_batch_size), tok, mask,
                                     list(trainer.timesteps), eta=self.eta, grad_steps=0,
                                     final_timestep=self.final_timestep, reduction=self.reduction, pooled=pooled)
        s = DDPOSamples.from_trajectory(traj, tok, mask, b.prompts, pooled)
        s.latents, s.log_probs = s.latents.float(), s.log_probs.float()
        s.rewards = self._reward_job(trainer, s.x0, b.prompts)
        if kl_term is None:
            return s, None, None
        with trainer.autocast():
            ref_means = [step_mean(kl_term.ref, x, int(t), int(sp), tok, mask, self.eta, pooled=pooled)[0].float()
                         for x, t, sp in zip(traj.latents[:-1], traj.timesteps, traj.prev_timesteps)]
        kl = sum(chain_step_kl(m, r, float(sd)) for m, r, sd in zip(traj.means, ref_means, traj.stds))
        return s, torch.stack(ref_means, 1), kl

    def run(self, trainer: Any) -> dict[str, Any]:
        kl_term = trainer.term("kl")
        others = [t for t in trainer.terms if not t.driver and t is not kl_term]
        trainer._set_lr()
        trainer.last = []
        # 1-2. sample batches; each batch's reward runs in the worker while the next one samples
        trainer.student.eval()
        batches, ref_means, chain_kl = [], [], []
        for _ in range(self.num_sample_batches):
            s, rm, kl = self._sample(trainer, kl_term)
            if rm is not None:
                ref_means.append(rm)
                chain_kl.append(kl)
            batches.append(s)
        trainer.student.train()
        rewards = torch.cat([b.resolve_rewards() for b in batches])  # (N,)
        if not trainer.guard.check(rewards, f"reward ({int((~torch.isfinite(rewards)).sum())} of {len(rewards)} "
                                   "samples)", trainer.step + 1):
            return {"gold_reward": float("nan"), "samples": len(rewards)}  # nothing reaches the tracker or weights
        prompts_all = [p for b in batches for p in b.prompts]
        # 3. advantages
        adv = (self.tracker.update(prompts_all, rewards.numpy()) if self.per_prompt_stats
               else global_advantages(rewards.numpy()))
        adv = torch.as_tensor(adv, dtype=torch.float32, device=trainer.device)
        samples = concat_samples(batches)
        N = len(samples)
        ref_all = torch.cat(ref_means) if ref_means else None  # (N, K, ...) reference means at the sampled states
        # 4. inner epochs of PPO on the last grad_steps transitions
        steps_idx = trained_step_indices(len(trainer.timesteps), self.grad_steps)
        infos: dict[str, list[float]] = {"approx_kl": [], "clipfrac": [], "loss": [], "grad_norm": []}
        logs: dict[str, Any] = {}
        data = trainer.data
        for _ in range(self.inner_epochs):
            perm = torch.randperm(N)
            for s0 in range(0, N, self.train_batch_size):
                idx = perm[s0:s0 + self.train_batch_size]
                sub = samples.subset(idx)
                a = adv[idx.to(trainer.device)]
                total = 0.0
                for k in steps_idx:
                    with trainer.autocast():
                        lp, mu, sigma = transition_mean_log_prob(trainer.student, sub, k, self.eta)
                    loss, info = ppo_loss(lp, sub.log_probs[:, k], a, self.clip_range, self.adv_clip)
                    loss = loss / len(steps_idx)
                    if ref_all is not None:  # per-step KL to the reference chain at the sampled state
                        loss = loss + kl_term.weight * chain_step_kl(mu, ref_all[idx.to(trainer.device), k],
                                                                     sigma).mean()
                    loss.backward()
                    total += float(loss.detach())
                    infos["approx_kl"].append(info["approx_kl"])
                    infos["clipfrac"].append(info["clipfrac"])
                if others:  # the other terms (VSD, CD) on this optimizer step's captions
                    lat = None if data.latents is None else data.latents[torch.randint(len(data), (len(idx),))]
                    ctx = StepContext(trainer, DistillData(lat, sub.text_tokens, sub.text_mask, sub.prompts,
                                                           sub.text_pooled))
                    l_d, dlogs = trainer.objective(ctx)
                    l_d.backward()
                    trainer.last.append(ctx.release())
                    total += float(l_d.detach())
                    logs.update({kk: v for kk, v in dlogs.items() if kk != "loss"})
                infos["loss"].append(total)
                infos["grad_norm"].append(trainer.optimizer_step("loss / gradient"))
        logs.update({k: float(np.mean(v)) for k, v in infos.items() if v})
        logs.update(gold_reward=float(rewards.mean()), adv_std=float(adv.std()), samples=N)
        if chain_kl:
            logs["kl"] = float(torch.cat(chain_kl).mean())
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])

    def close(self) -> None:
        if self._exec is not None:
            self._exec.shutdown(wait=True)


__all__ = ["DDPOTerm", "concat_samples", "PerPromptStatTracker", "global_advantages", "ppo_loss", "reinforce_loss",
           "DDPOSamples", "sample_chain", "trained_step_indices", "transition_log_prob", "transition_mean_log_prob"]
