"""PickScore v1 (Kirstain et al. 2023): HF ``CLIPModel`` yuvalkirstain/PickScore_v1.

Original scoring: the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (resize the short side to
224 bicubic, center crop 224 with the HF floor offset, OpenAI mean/std; text padded/truncated to 77),
then ``logit_scale.exp() * cos(image_embeds, text_embeds)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from reward_adapters.base import Reward, register_reward
from reward_adapters.openclip_backbone import PRECISIONS, TextCache
from reward_adapters.preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resize_shortest_center_crop
from reward_adapters.weights import cached, check_tokenizer_vocab, hub_cache_dir, load_from_hub

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x returned the tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_hf(kind: str, repo: str, loader: Callable):
    return load_from_hub(f"the PickScore {kind}", repo, loader, "model_id" if kind == "model" else "processor_id")


@register_reward("pickscore")
class PickScoreReward(Reward):
    """PickScore v1: logit_scale.exp() * cosine of HF CLIP image and text embeddings.

    Args:
        model_id / processor_id: hub ids or local directories of the model and of its tokenizer.
        model / tokenizer: inject a ``transformers.CLIPModel`` and a tokenizer (an HF tokenizer, or a
            callable ``list[str] -> LongTensor (N, L)`` such as open_clip's) instead (tests).
        precision: "fp32", "bf16" or "fp16" (autocast on CUDA).
    """

    name = "pickscore"
    modality = "text-image"
    differentiable = True

    def __init__(self, model_id: str = MODEL_ID, processor_id: str = PROCESSOR_ID, model: nn.Module | None = None,
                 tokenizer: Callable | None = None, precision: str = "fp32", **kw):
        super().__init__(**kw)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
        self.precision = precision
        self.version = "pickscore-v1" + ("" if model is None else "-injected")
        if model is None:
            from transformers import CLIPModel

            model = cached(("pickscore", model_id, str(self.device), hub_cache_dir()), lambda: _load_hf(
                "model", model_id, CLIPModel.from_pretrained).eval().requires_grad_(False).to(self.device))
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._tokenizer = tokenizer
        self.processor_id = processor_id

    @property
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = _load_hf("tokenizer", self.processor_id, lambda r, **kw: check_tokenizer_vocab(
                AutoTokenizer.from_pretrained(r, **kw), r, "the PickScore tokenizer"))
        return self._tokenizer

    def _tokens(self, texts: list[str]) -> dict:
        tok = self.tokenizer
        if callable(tok) and not hasattr(tok, "pad_token_id"):
            ids = tok(texts).to(self.device)
            return {"input_ids": ids}
        enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def autocast(self):
        import contextlib

        dt = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dt is None else torch.autocast(self.device.type, dtype=dt)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        size = int(self.model.config.vision_config.image_size)
        x = resize_shortest_center_crop(pixels.to(self.device, torch.float32), size, rounding="hf")
        return normalize(x, OPENAI_MEAN, OPENAI_STD)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        def enc(texts):
            with torch.no_grad(), self.autocast():
                f = _features(self.model.get_text_features(**self._tokens(texts)))
            return nn.functional.normalize(f.float(), dim=-1)

        return TextCache.encode(prompts, enc)

    def score_images(self, pixels, prompts):
        with self.autocast():
            img = _features(self.model.get_image_features(pixel_values=self.preprocess(pixels)))
        img = nn.functional.normalize(img.float(), dim=-1)
        txt = self.text_features(prompts)
        return self.model.logit_scale.exp().float() * (img * txt).sum(dim=-1)
