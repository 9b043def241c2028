"""Subprocess for the SIGKILL tests of ``lrm.checkpoint.save_training_state``.

``python _kill_checkpoint.py DIR PHASE MARKER``: saves the state of step 2 (every weight = 2.0) into DIR, which
already holds step 1, and stops at PHASE, touching MARKER, until the test kills it:
  write    after the first tensor of the new state.safetensors is written (DIR.tmp is torn)
  swap     after DIR was renamed to DIR.old, before DIR.tmp is renamed to DIR (no DIR on disk)
  cleanup  after DIR.tmp became DIR, with DIR.old half deleted
  loop     never stops: saves steps 2, 3, 4, ... as fast as it can, touching MARKER after each save
"""

import os
import shutil
import sys
import time
from pathlib import Path

import torch

import lrm.io
from lrm.checkpoint import save_training_state


def model_at(step: int) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(step))
    return m


def _stop(marker: str) -> None:
    Path(marker).touch()
    while True:
        time.sleep(1)


def main() -> None:
    directory, phase, marker = sys.argv[1:4]
    d = Path(directory)
    if phase == "write":
        real, calls = lrm.io._host_copy, []

        def host_copy(t):
            calls.append(1)
            if len(calls) == 2:  # the first tensor's bytes are in the file
                _stop(marker)
            return real(t)

        lrm.io._host_copy = host_copy
    elif phase == "swap":
        real_replace = os.replace

        def replace(src, dst):
            if Path(src) == d.with_name(d.name + ".tmp"):
                _stop(marker)
            real_replace(src, dst)

        os.replace = replace
    elif phase == "cleanup":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path) == d.with_name(d.name + ".old"):
                (Path(path) / "state.safetensors").unlink()
                _stop(marker)
            real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    if phase == "loop":
        step = 2
        while True:
            save_training_state(d, step, modules={"model": model_at(step)})
            Path(marker).write_text(str(step))
            step += 1
    save_training_state(d, 2, modules={"model": model_at(2)})
    raise SystemExit(f"phase {phase!r} never stopped")


if __name__ == "__main__":
    main()
