import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one intra-op thread is as fast as two, and immune to OpenMP threads spinning on an
# oversubscribed CPU (a 2-core CI machine running other jobs made some tests 10-40x slower). Subprocesses the tests
# start inherit OMP_NUM_THREADS. LRM_TEST_THREADS=N overrides.
TEST_THREADS = int(os.environ.get("LRM_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_encoder():
    from lrm.text import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def shapes_vae():
    from lrm.latent_space import VAE

    return VAE.shapes()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline directory (tests/tiny_sd.py): unet/ (cross-attention 32), vae/
    (downsample 2: 16 px -> 4x8x8 latents), text_encoder/ + tokenizer/ (CLIP, 77 tokens x 32), scheduler/."""
    from tests.tiny_sd import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))
