"""Resumable training state as safetensors + JSON (no pickles).

``save_training_state(dir, step, modules=..., optimizers=..., schedulers=..., extra=...)`` writes
``dir/state.safetensors`` + ``dir/state.json``. Tensors are saved from where they are: each one is copied to host
memory, written and dropped before the next (``lrm.io.write_tensors_streaming``), so a state on a GPU costs no extra
GPU memory and one tensor of host memory; dtypes are kept (a bf16 module is saved as bf16).

Atomicity: the new checkpoint is written into ``dir.tmp``; then ``dir`` is renamed to ``dir.old``, ``dir.tmp`` to
``dir``, and ``dir.old`` is deleted. A run killed at any moment leaves either the previous checkpoint or the new one,
never a torn one (``find_checkpoint`` / ``load_training_state`` pick ``dir``, else ``dir.old``). During the save the
old and the new checkpoint coexist on disk (atomicity needs the old one until the new one is complete: plan disk
for two); after a save exactly one remains. Optimizer states are flattened to tensors; RNG states of python, numpy
and torch are kept so a resumed run continues the same random stream.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrm.io import fsync_dir, load_tensors, read_json, write_json, write_tensors_streaming
from lrm.run import get_logger

log = get_logger("lrm.checkpoint")  # a stderr handler, as every lrm.* logger (propagate is off)


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    sd = opt.state_dict()
    state_meta = {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{k}"] = v
                entry[k] = "__tensor__"
            else:
                entry[k] = v
        state_meta[str(pid)] = entry
    meta[prefix] = {"state": state_meta, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    m = meta[prefix]
    state = {}
    for pid, entry in m["state"].items():
        state[int(pid)] = {k: (tensors[f"{prefix}.state.{pid}.{k}"] if v == "__tensor__" else v)
                           for k, v in entry.items()}
    return {"state": state, "param_groups": m["param_groups"]}


class NonFiniteStateError(ValueError):
    """A training state with NaN / inf values: never written as a checkpoint."""


def save_training_state(directory: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module] | None = None,
                        optimizers: dict[str, torch.optim.Optimizer] | None = None,
                        schedulers: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the training state to ``directory`` atomically (see the module docstring); returns ``directory``.

    Logs the path, the size and the seconds taken (logger ``lrm.checkpoint``, INFO).
    """
    t0 = time.perf_counter()
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():  # a save killed before its rename: never a checkpoint
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # References only: nothing is copied here (state_dict() returns the live tensors).
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": int(step), "modules": [], "optimizers": {}, "schedulers": {}, "extra": extra or {}}
    for name, mod in (modules or {}).items():
        for k, v in mod.state_dict().items():
            tensors[f"module.{name}.{k}"] = v
        meta["modules"].append(name)
    for name, opt in (optimizers or {}).items():
        _flatten_optimizer(f"optim.{name}", opt, tensors, meta["optimizers"])
    for name, sch in (schedulers or {}).items():
        meta["schedulers"][name] = sch.state_dict()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta["rng"] = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": _py_state()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a checkpoint is only ever written from a finite state: the previous one stays
        shutil.rmtree(tmp)
        raise NonFiniteStateError(f"refusing to write checkpoint {directory}: {len(bad)} tensor(s) hold NaN / inf "
                                  f"(first: {bad[0]}); the previous checkpoint, if any, is kept")
    # One tensor at a time to the host; shared storage (tied weights, views) is written as separate copies.
    nbytes = write_tensors_streaming(tmp / "state.safetensors", tensors)
    del tensors
    write_json(tmp / "state.json", meta)
    nbytes += (tmp / "state.json").stat().st_size
    fsync_dir(tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():  # left by a save killed after its rename; `directory` is complete
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old.exists():
        shutil.rmtree(old)
    log.info("saved checkpoint %s (step %d, %s) in %.1f s", directory, int(step), _fmt_bytes(nbytes),
             time.perf_counter() - t0)
    return directory


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _py_state() -> list:
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at ``directory``, or the previous one if a save was interrupted."""
    directory = Path(directory)
    for cand in (directory, directory.with_name(directory.name + ".old")):
        if (cand / "state.json").exists() and (cand / "state.safetensors").exists():
            return cand
    return None


def load_training_state(directory: str | os.PathLike, modules: dict[str, torch.nn.Module] | None = None,
                        optimizers: dict[str, torch.optim.Optimizer] | None = None,
                        schedulers: dict[str, Any] | None = None, restore_rng: bool = True,
                        map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load what ``save_training_state`` wrote into the given objects; returns ``{"step", "extra"}``."""
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {directory} (expected state.json + state.safetensors)")
    meta = read_json(found / "state.json")
    tensors = load_tensors(found / "state.safetensors")
    for name, mod in (modules or {}).items():
        if name not in meta["modules"]:
            raise KeyError(f"checkpoint {found} has no module {name!r}; it holds {meta['modules']}")
        pre = f"module.{name}."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, opt in (optimizers or {}).items():
        sd = _unflatten_optimizer(f"optim.{name}", tensors, meta["optimizers"])
        opt.load_state_dict(sd)
    for name, sch in (schedulers or {}).items():
        sch.load_state_dict(meta["schedulers"][name])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        n = meta["rng"]["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
        p = meta["rng"]["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
    return {"step": meta["step"], "extra": meta["extra"]}
