"""distill/checkpointing.py: block-wise gradient checkpointing where diffusers has no switch (UNet3D), plain and
under LoRA adapters: the same gradients, recomputed blocks, nothing recomputed without autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.checkpointing import checkpointed_blocks, enable_gradient_checkpointing
from tests.distill.test_distill_blocks import tiny_unet3d


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    # UNet3D layout: (B, C, T, h, w)
    return torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([700, 100]), torch.randn(2, 6, 24, generator=g)


def _count_calls(model):
    """Calls of each block's first leaf module (the recomputation calls the block's inner forward, not its hooks)."""
    calls = {"n": 0}
    for b in checkpointed_blocks(model):
        leaf = next(m for m in b.modules() if not list(m.children()))
        leaf.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _grads(model, x, t, enc):
    """Gradients of a train-mode call (UNet3D's temporal convolutions have dropout: the same seed, the same masks;
    the recomputation restores the RNG state)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    out = model(x, t, encoder_hidden_states=enc).sample
    out.pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, out.detach()


def test_unet3d_blocks_are_checkpointed_with_the_same_gradients():
    ref_model, model = tiny_unet3d().train(), tiny_unet3d().train()
    assert not getattr(model, "_supports_gradient_checkpointing", False)  # diffusers has no switch for it
    x, t, enc = _inputs()
    ref, ref_out = _grads(ref_model, x, t, enc)
    assert enable_gradient_checkpointing(model) == "blocks"
    calls = _count_calls(model)
    got, out = _grads(model, x, t, enc)
    n_blocks = len(checkpointed_blocks(model))
    assert n_blocks == 1 + 2 + 1 + 2  # transformer_in, 2 down, mid, 2 up
    assert calls["n"] == 2 * n_blocks  # every block ran again in the backward pass
    torch.testing.assert_close(out, ref_out)
    assert got.keys() == ref.keys() and len(got) > 10
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    calls["n"] = 0
    with torch.no_grad():
        model(x, t, encoder_hidden_states=enc)
    assert calls["n"] == n_blocks  # no autograd: no checkpoint, no recompute


def test_lora_adapter_is_restored_when_a_block_is_recomputed():
    """The backward of the student's call recomputes its blocks with the student adapter even if another role's
    adapter is active by then (LoraBase._checkpoint as checkpoint_fn)."""
    from distill.lora import LoraBase

    x, t, enc = _inputs(1)
    grads = {}
    for ckpt in (False, True):
        base = LoraBase(tiny_unet3d().train(), rank=2, alpha=2)
        student, other = base.add("student"), base.add("other")
        torch.manual_seed(3)
        with torch.no_grad():  # non-trivial adapters (lora_B starts at 0)
            for _, p in list(base.named("student")) + list(base.named("other")):
                p.add_(0.1 * torch.randn_like(p))
        if ckpt:
            assert base.enable_gradient_checkpointing() == "blocks"
        torch.manual_seed(11)  # dropout masks (train mode) as in the other run
        loss = student(x, t, encoder_hidden_states=enc).sample.pow(2).mean()
        with base.active("other"):  # another role's forward in between; then the backward runs under "other"
            other(x, t, encoder_hidden_states=enc)
            loss.backward()
        grads[ckpt] = {k: p.grad.clone() for k, p in base.named("student")}
        assert not any(p.grad is not None for _, p in base.named("other"))
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-6)


def test_a_network_without_blocks_is_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing: false"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
