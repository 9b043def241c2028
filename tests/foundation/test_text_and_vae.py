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


def _tiny_autoencoder(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16)


def test_vae_identity_is_by_content_not_by_name():
    from lrm.latent_space import VAE

    hub = VAE(_tiny_autoencoder(0), vae_id="org/sd-vae", scaling_factor=0.18215)
    local = VAE(_tiny_autoencoder(0), vae_id="/local/copy", scaling_factor=0.18215)  # same weights, other name
    assert hub.latent_space.vae_hash == local.latent_space.vae_hash
    hub.latent_space.check_compatible(local.latent_space, "the local copy's latents")
    local.latent_space.check_compatible(hub.latent_space)
    # the hash is of the values: not of the device, the memory layout or the parameter objects
    moved = VAE(_tiny_autoencoder(0), vae_id="x")
    with torch.no_grad():
        for p in moved.vae.parameters():
            p.set_(p.detach().clone().contiguous())
    assert moved.latent_space.vae_hash == hub.latent_space.vae_hash

    other = VAE(_tiny_autoencoder(1), vae_id="/local/copy", scaling_factor=0.18215)
    with pytest.raises(LatentSpaceMismatchError) as e:
        hub.latent_space.check_compatible(other.latent_space, "cache latents")
    msg = str(e.value)
    assert "vae_hash" in msg and "org/sd-vae" in msg and "/local/copy" in msg
    same_name = VAE(_tiny_autoencoder(1), vae_id="org/sd-vae", scaling_factor=0.18215)
    with pytest.raises(LatentSpaceMismatchError, match="both VAEs are named 'org/sd-vae' but their weights differ"):
        hub.latent_space.check_compatible(same_name.latent_space)
    # geometry / scaling are still compared
    rescaled = VAE(_tiny_autoencoder(0), vae_id="org/sd-vae", scaling_factor=0.13025)
    with pytest.raises(LatentSpaceMismatchError, match="scaling_factor"):
        hub.latent_space.check_compatible(rescaled.latent_space)


def test_vae_dtype_and_the_hash():
    """Half-precision weights are the same VAE loaded in half or upcast to float32; float32 weights rounded to
    bf16 are another VAE, and the message says how to get bf16 speed without that."""
    from lrm.latent_space import VAE

    ae = _tiny_autoencoder(0)
    with torch.no_grad():
        for p in ae.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # float32 weights that bf16 represents exactly
    exact32 = VAE(ae, vae_id="org/bf16-vae")
    as_bf16 = VAE(_tiny_autoencoder(0), vae_id="org/bf16-vae")
    as_bf16.vae.load_state_dict(ae.state_dict())
    as_bf16.vae.to(torch.bfloat16)
    assert as_bf16.latent_space.vae_dtype == "bfloat16" and exact32.latent_space.vae_dtype == "float32"
    exact32.latent_space.check_compatible(as_bf16.latent_space)

    fp32 = VAE(_tiny_autoencoder(0), vae_id="org/sd-vae")
    space32 = fp32.latent_space
    rounded = VAE(_tiny_autoencoder(0), vae_id="org/sd-vae").to(torch.bfloat16)
    with pytest.raises(LatentSpaceMismatchError, match=r"bfloat16 there but float32 here.*autocast") as e:
        space32.check_compatible(rounded.latent_space, "the VAE's latents")
    assert "--vae_bf16 true" in str(e.value)
    # bf16 autocast keeps the weights, and so the space
    VAE(_tiny_autoencoder(0), vae_id="org/sd-vae", autocast_bf16=True).latent_space.check_compatible(space32)
    # the cached space follows a later cast of the weights
    fp32.vae.to(torch.bfloat16)
    assert fp32.latent_space.vae_hash != space32.vae_hash and fp32.latent_space.vae_dtype == "bfloat16"


def test_vae_auto_chunk_size_by_pixels():
    from lrm.latent_space import VAE, auto_chunk_size

    assert [auto_chunk_size(s, s) for s in (256, 512, 1024, 32)] == [64, 16, 4, 4096]
    assert auto_chunk_size(4096, 4096) == 1
    calls = []
    ae = _tiny_autoencoder(0)
    real = ae.encode
    ae.encode = lambda x: (calls.append(x.shape[0]), real(x))[1]
    vae = VAE(ae, vae_id="tiny", chunk_size=0)
    import lrm.latent_space as ls

    old = ls.CHUNK_PIXELS
    ls.CHUNK_PIXELS = 3 * 16 * 16  # 3 frames of 16x16 per call
    try:
        z = vae.encode(torch.rand(2, 4, 3, 16, 16))  # 8 frames of a video batch
    finally:
        ls.CHUNK_PIXELS = old
    assert calls == [3, 3, 2] and z.shape == (2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        VAE(_tiny_autoencoder(0), vae_id="tiny", chunk_size=-1)
