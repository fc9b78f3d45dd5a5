"""The attention output hands its gradient on in its own memory layout (the cuDNN SDPA backward workaround)."""

import torch

from tape_pretrain.models.positional.base import _GradientInOutputLayout, gradient_in_output_layout


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
