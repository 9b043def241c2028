"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the distillation trainer's trained networks.

``shard(model, mesh)`` makes one FSDP unit per diffusers block (``down_blocks`` / ``mid_block`` / ``up_blocks`` of
the UNets, ``transformer_blocks`` / ``single_transformer_blocks`` of the transformers) and one for the rest, so a
forward all-gathers one block's parameters at a time. Every call of a sharded network is a collective: all ranks
must make the same calls in the same order.

Checkpoints stay in the single-process format (full tensors, optimizer states keyed by parameter index):
``full_state`` / ``full_optim_state`` gather them on every rank (rank 0 receives the tensors), ``ShardedLoad`` /
``ShardedOptimLoad`` give ``lrm.checkpoint.load_training_state`` objects whose ``load_state_dict`` scatters a full
state back into the shards. A run saved under FSDP resumes in one process, under DDP or under FSDP, and back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def shard(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (one unit per block, then the root); returns it."""
    from torch.distributed.fsdp import fully_shard

    for name in BLOCK_LISTS:
        for block in getattr(model, name, None) or []:
            fully_shard(block, mesh=mesh)
    if isinstance(getattr(model, "mid_block", None), nn.Module):
        fully_shard(model.mid_block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Free the all-gathered parameters of every unit of ``model``: a root unit keeps them after a forward that
    had no backward (e.g. the CD target's), and its parameters then read as plain tensors, not shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Gradient accumulation: ``False`` keeps this micro-batch's gradients local (no reduce-scatter)."""
    model.set_requires_gradient_sync(sync)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. the total norm ``clip_grad_norm_`` returns over sharded gradients)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class _Fixed:
    """What ``save_training_state`` calls ``state_dict()`` on: an already gathered state."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state(model: nn.Module) -> _Fixed:
    """Collective: the full (unsharded) state dict of ``model``, on rank 0 (CPU); other ranks get ``{}``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _Fixed(get_model_state_dict(model, options=_options(cpu_offload=True)))


def _fqn_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Per param group, the parameter names in the optimizer's order (what torch numbers 0, 1, ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> _Fixed:
    """Collective: the optimizer's full state in ``optimizer.state_dict()``'s format (states keyed by parameter
    index), on rank 0 (CPU); other ranks get an empty state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not osd.get("state") and not osd.get("param_groups"):
        return _Fixed({"state": {}, "param_groups": []})
    index, groups = {}, []
    for order, group in zip(_fqn_order(model, optimizer), osd["param_groups"]):
        ids = []
        for name in order:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    state = {index[name]: st for name, st in osd["state"].items()}
    return _Fixed({"state": state, "param_groups": groups})


class ShardedLoad:
    """``load_state_dict(full)`` scatters a full state dict into the sharded ``model`` (every rank)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        device = next(self.model.parameters()).device
        set_model_state_dict(self.model, {k: v.to(device) for k, v in state.items()}, options=_options())


class ShardedOptimLoad:
    """``load_state_dict(sd)`` with ``sd`` in ``optimizer.state_dict()``'s format (every rank)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        order = _fqn_order(self.model, self.optimizer)
        if [len(g["params"]) for g in sd["param_groups"]] != [len(o) for o in order]:
            raise ValueError("the checkpoint's optimizer has other parameter groups than this run's "
                             f"({[len(g['params']) for g in sd['param_groups']]} vs {[len(o) for o in order]} "
                             "parameters); resume with the same model and losses")
        device = next(self.model.parameters()).device
        name = {i: n for o, g in zip(order, sd["param_groups"]) for i, n in zip(g["params"], o)}
        state = {name[int(i)]: {k: (v.to(device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                                for k, v in st.items()} for i, st in sd["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": o}
                  for o, g in zip(order, sd["param_groups"])]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                 options=_options())


__all__ = ["full_optim_state", "full_state", "full_tensor", "reshard", "set_gradient_sync", "shard",
           "ShardedLoad", "ShardedOptimLoad"]
