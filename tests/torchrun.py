"""Run a script or module under ``torchrun --nproc_per_node N`` on CPU for the multi-process tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, gpu: bool = False) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with ``args`` (a script path and its arguments, or ``-m module ...``)
    from the repository root: no GPU unless ``gpu``, one thread per process, offline hubs, a free rendezvous port."""
    keep = ("PATH", "HOME", "TMPDIR") + (("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH") if gpu else ())
    env = {k: os.environ[k] for k in keep if k in os.environ}  # nothing else leaks in
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def results(stdout: str) -> list[dict]:
    """The JSON payloads of the ``RESULT {...}`` lines a test script printed."""
    return [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if line.startswith("RESULT ")]
