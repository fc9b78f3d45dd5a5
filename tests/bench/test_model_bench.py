"""`bench model --tape-attention both` times TAPE in each attention form beside RoPE, in one run."""

import math

from tape_pretrain.bench import model


def test_bench_model_times_both_tape_attention_forms(capsys):
    result = model.run(preset="tiny", seq_len=32, repeats=1, warmup=0, tape_attention="both")
    forms = ("tape_two_calls", "tape_one_call")
    assert set(result) == {f"{name}_ms" for name in (*forms, "rope", "tape")} | {
        f"ratio_{name}_over_rope" for name in (*forms, "tape")}
    assert all(math.isfinite(v) and v > 0 for v in result.values()), result
    assert result["tape_ms"] == result["tape_one_call_ms"]  # what auto picks on the CPU at this length
    assert "auto picks one_call on cpu" in capsys.readouterr().out


def test_bf16_step_trains_fp32_masters_and_refreshes_the_bf16_copy():
    """On a GPU bench model computes as the engines do: a bf16 copy runs forward and backward, fp32 masters step."""
    import torch

    step = model.make_step("tape", "tiny", 32, 2, torch.device("cpu"), torch.bfloat16)
    closure = {name: cell.cell_contents for name, cell in zip(step.__code__.co_freevars, step.__closure__)}
    low = closure["model"]  # the bf16 copy the step runs
    masters = {id(copy): master for copy, master in closure["pairs"]}
    before = {id(copy): master.detach().clone() for copy, master in closure["pairs"]}
    step()
    for name, copy in low.named_parameters():
        master = masters[id(copy)]
        assert master.dtype == torch.float32 and copy.dtype == torch.bfloat16 and copy.grad is None
        assert torch.equal(copy, master.to(torch.bfloat16)), name  # refreshed from the stepped master
        assert torch.equal(master, before[id(copy)]) != master.requires_grad, name  # trainable ones moved
