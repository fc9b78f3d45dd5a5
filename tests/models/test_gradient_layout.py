"""The attention output hands its gradient on in its own memory layout (the cuDNN SDPA backward workaround)."""

import pytest
import torch

from tape_pretrain.config import POSITIONAL_NAMES, ModelConfig, PositionalConfig, RunConfig
from tape_pretrain.distributed.engine import lm_loss
from tape_pretrain.models import build_model
from tape_pretrain.models import positional_base as base
from tape_pretrain.models.positional_base import _GradientInOutputLayout, gradient_in_output_layout


def test_gradient_reaches_the_kernel_in_the_output_layout():
    out = torch.randn(2, 3, 5, 4, requires_grad=True)  # [B,H,N,D], contiguous as SDPA returns it
    seen = {}
    out.register_hook(lambda g: seen.setdefault("grad", g))
    y = _GradientInOutputLayout.apply(out)
    upstream = torch.randn(2, 5, 3, 4)
    # the model's o_proj input: [B,N,H*D] from a transpose, so d(out) arrives with [B,N,H,D] strides
    (y.transpose(1, 2).reshape(2, 5, 12) * upstream.reshape(2, 5, 12)).sum().backward()
    assert seen["grad"].stride() == out.stride()
    torch.testing.assert_close(seen["grad"], upstream.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out.grad, upstream.transpose(1, 2), rtol=0, atol=0)


def test_only_cuda_outputs_that_need_a_gradient_are_wrapped():
    cpu = torch.randn(2, 2, requires_grad=True)
    assert gradient_in_output_layout(cpu) is cpu  # the CPU kernels read any layout: no copy
    frozen = torch.randn(2, 2)
    assert gradient_in_output_layout(frozen) is frozen


def test_an_output_laid_out_as_heads_last_gets_its_gradient_in_that_layout():
    """The flash and memory-efficient kernels return [B,H,N,D] with [B,N,H,D] memory: not simply contiguous."""
    out = torch.randn(2, 5, 3, 4).transpose(1, 2).requires_grad_()  # [B,H,N,D] view of [B,N,H,D] memory
    seen = {}
    out.register_hook(lambda g: seen.setdefault("grad", g))
    upstream = torch.randn(2, 3, 5, 4)  # contiguous [B,H,N,D]: unlike out
    (_GradientInOutputLayout.apply(out) * upstream).sum().backward()
    assert seen["grad"].stride() == out.stride()
    torch.testing.assert_close(seen["grad"], upstream, rtol=0, atol=0)


@pytest.mark.parametrize("name", POSITIONAL_NAMES)
def test_every_attention_call_of_every_encoding_goes_through_the_layout_fix(name, monkeypatch):
    """With the fix forced on (it runs on CUDA only), each SDPA call's output passes through it once, and the
    model's loss and gradients are unchanged (it is an identity)."""
    torch.manual_seed(0)
    config = ModelConfig(preset=None, vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, ffn_hidden_size=64,
                         max_seq_len=40, positional=PositionalConfig(name=name, tape_attention="two_calls"))
    model = build_model(config).eval()  # eval: RandPE's positions are the same draw in both passes
    ids = torch.randint(0, 64, (2, 41))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = loss_and_grads()
    calls = {"sdpa": 0, "fix": 0}
    sdpa, apply = torch.nn.functional.scaled_dot_product_attention, _GradientInOutputLayout.apply

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_apply(out):
        calls["fix"] += 1
        return apply(out)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(_GradientInOutputLayout, "apply", counting_apply)
    monkeypatch.setattr(base, "needs_gradient_layout", lambda out: out.requires_grad)
    fixed = loss_and_grads()
    assert calls["sdpa"] >= config.num_layers and calls["fix"] == calls["sdpa"], calls
    torch.testing.assert_close(fixed[0], plain[0], rtol=0, atol=0)
    for key, grad in plain[1].items():
        torch.testing.assert_close(fixed[1][key], grad, rtol=0, atol=0)


def test_trainer_switches_cudnn_attention_as_configured(monkeypatch):
    from tape_pretrain.train.trainer import configure_kernels

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", chosen.append)
    config = RunConfig()
    configure_kernels(config)
    config.trainer.cudnn_attention = True
    configure_kernels(config)
    assert chosen == [False, True]
