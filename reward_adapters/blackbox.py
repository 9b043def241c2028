"""Any black box as a reward: a Python callable, or an external command exchanging files.

External command protocol (one call per batch):
1. A fresh temp directory gets ``000000.png``, ``000001.png``, ... (uint8 RGB images) or ``000000.npz``, ...
   (videos: array ``frames`` uint8 (T, H, W, 3)), ``prompts.json`` (a list of B strings, or null), and
   ``inputs.json`` ({"files": [...], "prompts": [...] | null, "modality": ...}).
2. The command runs with that directory: ``{dir}`` in the command is replaced by it, otherwise it is
   appended as the last argument; ``LRM_REWARD_DIR`` is set too. It must finish within ``timeout`` s (one timeout
   for the whole batch); past it, the command and every process it started (its process group: it runs in a
   session of its own) are killed and ``RewardTimeoutError`` is raised.
3. It writes ``scores.json`` into the directory: a list of B numbers (or {"scores": [...]}).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from reward_adapters.base import MODALITIES, NumpyReward, Reward, register_reward, to_uint8_numpy


class RewardCommandError(RuntimeError):
    pass


class RewardTimeoutError(RewardCommandError, TimeoutError):
    """The command did not finish within its timeout (the batch failed; callers should not retry it record by
    record: each retry would wait the whole timeout again)."""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and everything in its process group (it was started with ``start_new_session``), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes: stop reading them
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        proc.wait()


def _as_scores(values, batch_size: int, source: str) -> torch.Tensor:
    if isinstance(values, dict) and "scores" in values:
        values = values["scores"]
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.size != batch_size:
            raise RewardCommandError(f"{source} returned an array of shape {values.shape} for a batch of {batch_size}")
        values = values.reshape(-1).astype(np.float64).tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardCommandError(f"{source} must return a list of {batch_size} numbers, got {type(values).__name__}: "
                                 f"{str(values)[:200]}")
    if len(values) != batch_size:
        raise RewardCommandError(f"{source} returned {len(values)} scores for a batch of {batch_size}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardCommandError(f"{source}: score {i} is {v!r}, not a number")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


@register_reward("callable", help="wrap a Python function fn(pixels, prompts) -> B scores as a reward")
class CallableReward(Reward):
    """A Python function as a reward.

    Args:
        fn: ``fn(pixels, prompts) -> B numbers`` (tensor, array or list) on the whole batch, where pixels
            is a float tensor in [0, 1] ``(B, 3, H, W)`` (or ``(B, T, 3, H, W)`` for video modalities); or, with
            ``per_sample=True``, ``fn(sample, prompt) -> float`` on float32 numpy samples, run in the CPU pool.
        name / version / modality / differentiable: what the reward declares (differentiable only if fn
            is a torch function of the pixels).
    """

    def __init__(self, fn: Callable, name: str = "callable", version: str = "1", modality: str = "image",
                 differentiable: bool = False, per_sample: bool = False, workers: int | None = None,
                 executor: str = "thread", **kw):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if modality not in MODALITIES:
            raise ValueError(f"modality={modality!r}; valid: {MODALITIES}")
        self.name, self.version, self.modality = name, version, modality
        self.differentiable = bool(differentiable) and not per_sample
        super().__init__(**kw)
        self.fn = fn
        self.per_sample = per_sample
        if per_sample:
            self._pool = _PerSample(workers=workers, executor=executor)
            self._pool.fn = fn

    def _run(self, pixels, prompts):
        if self.per_sample:
            return self._pool.run(pixels, prompts)
        out = self.fn(pixels, prompts)
        if isinstance(out, torch.Tensor) and out.dim() == 1 and out.shape[0] == pixels.shape[0]:
            return out.float()  # keeps the graph for differentiable callables
        return _as_scores(out, pixels.shape[0], f"reward function {getattr(self.fn, '__name__', self.fn)!r}")

    def score_images(self, pixels, prompts):
        return self._run(pixels, prompts)

    def score_videos(self, pixels, prompts):
        return self._run(pixels, prompts)


class _PerSample(NumpyReward):
    fn: Callable

    def run(self, pixels, prompts):
        samples = pixels.detach().float().cpu().numpy()
        fn = self.fn
        ps = [None] * len(samples) if prompts is None else prompts
        if self.executor == "serial":
            vals = [fn(s, p) for s, p in zip(samples, ps)]
        else:
            from reward_adapters.base import get_executor

            vals = list(get_executor(self.executor, self.workers).map(fn, samples, ps))
        return _as_scores(list(vals), len(samples), f"reward function {getattr(fn, '__name__', fn)!r}")


@register_reward("command", help="an external program: PNG/NPZ + prompts.json in, scores.json out")
class CommandReward(Reward):
    """An external command as a reward (see the module docstring for the file protocol).

    Args:
        command: a string (split with shlex) or an argument list; ``{dir}`` marks the input directory.
        timeout: seconds per batch before the command and its children (its process group) are killed.
        modality: what the command scores ("image", "text-image", "video", "text-video").
        name / version: what the reward declares.
        keep_dir: keep the temp directories (for debugging).
    """

    def __init__(self, command: str | Sequence[str], timeout: float = 600.0, modality: str = "image",
                 name: str = "command", version: str = "1", keep_dir: bool = False, **kw):
        if modality not in MODALITIES:
            raise ValueError(f"modality={modality!r}; valid: {MODALITIES}")
        self.name, self.version, self.modality = name, version, modality
        super().__init__(**kw)
        args = shlex.split(command) if isinstance(command, str) else list(command)
        if not args:
            raise ValueError("command is empty: pass e.g. command='python my_scorer.py {dir}'")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.args = args
        self.timeout = float(timeout)
        self.keep_dir = keep_dir

    def write_inputs(self, pixels: torch.Tensor, prompts: list[str] | None, d: Path) -> list[str]:
        from PIL import Image

        arr = to_uint8_numpy(pixels)  # (B, H, W, 3) or (B, T, H, W, 3)
        files = []
        for i, a in enumerate(arr):
            if a.ndim == 3:
                f = f"{i:06d}.png"
                Image.fromarray(a).save(d / f)
            else:
                f = f"{i:06d}.npz"
                np.savez(d / f, frames=a)
            files.append(f)
        (d / "prompts.json").write_text(json.dumps(prompts))
        (d / "inputs.json").write_text(json.dumps({"files": files, "prompts": prompts, "modality": self.modality}))
        return files

    def _run(self, pixels, prompts):
        B = pixels.shape[0]
        tmp = tempfile.mkdtemp(prefix="lrm-reward-")
        d = Path(tmp)
        try:
            self.write_inputs(pixels, prompts, d)
            args = [a.replace("{dir}", str(d)) for a in self.args]
            if not any("{dir}" in a for a in self.args):
                args.append(str(d))
            env = dict(os.environ, LRM_REWARD_DIR=str(d))
            cmd = shlex.join(args)
            try:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
            except FileNotFoundError as e:
                raise RewardCommandError(f"reward command not found: {args[0]!r} ({cmd})") from e
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise RewardTimeoutError(f"reward command timed out after {self.timeout:g} s on a batch of {B} "
                                         f"(killed with its child processes): {cmd}. Raise timeout=... or make the "
                                         "command faster.") from None
            except BaseException:  # interrupted: leave no scorer running
                _kill_group(proc)
                raise
            if proc.returncode != 0:
                tail = (stderr or stdout or "").strip()[-1500:]
                raise RewardCommandError(f"reward command exited with status {proc.returncode}: {cmd}\n{tail}")
            out = d / "scores.json"
            if not out.is_file():
                raise RewardCommandError(f"reward command finished but wrote no {out.name} in its directory: {cmd}. "
                                         f"It must write a JSON list of {B} numbers to $LRM_REWARD_DIR/scores.json.")
            try:
                values = json.loads(out.read_text())
            except json.JSONDecodeError as e:
                raise RewardCommandError(f"{out.name} from {cmd} is not valid JSON ({e}): "
                                         f"{out.read_text()[:200]!r}") from e
            scores = _as_scores(values, B, f"reward command {cmd}")
            if not all(math.isfinite(v) or math.isnan(v) for v in scores.tolist()):
                raise RewardCommandError(f"reward command {cmd} returned infinite scores")
            return scores
        finally:
            if not self.keep_dir:
                import shutil

                shutil.rmtree(d, ignore_errors=True)

    def score_images(self, pixels, prompts):
        return self._run(pixels, prompts)

    def score_videos(self, pixels, prompts):
        return self._run(pixels, prompts)
