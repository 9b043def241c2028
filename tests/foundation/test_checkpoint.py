"""lrm.checkpoint: what is saved, how (tensor by tensor to the host, dtypes kept), atomicity under SIGKILL."""

import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lrm.checkpoint import find_checkpoint, load_training_state, save_training_state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class _OnDevice(torch.Tensor):
    """A tensor that reports a CUDA device and records what is done to it: ``.clone()`` would be a copy on the GPU;
    ``.to("cpu")`` / ``.cpu()`` is a copy to the host (returned as a plain CPU tensor). The data really is on the CPU,
    so the test runs without a GPU."""

    events: list = []
    host_copies: list = []  # weak references to the host copies handed out

    @property
    def device(self):
        return torch.device("cuda", 0)

    def clone(self, *args, **kwargs):
        _OnDevice.events.append("device clone")
        return super().clone(*args, **kwargs)

    def contiguous(self, *args, **kwargs):
        _OnDevice.events.append("device contiguous")
        return super().contiguous(*args, **kwargs)

    def _to_host(self):
        live = sum(r() is not None for r in _OnDevice.host_copies)
        _OnDevice.events.append(f"to host ({live} host copies alive)")
        host = self.as_subclass(torch.Tensor).clone()  # a fresh host buffer, as a device-to-host copy makes
        _OnDevice.host_copies.append(weakref.ref(host))
        return host

    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if dev is not None and torch.device(dev).type == "cpu":
            return self._to_host()
        _OnDevice.events.append(f"to {args} {kwargs}")
        return super().to(*args, **kwargs)

    def cpu(self, *args, **kwargs):
        return self._to_host()


def _holder(sd):
    """What save_training_state needs of a module: ``state_dict()``."""
    return SimpleNamespace(state_dict=lambda: sd)


def test_saved_file_equals_the_state_and_keeps_dtypes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # tied + non-contiguous: shared storage
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.step()
    base = torch.arange(12.0)
    views = {"whole": base, "slice": base[2:7], "t": base.reshape(3, 4).t(), "half": torch.randn(5).half(),
             "flags": torch.tensor([True, False]), "count": torch.tensor(7)}
    path = save_training_state(tmp_path / "ckpt", 3, modules={"model": model, "views": _holder(views)},
                               optimizers={"opt": opt}, extra={"note": "x"})
    assert path == tmp_path / "ckpt" and isinstance(path, Path)
    saved = load_file(str(path / "state.safetensors"))
    expected = {f"module.model.{k}": v for k, v in model.state_dict().items()}
    expected.update({f"module.views.{k}": v for k, v in views.items()})
    expected.update({f"optim.opt.state.{pid}.{k}": v for pid, st in opt.state_dict()["state"].items()
                     for k, v in st.items() if isinstance(v, torch.Tensor)})
    for k, v in expected.items():
        assert saved[k].dtype == v.dtype, k  # bf16 stays bf16, nothing up-cast
        assert torch.equal(saved[k], v), k
    assert saved["module.model.0.weight"].dtype == torch.bfloat16
    assert saved["optim.opt.state.0.exp_avg"].dtype == torch.bfloat16
    # and it loads back into fresh objects
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    fresh[1].weight = torch.nn.Parameter(fresh[0].weight.t())
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    st = load_training_state(path, modules={"model": fresh}, optimizers={"opt": fopt})
    assert st == {"step": 3, "extra": {"note": "x"}}
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_device_tensors_go_to_the_host_one_at_a_time_with_no_device_copy(tmp_path):
    _OnDevice.events, _OnDevice.host_copies = [], []
    src = {"a": torch.randn(64, 32), "b": torch.randn(16).to(torch.bfloat16), "c": torch.arange(10)}
    on_dev = {k: v.as_subclass(_OnDevice) for k, v in src.items()}
    tied = on_dev["a"][:8].t()  # a non-contiguous view sharing a's storage
    on_dev["tied"] = tied
    assert on_dev["a"].device.type == "cuda"
    path = save_training_state(tmp_path / "ckpt", 1, modules={"m": _holder(on_dev)})
    # no copy was made on the device (today's bug: v.detach().clone() on the GPU, a second copy of the state) ...
    assert not [e for e in _OnDevice.events if not e.startswith("to host")], _OnDevice.events
    # ... each tensor was copied to the host once, and each host copy was freed before the next one was made
    assert _OnDevice.events == ["to host (0 host copies alive)"] * 4
    saved = load_file(str(path / "state.safetensors"))
    for k in src:
        assert saved[f"module.m.{k}"].dtype == src[k].dtype
        assert torch.equal(saved[f"module.m.{k}"], src[k])
    assert torch.equal(saved["module.m.tied"], src["a"][:8].t())


def test_save_logs_path_size_and_time(tmp_path, caplog):
    model = torch.nn.Linear(512, 512)  # 1 MB of float32 weights
    with caplog.at_level(logging.INFO, logger="lrm.checkpoint"):
        path = save_training_state(tmp_path / "ckpt", 5, modules={"m": model})
    rec = [r for r in caplog.records if r.name == "lrm.checkpoint"]
    assert len(rec) == 1 and rec[0].levelno == logging.INFO
    msg = rec[0].getMessage()
    assert str(path) in msg and " in " in msg and msg.rstrip().endswith(" s")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert f"{size / 1e6:.1f} MB" in msg


def test_a_second_save_leaves_exactly_one_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    m = torch.nn.Linear(3, 3)
    save_training_state(d, 1, modules={"m": m})
    with torch.no_grad():
        m.weight.fill_(4.0)
    save_training_state(d, 2, modules={"m": m})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_training_state(d, modules={"m": torch.nn.Linear(3, 3)})["step"] == 2


# ---- SIGKILL during a save ----------------------------------------------------------------------------------
def _child(directory: Path, phase: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(HERE / "_kill_checkpoint.py"), str(directory), phase, str(marker)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stdout.read().decode()[-2000:]}")
        assert time.monotonic() - t0 < timeout, "child never reached the kill point"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _loaded_step(directory: Path) -> int:
    sys.path.insert(0, str(HERE))
    try:
        from _kill_checkpoint import model_at
    finally:
        sys.path.remove(str(HERE))
    fresh = model_at(0)
    step = load_training_state(directory, modules={"model": fresh}, restore_rng=False)["step"]
    for p in fresh.parameters():  # every weight of the loaded state belongs to that step: not torn, not mixed
        assert torch.equal(p, torch.full_like(p, float(step)))
    return step


@pytest.mark.parametrize("phase,expected", [("write", 1), ("swap", 1), ("cleanup", 2)])
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path, phase, expected):
    sys.path.insert(0, str(HERE))
    try:
        from _kill_checkpoint import model_at
    finally:
        sys.path.remove(str(HERE))
    d = tmp_path / "ckpt"
    save_training_state(d, 1, modules={"model": model_at(1)})
    marker = tmp_path / "stopped"
    proc = _child(d, phase, marker)
    try:
        _wait_for(marker, proc)
    finally:
        _kill(proc)
    if phase == "swap":  # the moment with no `ckpt` on disk: the previous one is found under ckpt.old
        assert not d.exists() and find_checkpoint(d) == d.with_name("ckpt.old")
    assert _loaded_step(d) == expected
    # the next save recovers: exactly one checkpoint is left, the new one
    save_training_state(d, 3, modules={"model": model_at(3)})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert _loaded_step(d) == 3


def test_sigkill_at_random_moments_of_repeated_saves(tmp_path):
    """Kill a process that saves in a loop at arbitrary moments: what is left always loads, whole."""
    d = tmp_path / "ckpt"
    marker = tmp_path / "saved"
    for delay in (0.0, 0.013, 0.031):
        marker.unlink(missing_ok=True)
        proc = _child(d, "loop", marker)
        try:
            _wait_for(marker, proc)  # at least one save finished in this process
            time.sleep(delay)
        finally:
            _kill(proc)
        assert _loaded_step(d) >= 2


def test_a_non_finite_state_is_never_written(tmp_path):
    from lrm.checkpoint import NonFiniteStateError

    m = torch.nn.Linear(3, 2)
    save_training_state(tmp_path / "ck", 1, modules={"m": m})
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError, match="module.m.weight"):
        save_training_state(tmp_path / "ck", 2, modules={"m": m})
    assert find_checkpoint(tmp_path / "ck") == tmp_path / "ck" and not (tmp_path / "ck.tmp").exists()
    fresh = torch.nn.Linear(3, 2)
    assert load_training_state(tmp_path / "ck", modules={"m": fresh})["step"] == 1
    assert torch.isfinite(fresh.weight).all()
