"""Run a command and record its wall time and peak GPU memory (all GPUs summed, as ``nvidia-smi`` reports it).

    python bench/device/gpu_peak.py --name distill_sd15 --log $OUT/peaks.jsonl -- lrm distill --teacher ...

Polls ``nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits`` every ``--interval`` seconds (0.2) while
the command runs; without ``nvidia-smi`` the peak is recorded as null. Appends one JSON line
``{"name", "cmd", "rc", "wall_s", "peak_gpu_mem_mib", "start"}`` to ``--log``. The command's stdout / stderr pass
through untouched, and this exits with the command's return code.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

QUERY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def gpu_mem_used_mib() -> int | None:
    """Memory in use summed over the visible GPUs (MiB), or None when nvidia-smi is absent or fails."""
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    vals = [int(float(v)) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
    return sum(vals) if vals else None


class Poller(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, None
        self.enabled = shutil.which("nvidia-smi") is not None
        self._stop_evt = threading.Event()

    def sample(self) -> None:
        v = gpu_mem_used_mib()
        if v is not None:
            self.peak = v if self.peak is None else max(self.peak, v)

    def run(self) -> None:
        while self.enabled and not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()
        if self.enabled:
            self.sample()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: gpu_peak.py --name NAME --log FILE [--interval S] -- CMD ...", file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--log", required=True, help="JSON-lines file to append to")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between nvidia-smi polls")
    args = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        p.error("no command after --")

    start = datetime.now(timezone.utc).isoformat(timespec="seconds")
    poller = Poller(args.interval)
    poller.start()
    t0 = time.perf_counter()
    try:
        rc = subprocess.call(cmd)  # inherits stdout / stderr
    except OSError as e:  # command not found / not executable
        print(f"gpu_peak: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        rc = 127
    except KeyboardInterrupt:
        rc = 130
    wall = time.perf_counter() - t0
    poller.stop()
    rec = {"name": args.name, "cmd": shlex.join(cmd), "rc": rc, "wall_s": round(wall, 3),
           "peak_gpu_mem_mib": poller.peak, "start": start}
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"gpu_peak: {json.dumps(rec)}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
