"""The end-of-run export loads without an engine (RoPE in stock transformers) and eval computes
exp(mean token loss) on the same windows."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.eval.perplexity import perplexity
from tape_pretrain.train.export import load_export_model
from tests.helpers import run, train_command, write_config

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory, dataset_path):
    root = tmp_path_factory.mktemp("export")
    config = write_config(root / "rope.yaml", dataset_path, root / "run", **{
        "model.positional.name": "rope", "trainer.max_steps": 3})
    run(train_command(0, config))
    return root / "run"


def test_rope_export_loads_in_transformers(rope_run):
    transformers = pytest.importorskip("transformers")
    ours = load_export_model(str(rope_run / "export"))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(rope_run / "export")).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    assert (rope_run / "export" / "tokenizer.model").stat().st_size > 0


def test_perplexity_is_exp_of_the_mean_token_loss(rope_run, dataset_path, tmp_path):
    model = load_export_model(str(rope_run / "export"))
    manifest, fp = load_manifest(dataset_path)
    windows = TokenWindows(cache_split(dataset_path, manifest, fp, "val", str(tmp_path)), manifest.dtype, 32)
    result = perplexity(model, windows, max_tokens=32 * 5, batch_size=2, device="cpu")
    losses = []
    with torch.no_grad():
        for i in range(5):  # one window at a time, independently
            tokens = torch.from_numpy(windows.gather(np.array([i])))
            losses.append(F.cross_entropy(model(tokens[:, :-1])[0].float(), tokens[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(losses).double().mean().item())
    assert result["tokens"] == 5 * 32
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_eval_under_torchrun_equals_one_process(rope_run, dataset_path, tmp_path):
    """Two ranks each score every other window (sliding, stride 16) and all-reduce: the same tokens and loss."""
    import json
    import sys

    from tape_pretrain.distributed.env import free_port

    args = ["-m", "tape_pretrain.cli", "eval", str(rope_run / "export"), "--data", dataset_path,
            "--lengths", "32,64", "--stride", "16", "--max-tokens", "2000"]
    run([sys.executable, *args, "--out", str(tmp_path / "one")])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args, "--out", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    for length in ("32", "64"):
        assert two[length]["tokens"] == one[length]["tokens"] > 1000
        assert two[length]["loss"] == pytest.approx(one[length]["loss"], rel=1e-9)


def test_eval_of_a_checkpoint_equals_eval_of_its_export(rope_run, dataset_path, tmp_path):
    """A checkpoint step directory is consolidated through its engine on the fly; results land in RUN/eval/step_N,
    never inside the checkpoint, and equal the end-of-run export's (the last checkpoint is the final weights)."""
    import json

    from tape_pretrain.cli import main

    checkpoint = sorted((rope_run / "checkpoints").glob("step_*"))[-1]
    files_before = sorted(p.name for p in checkpoint.rglob("*"))
    options = ["--data", dataset_path, "--lengths", "32", "--max-tokens", "640"]
    main(["eval", str(checkpoint), *options])
    main(["eval", str(rope_run / "export"), *options, "--out", str(tmp_path / "export")])
    from_checkpoint = json.loads((rope_run / "eval" / checkpoint.name / "eval.json").read_text())
    from_export = json.loads((tmp_path / "export" / "eval.json").read_text())
    assert from_checkpoint["32"]["tokens"] == from_export["32"]["tokens"] == 640
    assert from_checkpoint["32"]["loss"] == pytest.approx(from_export["32"]["loss"], abs=1e-6)
    assert sorted(p.name for p in checkpoint.rglob("*")) == files_before
