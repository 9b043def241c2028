"""Loading the original reward packages' code for parity tests and benchmarks (not used for scoring).

``image-reward`` 1.5 does not import as a whole with transformers >= 5: its ``__init__`` imports
``clip`` (undeclared) and its BLIP text model (``med.py``) uses transformers-4 helpers. ``load_imagereward``
loads the modules that scoring needs one by one from the installed package and adds the few pieces
transformers 5 dropped: ``apply_chunking_to_forward`` / ``prune_linear_layer`` (moved to
``transformers.pytorch_utils``), ``find_pruneable_heads_and_indices`` (removed; only head pruning used
it), and ``init_weights`` / ``invert_attention_mask`` / ``get_head_mask`` on med's ``BertModel``.
Install with ``make extras`` (``pip install --no-deps image-reward==1.5 fairscale==0.4.13``).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def imagereward_available() -> bool:
    return importlib.util.find_spec("ImageReward") is not None and importlib.util.find_spec("fairscale") is not None


def load_imagereward() -> types.SimpleNamespace:
    """The original ``med`` module, ``MLP``, ``ImageReward`` class, ``_transform`` and BLIP ``VisionTransformer``."""
    if not imagereward_available():
        raise ImportError("the original ImageReward code needs `pip install --no-deps image-reward==1.5 "
                          "fairscale==0.4.13` (or `make extras`)")
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    def head_pruning_removed(*a, **k):
        raise NotImplementedError("head pruning is not available with transformers >= 5")

    for n in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, n):
            setattr(mu, n, getattr(pu, n, head_pruning_removed))
    root = importlib.util.find_spec("ImageReward").submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", f"{root}/models")):
        if name not in sys.modules:  # namespace stand-ins: skip the package __init__ files
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
    import ImageReward.models.BLIP.med as med
    from ImageReward.ImageReward import MLP, ImageReward, _transform
    from ImageReward.models.BLIP.vit import VisionTransformer

    def invert_attention_mask(self, mask):
        e = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).float()
        return (1.0 - e) * torch.finfo(torch.float32).min

    med.BertModel.init_weights = lambda self: self.apply(self._init_weights)
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, n: [None] * n
    return types.SimpleNamespace(med=med, MLP=MLP, ImageReward=ImageReward, transform=_transform,
                                 VisionTransformer=VisionTransformer)


def build_original_imagereward(tokenizer, vision: dict, text: dict, image_size: int = 224) -> types.SimpleNamespace:
    """An object with exactly the attributes ``ImageReward.score`` reads (blip.{visual_encoder, text_encoder,
    tokenizer}, preprocess, mlp, mean, std, device), built from the original classes with random weights.

    ``vision``: VisionTransformer kwargs (patch_size, embed_dim, depth, num_heads); ``text``: med BertConfig
    kwargs. Returns it with ``.module`` (an nn.Module holding ``blip`` and ``mlp``, for its state dict) and
    ``.score(prompt, pil_image)`` bound to the package's own method.
    """
    orig = load_imagereward()
    blip = torch.nn.Module()
    blip.visual_encoder = orig.VisionTransformer(img_size=image_size, **vision)
    cfg = orig.med.BertConfig(add_cross_attention=True, encoder_width=vision["embed_dim"], **text)
    blip.text_encoder = orig.med.BertModel(cfg, add_pooling_layer=False)
    blip.tokenizer = tokenizer
    mlp = orig.MLP(cfg.hidden_size)
    module = torch.nn.Module()
    module.blip, module.mlp = blip, mlp
    module.eval()
    ns = types.SimpleNamespace(blip=blip, mlp=mlp, preprocess=orig.transform(image_size), device="cpu",
                               mean=0.16717362830052426, std=1.0333394966054072, module=module)
    ns.score = lambda prompt, image: orig.ImageReward.score(ns, prompt, image)
    return ns
