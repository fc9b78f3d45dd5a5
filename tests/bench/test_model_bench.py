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
