import pytest
import torch

from lrm.latent_space import LatentSpace, LatentSpaceMismatchError
from shapes import ShapesWorld
from shapes.train_vae import psnr

# Shipped VAE: 41.2 dB held-out image PSNR on the GPU run (docs/shapes/vae_metrics.json); assert well above
# what a broken or mismatched VAE gives (< 15 dB).
PSNR_THRESHOLD_DB = 32.0


def test_text_encoder_shapes_and_masks(text_encoder):
    emb = text_encoder(["a red circle", "three blue squares moving left on a white background"])
    assert emb.tokens.shape == (2, 32, 384) and emb.pooled.shape == (2, 384)
    assert emb.mask.dtype == torch.bool
    n = emb.mask.sum(1)
    assert 3 < n[0] < n[1] <= 32  # longer caption, more tokens; [CLS] + words + [SEP]
    # Mean pooling over real tokens only: padding does not change the pooled vector.
    m = emb.mask[0]
    torch.testing.assert_close(emb.pooled[0], emb.tokens[0][m].mean(0), atol=1e-5, rtol=1e-5)
    # A real pretrained encoder: related captions are closer than unrelated ones.
    e = text_encoder(["a red circle", "one red circle", "a green triangle moving down"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(e[0:1], e[1:2]) > cos(e[0:1], e[2:3])
    with pytest.raises(TypeError):
        text_encoder("not a list")


def test_vae_round_trip_quality(shapes_vae):
    pixels, _, _ = ShapesWorld(seed=999).batch(range(32))
    z = shapes_vae.encode(pixels)
    assert z.shape == (32, 4, 8, 8)
    assert 0.5 < float(z.std()) < 2.0  # scaling factor makes latents roughly unit scale
    rec = shapes_vae.decode(z)
    assert rec.shape == pixels.shape and rec.min() >= 0 and rec.max() <= 1
    assert float(psnr(rec, pixels).mean()) > PSNR_THRESHOLD_DB


def test_vae_video_round_trip(shapes_vae):
    vids, _, _ = ShapesWorld(num_frames=4, seed=5).batch(range(3))
    z = shapes_vae.encode(vids)
    assert z.shape == (3, 4, 4, 8, 8)
    rec = shapes_vae.decode(z)
    assert rec.shape == vids.shape
    assert float(psnr(rec.flatten(0, 1), vids.flatten(0, 1)).mean()) > PSNR_THRESHOLD_DB
    # Chunking does not change results.
    shapes_vae.chunk_size = 5
    try:
        torch.testing.assert_close(shapes_vae.encode(vids), z, atol=1e-5, rtol=1e-5)
    finally:
        shapes_vae.chunk_size = 64


def test_vae_rejects_bad_pixels(shapes_vae):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        shapes_vae.encode(x * 255)
    with pytest.raises(ValueError, match="channels-last"):
        shapes_vae.encode(x.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="NaN"):
        shapes_vae.encode(torch.full_like(x, float("nan")))
    with pytest.raises(TypeError, match="uint8"):
        shapes_vae.encode((x * 255).to(torch.uint8))
    with pytest.raises(LatentSpaceMismatchError, match="channels"):
        shapes_vae.decode(torch.randn(2, 16, 8, 8))


def test_latent_space_identity(shapes_vae):
    space = shapes_vae.latent_space
    assert space.latent_channels == 4 and space.downsample == 4
    assert space.latent_shape(32, 32) == (4, 8, 8) and space.latent_shape(32, 32, 16) == (16, 4, 8, 8)
    same = LatentSpace.from_dict(space.to_dict())
    same.check_compatible(space)
    other = LatentSpace(**{**space.to_dict(), "vae_hash": "0" * 64})
    with pytest.raises(LatentSpaceMismatchError, match="vae_hash"):
        space.check_compatible(other, "cache latents")
    with pytest.raises(ValueError, match="divisible"):
        space.latent_shape(30, 32)
