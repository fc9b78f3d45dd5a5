"""TAPE's layer-0 state is materialised: SDPA gets a value with real strides, and the result is exact."""

import torch

from tests.models.test_tape_properties import tape_model


def test_initial_state_is_contiguous_and_a_stride_0_state_gives_the_same_training():
    model = tape_model()  # float64, non-zero update weights: the attention-side update moves the state
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    state = model.positional.initial_state(2, 24, ids.device, torch.float64)
    assert state.is_contiguous() and 0 not in state.stride()
    expanded = state[:1, :1].expand_as(state)  # the stride-0 form that used to reach SDPA as its value
    assert expanded.stride()[:2] == (0, 0) and torch.equal(expanded, state)

    def loss_and_grads(initial_state):
        model.zero_grad()
        loss = model(ids, initial_state=initial_state).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(None)
    loss_expanded, grads_expanded = loss_and_grads(expanded)
    assert torch.equal(loss, loss_expanded)
    assert grads.keys() == grads_expanded.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_expanded[name]), name
