"""ImageReward vs the original ``image-reward`` 1.5 code, on the same tiny random weights.

The original ``ImageReward.score`` (PIL preprocessing, BERT tokenization, BLIP ViT + med BERT + MLP) runs
as shipped, loaded by ``reward_adapters.original_packages``; its weights are converted into our model
with ``convert_imagereward_state_dict``. Skipped unless ``make extras`` installed the package.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from reward_adapters.original_packages import imagereward_available

if not imagereward_available():
    pytest.skip("image-reward / fairscale not installed: run `make extras`", allow_module_level=True)


def test_imagereward_score_matches_original_package(tmp_path):
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    from reward_adapters import create_reward
    from reward_adapters.imagereward import ImageRewardModel, convert_imagereward_state_dict
    from reward_adapters.original_packages import build_original_imagereward

    words = "a red circle on the left two blue squares photo of cat".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    D, Dt, S = 48, 32, 64
    ir = build_original_imagereward(
        tok, vision=dict(patch_size=16, embed_dim=D, depth=2, num_heads=2),
        text=dict(vocab_size=len(tok), hidden_size=Dt, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64), image_size=S)
    for p in ir.mlp.parameters():  # the released init makes random outputs ~0; widen them
        torch.nn.init.normal_(p, std=0.3)
    ours_model = ImageRewardModel(
        BlipVisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=2,
                         image_size=S, patch_size=16, layer_norm_eps=1e-6),
        BlipTextConfig(vocab_size=len(tok), hidden_size=Dt, encoder_hidden_size=D, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64))
    ours_model.load_state_dict(convert_imagereward_state_dict(ir.module.state_dict()), strict=True)
    reward = create_reward("imagereward", model=ours_model, tokenizer=tok)

    prompts = ["a red circle on the left", "two blue squares", "a photo of a cat", "a red circle"]
    g = torch.Generator().manual_seed(1)
    # crop only (exact up to float32), then PIL resampling (PIL rounds its resized image to uint8)
    for h, w, tol in ((64, 90, 1e-3), (77, 90, 5e-2)):
        x = (torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=(h, w), mode="bilinear")
             * 255).round() / 255
        pils = [Image.fromarray((xi.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for xi in x]
        with torch.no_grad():
            ref = np.array([ir.score(p, im) for p, im in zip(prompts, pils)])
        ours = reward(x, prompts).numpy()
        spread = np.ptp(reward(x, [prompts[0]] * 4).numpy())  # the image-driven part of the score
        assert spread > 1e-3 * np.abs(ref).max()
        assert np.abs(ours - ref).max() <= tol * spread, (ours, ref, spread)
        assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
