"""Black-box rewards: Python callables and external commands (file protocol, timeouts, bad replies)."""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_adapters import create_reward
from reward_adapters.blackbox import RewardCommandError, RewardTimeoutError

PY = sys.executable
# A scorer in the file protocol: mean red of each PNG (or NPZ video) + the prompt's length.
SCORER = r"""
import json, sys, os
import numpy as np
from PIL import Image
d = sys.argv[1]
inp = json.load(open(os.path.join(d, "inputs.json")))
prompts = json.load(open(os.path.join(d, "prompts.json")))
out = []
for i, f in enumerate(inp["files"]):
    p = os.path.join(d, f)
    a = np.load(p)["frames"] if f.endswith(".npz") else np.asarray(Image.open(p))
    out.append(float(a[..., 0].mean()) / 255 + (len(prompts[i]) if prompts else 0))
json.dump(out, open(os.path.join(d, "scores.json"), "w"))
"""


def _x(b=3):
    return (torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round() / 255


@pytest.fixture
def scorer(tmp_path):
    f = tmp_path / "scorer.py"
    f.write_text(SCORER)
    return f


def test_command_reward_images_and_prompts(scorer):
    x = _x()
    r = create_reward("command", command=f"{PY} {scorer} {{dir}}", modality="text-image", name="red-len")
    s = r(x, ["a", "bb", "ccc"])
    want = x[:, 0].mean((1, 2)) + torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(s, want, atol=1e-6)
    assert r.name == "red-len"
    # directory appended when no {dir} placeholder; image modality ignores prompts (null in prompts.json)
    r2 = create_reward("command", command=[PY, str(scorer)])
    assert torch.allclose(r2(x), x[:, 0].mean((1, 2)), atol=1e-6)


def test_command_reward_videos_as_npz(scorer):
    v = _x(6).reshape(2, 3, 3, 8, 8)
    r = create_reward("command", command=[PY, str(scorer)], modality="video")
    assert torch.allclose(r(v), v[:, :, 0].mean((1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("body,match", [
    ("import time; time.sleep(30)", "timed out after 1 s"),
    ("import sys; sys.stderr.write('model exploded'); sys.exit(3)", "(?s)exited with status 3.*model exploded"),
    ("pass", "wrote no scores.json"),
    ("import sys,os; open(os.path.join(sys.argv[1],'scores.json'),'w').write('not json')", "not valid JSON"),
    ("import sys,os,json; json.dump([1.0], open(os.path.join(sys.argv[1],'scores.json'),'w'))",
     "1 scores for a batch of 3"),
    ("import sys,os,json; json.dump(['x',1,2], open(os.path.join(sys.argv[1],'scores.json'),'w'))", "not a number"),
    ("import sys,os,json; json.dump({'a': 1}, open(os.path.join(sys.argv[1],'scores.json'),'w'))", "list of 3 numbers"),
])
def test_command_reward_errors(tmp_path, body, match):
    f = tmp_path / "bad.py"
    f.write_text(body)
    r = create_reward("command", command=[PY, str(f)], timeout=1)
    with pytest.raises(RewardCommandError, match=match):
        r(_x())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (re)parent to reap it is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_command_reward_timeout_kills_its_process_group(tmp_path):
    """One timeout for the batch, then the command and the child it started die; the child holds the command's
    stdout, so reading it to the end would otherwise wait for the child as well."""
    pid_file = tmp_path / "child.pid"
    f = tmp_path / "spawn.py"
    f.write_text("import subprocess, sys, time\n"
                 "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
                 f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
                 "time.sleep(30)\n")
    r = create_reward("command", command=[PY, str(f)], timeout=2)
    t0 = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="timed out after 2 s on a batch of 3 .killed with its child"):
        r(_x())
    assert time.monotonic() - t0 < 15
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the command's child outlived the timeout"
    assert issubclass(RewardTimeoutError, RewardCommandError) and issubclass(RewardTimeoutError, TimeoutError)


def test_command_not_found():
    with pytest.raises(RewardCommandError, match="not found"):
        create_reward("command", command="no-such-program-xyz")(_x())


def test_callable_reward_batch_and_per_sample():
    x = _x(4)
    r = create_reward("callable", fn=lambda p, q: p.mean(dim=(1, 2, 3)), differentiable=True, name="mean")
    xg = x.clone().requires_grad_(True)
    r(xg).sum().backward()
    assert torch.allclose(xg.grad, torch.full_like(x, 1 / (3 * 64)))
    r2 = create_reward("callable", fn=lambda s, p: float(s.max()) + len(p), per_sample=True, workers=2,
                       modality="text-image")
    assert torch.allclose(r2(x, ["a", "bb", "c", ""]),
                          x.amax(dim=(1, 2, 3)) + torch.tensor([1.0, 2, 1, 0]))
    # list / numpy replies are accepted; wrong lengths are not
    assert torch.allclose(create_reward("callable", fn=lambda p, q: np.ones(4))(x), torch.ones(4))
    with pytest.raises(RewardCommandError, match="for a batch of 4"):
        create_reward("callable", fn=lambda p, q: [1.0, 2.0])(x)
    # a callable image reward on videos: selected frames, batched, averaged
    v = torch.stack([x, 1 - x], dim=1)
    calls = []
    r3 = create_reward("callable", fn=lambda p, q: (calls.append(p.shape), p.mean(dim=(1, 2, 3)))[1])
    assert torch.allclose(r3(v), torch.full((4,), 0.5), atol=1e-6)
    assert calls == [(8, 3, 8, 8)]
