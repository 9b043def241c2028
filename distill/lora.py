"""LoRA (peft) for the student trainers: ONE frozen base network in memory, named adapters on it, and a view per role.

``LoraBase`` injects peft LoRA adapters into a diffusers network (``model.add_adapter``, as diffusers' LoRA training
scripts do) and switches between them; an ``AdapterView`` is the ``nn.Module`` a ``Denoiser`` wraps for one role:

  role                         view                    evaluated as
  teacher (distill)            ``view(None)``          the base with every adapter disabled
  student                      ``view("student")``     base + student adapter (trained)
  fake score (VSD / TDM)       ``view("fake")``        base + fake adapter (trained by its own optimizer)
  CD EMA target theta^-        ``view("ema")``         base + an adapter whose weights are the EMA of the student's
  reference pi_ref (beta_kl)   ``view(None)``          the base with the student adapter disabled (= the init)

A view's forward activates its adapter (or none) for the duration of the call, so the roles never see each other's
state. A view's ``parameters()`` / ``state_dict()`` are its adapter's tensors only (the base view: the frozen base's),
so optimizers, gradient clipping, EMA updates and checkpoints see the adapters and never the base.

Gradient checkpointing: diffusers' block checkpointing with a checkpoint function that recomputes each block under the
adapter of its forward (the backward runs after other roles' calls). Limits: DDP / FSDP of the views and the GAN
term's feature hooks on the shared base are not wired; the trainers refuse them.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint

# diffusers' train_text_to_image_lora.py / train_dreambooth_lora*.py: the attention projections
DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# network class -> (diffusers LoRA loader mixin, its save_lora_weights prefix): what pipeline.load_lora_weights reads
_LOADERS = {
    "UNet2DConditionModel": ("StableDiffusionLoraLoaderMixin", "unet"),
    "UNet3DConditionModel": ("StableDiffusionLoraLoaderMixin", "unet"),
    "SD3Transformer2DModel": ("SD3LoraLoaderMixin", "transformer"),
    "FluxTransformer2DModel": ("FluxLoraLoaderMixin", "transformer"),
    "WanTransformer3DModel": ("WanLoraLoaderMixin", "transformer"),
    "CogVideoXTransformer3DModel": ("CogVideoXLoraLoaderMixin", "transformer"),
    "HunyuanVideoTransformer3DModel": ("HunyuanVideoLoraLoaderMixin", "transformer"),
}


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError("lora_rank > 0 needs peft: pip install 'peft>=0.21'") from err


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class LoraBase:
    """One frozen base network + named LoRA adapters (rank ``rank``, scale ``alpha / rank``) on ``target_modules``.
    The base's adapters are all disabled outside a view's call, so the bare network is still the base."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 target_modules: list[str] | None = None):
        _require_peft()
        from peft import LoraConfig

        self.model = model.requires_grad_(False)
        self.lora_config = LoraConfig(r=int(rank), lora_alpha=alpha or rank, lora_dropout=float(dropout),
                                      target_modules=list(target_modules or DEFAULT_TARGET_MODULES),
                                      init_lora_weights=True)  # A Kaiming, B = 0: every adapter starts at the base
        self.adapters: dict[str, bool] = {}  # name -> trainable
        self._layers: list[nn.Module] = []
        self._current: str | None = None

    def add(self, name: str, trainable: bool = True, init_from: str | None = None) -> "AdapterView":
        """Inject adapter ``name`` (a copy of ``init_from``'s weights, else peft's init: the base's output) and
        return its view."""
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already ({sorted(self.adapters)})")
        cfg = copy.deepcopy(self.lora_config)
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            if hasattr(self.model, "add_adapter"):  # diffusers' PeftAdapterMixin: records peft_config for the export
                self.model.add_adapter(cfg, adapter_name=name)
            else:
                inject_adapter_in_model(cfg, self.model, adapter_name=name)
        self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"lora_target_modules {list(self.lora_config.target_modules)} match no layer of "
                             f"{type(self.model).__name__}; name its attention projections (e.g. "
                             f"{DEFAULT_TARGET_MODULES})")
        self.adapters[name] = trainable
        if init_from is not None:
            src = dict(self.named(init_from))
            with torch.no_grad():
                for k, p in self.named(name):
                    p.copy_(src[k])
        self._fix_requires_grad()
        self._set(None)
        return AdapterView(self, name)

    def _fix_requires_grad(self) -> None:
        """peft's add / set_adapter toggle requires_grad; ours: base frozen, each adapter as added."""
        for k, p in self.model.named_parameters():
            p.requires_grad_(False)
            for name, trainable in self.adapters.items():
                if "lora_" in k and f".{name}." in k:
                    p.requires_grad_(trainable)

    def named(self, name: str | None) -> Iterator[tuple[str, nn.Parameter]]:
        """Adapter ``name``'s parameters, adapter name dropped (peft's state-dict keys); ``None``: the base's."""
        for k, p in self.model.named_parameters():
            if name is None:
                if "lora_" not in k:
                    yield k, p
            elif "lora_" in k and f".{name}." in k:
                yield k.replace(f".{name}.", "."), p

    def _set(self, name: str | None) -> None:
        if name == self._current:
            return
        for m in self._layers:  # peft's own switches also flip requires_grad: set the state only
            m._disable_adapters = name is None
            if name is not None:
                m._active_adapter = [name]
        self._current = name

    @contextlib.contextmanager
    def active(self, name: str | None, training: bool | None = None):
        """Adapter ``name`` (None: none) active inside the block (and the base in ``training`` mode, if given)."""
        prev, was = self._current, self.model.training
        self._set(name)
        if training is not None and training != was:
            self.model.train(training)
        try:
            yield
        finally:
            self._set(prev)
            if training is not None and training != was:
                self.model.train(was)

    def _checkpoint(self, block: nn.Module, *args: Any):
        """diffusers' block checkpointing with the adapter (and dropout mode) of the forward restored when the
        backward recomputes the block: by then another role's call may have switched the adapter."""
        state, training = self._current, self.model.training
        return torch.utils.checkpoint.checkpoint(
            block.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), self.active(state, training)))

    def enable_gradient_checkpointing(self) -> str:
        """``distill.checkpointing``: diffusers' switch or block-wise, recomputing under the forward's adapter."""
        from distill.checkpointing import enable_gradient_checkpointing

        return enable_gradient_checkpointing(self.model, self._checkpoint)

    def view(self, name: str | None) -> "AdapterView":
        return AdapterView(self, name)

    # ---- export ------------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=name)

    def save_diffusers(self, name: str, directory, fp16: bool = False) -> None:
        """Adapter ``name`` as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (the loader mixin's
        ``save_lora_weights``: ``unet.`` / ``transformer.`` keys + the LoraConfig as metadata), which the base's
        pipeline reads with ``load_lora_weights(directory)``."""
        import diffusers

        sd = {k: (v.half() if fp16 else v).detach().cpu().contiguous()
              for k, v in self.adapter_state_dict(name).items()}
        meta = self.model.peft_config[name].to_dict() if hasattr(self.model, "peft_config") else None
        if meta is not None:
            meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        cls_name = type(self.model).__name__
        if cls_name not in _LOADERS:
            self.model.save_lora_adapter(directory, adapter_name=name)  # the model's own format, no pipeline prefix
            return
        mixin, prefix = _LOADERS[cls_name]
        getattr(diffusers.loaders, mixin).save_lora_weights(
            directory, **{f"{prefix}_lora_layers": sd, f"{prefix}_lora_adapter_metadata": meta},
            weight_name=LORA_WEIGHT_NAME, safe_serialization=True)

    def merged(self, name: str) -> nn.Module:
        """A copy of the base with adapter ``name`` fused into its weights and the LoRA layers removed."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = copy.deepcopy(self.model)
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    child._disable_adapters = False
                    child.merge(adapter_names=[name])
                    setattr(parent, child_name, child.get_base_layer())
        model.__dict__.pop("peft_config", None)  # a plain diffusers network again
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False
        return model


def lora_base(cfg: Any, model: nn.Module) -> LoraBase:
    """``LoraBase`` on ``model`` from a ``ShellConfig``'s ``lora_*`` keys."""
    return LoraBase(model, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_dropout, cfg.lora_target_modules)


def role(denoiser: nn.Module, view: "AdapterView", parameterization: str | None = None) -> nn.Module:
    """A shallow copy of ``denoiser`` (schedule, null caption, flags) around ``view`` instead of its network,
    optionally with another parameterisation (the heterogeneous student predicts x0)."""
    out = copy.copy(denoiser)
    out._modules = dict(denoiser._modules)
    out._modules["model"] = view
    if parameterization is not None:
        out.parameterization = parameterization
    return out


def is_lora_student(path: Any) -> bool:
    """A ``student/`` folder written with ``lora_rank > 0`` (and no merge_lora): adapter + ``student.json``."""
    from pathlib import Path

    p = Path(str(path))
    return (p / LORA_WEIGHT_NAME).is_file() and (p / "student.json").is_file()


def load_lora_student(path: Any, build_base: Any) -> nn.Module:
    """The ``Denoiser`` of a LoRA ``student/`` folder: ``build_base(student.json's lora.base)`` (the network the
    adapter was trained on: a teacher name / directory, or itself a LoRA student, loaded the same way) with the
    adapter fused into its weights (diffusers' ``load_lora_adapter`` + ``fuse_lora``), and the student's
    parameterisation. ``lrm finetune --teacher runs/.../student`` starts from it."""
    from pathlib import Path

    from lrm.io import read_json

    path = Path(str(path))
    meta = read_json(path / "student.json").get("lora") or {}
    base_path = meta.get("base_path")
    if not base_path:
        raise ValueError(f"{path / 'student.json'} names no base network (lora.base_path): written before LoRA "
                         "exports recorded it; pass the teacher it was trained on, or export with merge_lora: true")
    den = load_lora_student(base_path, build_base) if is_lora_student(base_path) else build_base(base_path)
    model = den.model
    prefix = _LOADERS.get(type(model).__name__, (None, None))[1]
    model.load_lora_adapter(str(path), weight_name=LORA_WEIGHT_NAME, prefix=prefix, adapter_name="student")
    model.fuse_lora(adapter_names=["student"])
    model.unload_lora()
    den.parameterization = meta.get("denoiser", {}).get("parameterization", den.parameterization)
    return den


class AdapterView(nn.Module):
    """The base network as one role sees it: forward with adapter ``adapter`` active (None: all disabled);
    ``parameters()`` / ``state_dict()`` hold that adapter's tensors (None: the base's), shared with the base."""

    def __init__(self, lora: LoraBase, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "_lora", lora)  # not a submodule: the base's tensors are not this view's
        self.adapter = adapter
        self.params = nn.ParameterDict({_key(k): p for k, p in lora.named(adapter)})

    @property
    def base(self) -> nn.Module:
        return self._lora.model

    def forward(self, *args: Any, **kwargs: Any):
        base = self._lora.model
        if base.training != self.training:  # lora_dropout: train in the student's / fake's calls, eval otherwise
            base.train(self.training)
        with self._lora.active(self.adapter):
            return base(*args, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Block checkpointing of the shared base that recomputes with the adapter of the forward."""
        self._lora.enable_gradient_checkpointing()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            lora = self.__dict__.get("_lora")
            if lora is None:
                raise
            return getattr(lora.model, name)  # config, dtype, ... of the base network


__all__ = ["AdapterView", "DEFAULT_TARGET_MODULES", "LORA_WEIGHT_NAME", "LoraBase", "is_lora_student",
           "load_lora_student", "lora_base", "role"]
