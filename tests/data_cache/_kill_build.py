"""Subprocess for the SIGKILL test: builds (or resumes) a small Shapes cache slowly enough to be killed mid-way."""

import sys
import time

import torch

from data_cache import BuildCacheConfig, SourceConfig, build_cache


class SlowReward:
    name = "slow-mean"
    version = "1"
    modality = "image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        time.sleep(0.01)
        return pixels.flatten(1).mean(1)


if __name__ == "__main__":
    out_dir, n = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = BuildCacheConfig(out_dir=out_dir, source=SourceConfig(num_samples=n), batch_size=2, shard_size=3,
                           num_workers=1, progress=False, device="cpu", resume=True)
    build_cache(cfg, rewards=[SlowReward()])
    print("DONE", flush=True)
