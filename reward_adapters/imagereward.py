"""ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L + BERT with cross-attention to the image + MLP.

Built from transformers' BLIP classes (``BlipVisionModel`` = BLIP's ViT with its final norm;
``BlipTextModel`` = BLIP's BERT with cross-attention, as in ImageReward's ``med.py``). The released
``ImageReward.pt`` is converted on load (key renames as in transformers' BLIP conversion script).

Original scoring (image-reward 1.5 ``ImageReward.score``): BERT tokenizer (bert-base-uncased),
``padding="max_length", truncation=True, max_length=35``; image: Resize(224, bicubic) + CenterCrop(224)
+ OpenAI mean/std; features = text CLS token after cross-attending to all image tokens;
reward = (MLP(features) - 0.16717362830052426) / 1.0333394966054072. The MLP's ReLUs are commented out
in the original, so it is affine.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from reward_adapters.base import Reward, register_reward
from reward_adapters.openclip_backbone import PRECISIONS
from reward_adapters.preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resize_shortest_center_crop
from reward_adapters.weights import (
    cached,
    check_tokenizer_vocab,
    load_from_hub,
    load_state_dict,
    resolve_weights,
)

IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
IR_HUB_REPO = "THUDM/ImageReward"
IR_FILE = "ImageReward.pt"
TEXT_MAX_LENGTH = 35
TOKENIZER_ID = "bert-base-uncased"


def imagereward_configs():
    """The released model's configs: BLIP ViT-L/16 at 224 and BLIP's BERT-base (med_config.json)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    # initializer_range only matters for random-weight use (benchmarks): HF's BLIP vision default is 1e-10,
    # which makes every image token identical.
    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
                              initializer_range=0.02)
    # is_decoder=True is what makes HF's BlipTextLayer build its cross-attention; the forward pass still uses a
    # bidirectional text mask (is_decoder=False argument), as ImageReward's med.py in "multimodal" mode.
    text = BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                          layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True)
    return vision, text


class ImageRewardMLP(nn.Module):
    """768-1024-128-64-16-1 with dropout and no activations (keys layers.{0,2,4,6,7} as released)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP vision encoder + BLIP text encoder (cross-attention) + MLP head; forward returns the raw MLP output."""

    def __init__(self, vision_config=None, text_config=None):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        if vision_config is None or text_config is None:
            vision_config, text_config = imagereward_configs()
        if not text_config.is_decoder:
            raise ValueError("text_config.is_decoder must be True: transformers' BlipTextLayer builds its "
                             "cross-attention only then (the text mask stays bidirectional)")
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(f"text_config.encoder_hidden_size={text_config.encoder_hidden_size} must equal "
                             f"vision_config.hidden_size={vision_config.hidden_size}")
        self.visual = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardMLP(text_config.hidden_size)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values=pixel_values).last_hidden_state  # (N, 1 + patches, Dv)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        img = self.image_embeds(pixel_values)
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=img_mask, is_decoder=False)
        cls = out.last_hidden_state[:, 0, :].float()  # (N, Dt)
        return self.mlp(cls).squeeze(-1)


_VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "visual.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "visual.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "visual.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.norm\.", "visual.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"visual.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"visual.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"visual.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"visual.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"visual.encoder.layers.\1.mlp."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.", "mlp."),
]


def convert_imagereward_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys (BLIP naming) -> ``ImageRewardModel`` keys; unused BLIP heads are dropped."""
    out = {}
    for k, v in sd.items():
        for pat, rep in _VISION_RENAMES:
            if re.search(pat, k):
                nk = re.sub(pat, rep, k)
                if not nk.endswith("position_ids") and ".pooler." not in nk:
                    out[nk] = v
                break
    return out


def load_bert_tokenizer(repo: str = TOKENIZER_ID):
    """ImageReward's BERT tokenizer from a hub id or local directory, hub cache ``$LRM_CACHE_DIR/hf`` when set."""
    from transformers import BertTokenizer

    return load_from_hub(f"ImageReward's {repo} tokenizer (vocab.txt)", repo, lambda r, **kw: check_tokenizer_vocab(
        BertTokenizer.from_pretrained(r, **kw), r, "BertTokenizer"), "tokenizer",
        files="vocab.txt tokenizer_config.json")


@register_reward("imagereward")
class ImageRewardReward(Reward):
    """ImageReward v1.0 human-preference reward (text-image), batched.

    Args:
        weights: path to ``ImageReward.pt`` (or its directory); default ``$LRM_CACHE_DIR/imagereward/`` then
            the hub repo THUDM/ImageReward.
        tokenizer: an HF BERT tokenizer, or a hub id / local directory to load one from; default
            ``BertTokenizer.from_pretrained("bert-base-uncased", cache_dir=$LRM_CACHE_DIR/hf)``.
        model: inject an ``ImageRewardModel`` (tests use tiny configs of the same classes).
        precision: "fp32", "bf16" or "fp16" (autocast on CUDA).
    """

    name = "imagereward"
    modality = "text-image"
    differentiable = True

    def __init__(self, weights: str | None = None, tokenizer: Callable | str | None = None,
                 model: ImageRewardModel | None = None, precision: str = "fp32", **kw):
        super().__init__(**kw)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
        self.precision = precision
        self.version = "imagereward-v1.0" + ("" if model is None else "-injected")
        if model is None:
            path = resolve_weights(IR_FILE, path=weights, hub_repo=IR_HUB_REPO, subdir="imagereward")

            def build():
                m = ImageRewardModel()
                sd = convert_imagereward_state_dict(load_state_dict(path))
                missing, _ = m.load_state_dict(sd, strict=False)
                missing = [k for k in missing if not k.endswith("position_ids")]
                if missing:
                    raise ValueError(f"{path}: not an ImageReward v1.0 checkpoint; missing {missing[:8]}")
                return m.eval().requires_grad_(False).to(self.device)

            model = cached(("imagereward", str(path), str(self.device)), build)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            self._tokenizer = load_bert_tokenizer(self._tokenizer or TOKENIZER_ID)
        return self._tokenizer

    def autocast(self):
        import contextlib

        dt = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dt is None else torch.autocast(self.device.type, dtype=dt)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        size = int(self.model.visual.config.image_size)
        x = resize_shortest_center_crop(pixels.to(self.device, torch.float32), size)
        return normalize(x, OPENAI_MEAN, OPENAI_STD)

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def score_images(self, pixels, prompts):
        ids, mask = self.tokens(prompts)  # text is cross-attended per image, so no de-duplication here
        with self.autocast():
            raw = self.model(self.preprocess(pixels), ids, mask)
        return (raw.float() - IR_MEAN) / IR_STD
