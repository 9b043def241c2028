"""Run a script or module under ``torchrun --nproc_per_node N`` on CPU for the multi-process tests."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, gpu: bool = False) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with ``args`` (a script path and its arguments, or ``-m module ...``)
    from the repository root: no GPU unless ``gpu``, one thread per process, offline hubs, a free rendezvous port.
    ``stdout`` / ``stderr`` of the result: the agent's, then each rank's whole output in rank order (redirected to
    per-rank files, so lines of two ranks never interleave)."""
    keep = ("PATH", "HOME", "TMPDIR") + (("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH") if gpu else ())
    env = {k: os.environ[k] for k in keep if k in os.environ}  # nothing else leaks in
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="torchrun_logs_") as logs:
        # each rank's stdout / stderr to its own file: ranks writing to one shared pipe interleave partial lines
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "--log_dir", logs, "--redirects", "3", *args]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        for stream in ("stdout", "stderr"):  # the agent's own output, then every rank's whole, in rank order
            files = sorted(Path(logs).glob(f"*/attempt_*/*/{stream}.log"),
                           key=lambda f: (f.parts[-3], int(f.parts[-2])))
            texts = [t if t.endswith("\n") or not t else t + "\n" for t in (f.read_text() for f in files)]
            setattr(run, stream, getattr(run, stream) + "".join(texts))
    return run


def results(stdout: str) -> list[dict]:
    """The JSON payloads of the ``RESULT {...}`` lines a test script printed."""
    return [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if line.startswith("RESULT ")]
