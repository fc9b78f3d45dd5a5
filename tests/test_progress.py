"""Progress of the long commands: a bar on a terminal, plain lines without carriage returns elsewhere; prep with a
total in bytes and an ETA, eval per length, export and the study per phase or run."""

import io
import re
import sys
from pathlib import Path

import pytest

from tape_pretrain.utils import progress as progress_module
from tape_pretrain.utils.progress import Phases, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_plain_lines_with_total_and_eta(monkeypatch):
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    stream = io.StringIO()
    bar = Progress("prep", total=4 << 20, unit="B", unit_scale=True, stream=stream)
    bar.update(1 << 20)
    bar.set_postfix(tokens="1,234")
    bar.update(3 << 20)
    bar.close("done")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert re.fullmatch(r"prep: 1\.00MB of 4\.00MB \(25%\), elapsed [\d.]+s, ETA [\d.]+s", lines[0]), lines[0]
    assert re.fullmatch(r"prep: 4\.00MB of 4\.00MB \(100%\), elapsed [\d.]+s, tokens 1,234", lines[1]), lines[1]
    assert lines[2:] == ["prep: done"]


def test_without_a_terminal_and_lines_off_only_the_summary_is_written():
    stream = io.StringIO()
    bar = Progress("eval 64", total=10, unit="window", lines=False, stream=stream)
    bar.update(10)
    bar.close("10 windows")
    assert stream.getvalue() == "eval 64: 10 windows\n"


def test_on_a_terminal_progress_is_a_bar():
    stream = Terminal()
    bar = Progress("eval 64", total=10, unit="window", delay_s=0, stream=stream)
    bar.update(4)
    bar.close("not written: the bar shows it")
    text = stream.getvalue()
    assert "\r" in text and "eval 64" in text and "10/10" not in text and "4/10" in text
    assert "not written" not in text


def test_disabled_progress_writes_nothing(monkeypatch):
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    for stream in (io.StringIO(), Terminal()):
        bar = Progress("prep", total=3, enabled=False, delay_s=0, stream=stream)
        bar.update(3)
        bar.close("done")
        assert stream.getvalue() == ""


def test_phases_are_a_line_each_with_its_duration():
    stream = io.StringIO()
    phases = Phases("export", stream=stream)
    phases.done("verified")
    phases.done("wrote out")
    assert re.fullmatch(r"export: verified \([\d.]+s\)\nexport: wrote out \([\d.]+s\)\n", stream.getvalue())


def test_prep_progress_counts_the_stored_bytes_of_the_inputs(tmp_path, corpus_dir, tokenizer_path, capsys,
                                                             monkeypatch):
    from tape_pretrain.data.prep import PrepOptions, prepare

    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    inputs = sorted(corpus_dir.glob("*.jsonl")) + sorted(corpus_dir.glob("*.txt"))
    total = sum(p.stat().st_size for p in inputs)
    prepare(PrepOptions(inputs=[str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")], tokenizer=tokenizer_path,
                        out=str(tmp_path / "ds"), shard_tokens=20_000, chunk_docs=4))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prep: ")]
    assert "\r" not in err and len(lines) > 3
    total_text = progress_module._amount(total, "B", True)
    assert all(f" of {total_text} (" in line for line in lines), lines[:3]
    assert "ETA" in lines[0] and re.search(r"\(100%\), elapsed [^,]+, documents [\d,]+, tokens [\d,]+$", lines[-1])


def test_eval_writes_one_line_per_length_without_a_terminal(dataset_path, tmp_path, capsys):
    from tape_pretrain.cli import main
    from tests.eval.test_eval import export_with_tokenizer

    export = export_with_tokenizer(dataset_path, tmp_path / "export")
    assert main(["eval", export, "--data", dataset_path, "--lengths", "32,64", "--max-tokens", "256",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("eval ")]
    assert len(lines) == 2 and lines[0].startswith("eval 32: 8 windows, 256 tokens, loss ")
    assert lines[1].startswith("eval 64: 4 windows, 256 tokens, loss ")


def test_eval_draws_a_bar_per_length_on_a_terminal(dataset_path, tmp_path, monkeypatch):
    from tape_pretrain.data.cache import cache_split
    from tape_pretrain.data.loader import TokenWindows
    from tape_pretrain.data.manifest import load_manifest
    from tape_pretrain.eval.perplexity import perplexity
    from tests.eval.test_eval import small_model

    manifest, fp = load_manifest(dataset_path)
    windows = TokenWindows(cache_split(dataset_path, manifest, fp, "val", str(tmp_path)), manifest.dtype, 32)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    real_init = progress_module.Progress.__init__

    def shown_at_once(self, *args, **kwargs):  # a bar shows after a delay; this evaluation is quicker than it
        real_init(self, *args, **{**kwargs, "delay_s": 0})

    monkeypatch.setattr(progress_module.Progress, "__init__", shown_at_once)
    perplexity(small_model(), windows, max_tokens=32 * 6, batch_size=2, device="cpu", progress=True)
    text = terminal.getvalue()
    assert "\r" in text and "eval 32" in text and "6/6" in text and "windows," not in text


@pytest.mark.slow
def test_export_writes_a_line_per_phase(tmp_path, dataset_path, capsys):
    from tape_pretrain.cli import main
    from tests.helpers import run, train_command, write_config

    config = write_config(tmp_path / "run.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 2})
    run(train_command(0, config))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 0
    captured = capsys.readouterr()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    phases = [line for line in captured.err.splitlines() if line.startswith("export: ")]
    assert [re.sub(r" \([\d.]+s\)$", "", line) for line in phases] == [
        f"export: verified the checkpoint {step}", "export: consolidated the deepspeed checkpoint of 1 rank(s)",
        f"export: wrote {tmp_path / 'x'}"]
    assert re.search(r"\(step 2, deepspeed, 1 rank\(s\)\) to .* in [\d.]+s$", captured.out.strip())
    assert (Path(tmp_path) / "x" / "model.safetensors").is_file()
    # a failing phase writes no line of its own: its error is the only one
    (step / "files.json").write_text("[1]")
    assert main(["export", str(step), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
