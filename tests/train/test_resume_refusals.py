"""Resume refusals: a checkpoint resumed with another model shape or encoding, global batch, curriculum or engine
is refused with an error naming the change, and (except the engine, whose checkpoint format differs) let through
by the matching `checkpoint.allow_changes` entry.

One real checkpoint is written by a tiny run; two changes go end to end through the CLI, the rest through
`check_resume_compatible` fed with that checkpoint's trainer_state.json and `resume_identity` of the changed
config -- the same two functions the Trainer uses to save and to check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tape_pretrain.config import ConfigError, load_config
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.errors import CheckpointError
from tape_pretrain.train.checkpoint import TRAINER_STATE, step_dir_name
from tape_pretrain.train.resume import check_resume_compatible, resume_identity
from tests.helpers import metrics, run, train_command, write_config

STEPS = 2  # the checkpoint's step
WAIVABLE = {"model", "data", "batch", "curriculum"}  # what checkpoint.allow_changes accepts


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, dataset_path) -> Path:
    """A run directory holding one real checkpoint at step STEPS (DeepSpeed ZeRO-2, one plain process)."""
    root = tmp_path_factory.mktemp("refusals")
    config = write_config(root / "config.yaml", dataset_path, root / "run", **{
        "trainer.max_steps": STEPS, "checkpoint.interval": STEPS})
    run(train_command(0, config), timeout=240)
    assert (root / "run" / "checkpoints" / step_dir_name(STEPS) / "COMPLETE").exists()
    return root


def copy_run(checkpointed: Path, tmp_path: Path, dataset_path: str) -> Path:
    """A private copy of the checkpointed run (a resume writes into it) and a config pointing at it."""
    shutil.copytree(checkpointed / "run", tmp_path / "run")
    return write_config(tmp_path / "config.yaml", dataset_path, tmp_path / "run", **{
        "trainer.max_steps": STEPS, "checkpoint.interval": STEPS, "data.cache_dir": str(checkpointed / "cache")})


def assert_refused(result, *fragments: str) -> None:
    """Exit status 2 and one clear `error:` line last on stderr that names the change, no traceback."""
    assert result.returncode == 2, f"expected a refusal, got {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, last


# -- end to end, through the CLI ----------------------------------------------------------------------------------


def test_changed_model_shape_is_refused_by_the_cli(tmp_path, checkpointed, dataset_path):
    config = copy_run(checkpointed, tmp_path, dataset_path)
    result = run(train_command(0, config, "model.num_layers=3", "trainer.max_steps=4"), check=False, timeout=180)
    assert_refused(result, "the checkpoint's model differs in num_layers",
                   "add 'model' to checkpoint.allow_changes if intended")
    assert max(metrics(tmp_path / "run")) == STEPS  # the refused attempt wrote nothing
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [step_dir_name(STEPS)]


def test_a_shape_change_let_through_allow_changes_is_one_error(tmp_path, checkpointed, dataset_path):
    """allow_changes=[model] waives the check, but no engine can load 2 layers into 3: one error, not a traceback."""
    config = copy_run(checkpointed, tmp_path, dataset_path)
    result = run(train_command(0, config, "model.num_layers=3", "trainer.max_steps=4",
                               "checkpoint.allow_changes=[model]"), check=False, timeout=180)
    assert_refused(result, "cannot load this checkpoint into this run's model", "model.init_from")
    assert max(metrics(tmp_path / "run")) == STEPS


def test_changed_global_batch_is_refused_then_allowed_by_the_cli(tmp_path, checkpointed, dataset_path):
    config = copy_run(checkpointed, tmp_path, dataset_path)
    changed = ("trainer.global_batch_tokens=1024", "trainer.max_steps=4")
    assert_refused(run(train_command(0, config, *changed), check=False, timeout=180),
                   "the checkpoint used global_batch_tokens=2048 seq_len=64; this run differs",
                   "add 'batch' to checkpoint.allow_changes")

    allowed = run(train_command(0, config, *changed, "checkpoint.allow_changes=[batch]"), timeout=180)
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / step_dir_name(STEPS)} (step {STEPS}" in allowed.stdout
    steps = metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4]  # trained on from the checkpoint, not from scratch
    state = json.loads((tmp_path / "run" / "checkpoints" / step_dir_name(4) / TRAINER_STATE).read_text())
    assert state["global_batch_tokens"] == 1024 and state["step"] == 4


# -- every change, through the check the Trainer runs --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_state(checkpointed) -> dict:
    return json.loads((checkpointed / "run" / "checkpoints" / step_dir_name(STEPS) / TRAINER_STATE).read_text())


@pytest.fixture(scope="module")
def current(checkpointed, dataset_path):
    """The resume identity of the checkpointed run's config with some overrides, as the Trainer computes it."""
    manifest, _ = load_manifest(dataset_path)
    vocab_size = int(manifest.tokenizer["vocab_size"])

    def identity(*overrides: str) -> dict:
        return resume_identity(load_config(checkpointed / "config.yaml", list(overrides)), vocab_size)

    return identity


def test_unchanged_config_resumes(saved_state, current):
    """What the check compares is what the Trainer saved: the same config matches field for field."""
    identity = current()
    assert {k: saved_state[k] for k in identity} == identity
    check_resume_compatible(saved_state, identity, set())
    # run length and logging are no part of it (a paused run is resumed with a longer max_steps)
    check_resume_compatible(saved_state, current("trainer.max_steps=10", "trainer.log_interval=5"), set())
    # nor how TAPE's attention is computed (numerically the same model): not even recorded, so checkpoints written
    # before the option existed resume too
    assert "tape_attention" not in saved_state["model"]["positional"]
    for form in ("one_call", "two_calls"):
        check_resume_compatible(saved_state, current(f"model.positional.tape_attention={form}"), set())


CHANGES = {  # id: (overrides, the allow_changes entry that waives it, what the error says)
    "model-shape": (["model.num_layers=3"], "model", "the checkpoint's model differs in num_layers "),
    "model-width": (["model.hidden_size=128", "model.ffn_hidden_size=256"], "model",
                    "the checkpoint's model differs in ffn_hidden_size, hidden_size "),
    "encoding": (["model.positional.name=rope"], "model", "the checkpoint's model differs in positional.name "),
    "global-batch": (["trainer.global_batch_tokens=4096"], "batch",
                     "the checkpoint used global_batch_tokens=2048 seq_len=64; this run differs "
                     "(add 'batch' to checkpoint.allow_changes if intended)"),
    "curriculum": (["curriculum.warmup=linear", "curriculum.start_seq_len=32"], "curriculum",
                   "the checkpoint's curriculum differs from this run's "
                   "(add 'curriculum' to checkpoint.allow_changes if intended)"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_change_is_refused_unless_allowed(saved_state, current, checkpointed, change):
    overrides, entry, message = CHANGES[change]
    identity = current(*overrides)
    with pytest.raises(CheckpointError) as refused:
        check_resume_compatible(saved_state, identity, set())
    assert message in str(refused.value)
    if entry != "batch":
        assert f"(add '{entry}' to checkpoint.allow_changes if intended)" in str(refused.value)
    # the other entries do not waive it
    with pytest.raises(CheckpointError, match="checkpoint.allow_changes"):
        check_resume_compatible(saved_state, identity, WAIVABLE - {entry})
    # its own entry does, given from the command line as the CLI parses it
    config = load_config(checkpointed / "config.yaml", [*overrides, f"checkpoint.allow_changes=[{entry}]"])
    assert config.checkpoint.allow_changes == [entry]
    check_resume_compatible(saved_state, identity, set(config.checkpoint.allow_changes))


def test_changed_engine_is_refused_and_cannot_be_allowed(saved_state, current, checkpointed):
    identity = current("parallel.engine=fsdp2")
    for allowed in (set(), WAIVABLE):
        with pytest.raises(CheckpointError) as refused:
            check_resume_compatible(saved_state, identity, allowed)
        assert str(refused.value) == ("the checkpoint was written by deepspeed, this run uses fsdp2: "
                                      "export it and start with model.init_from")
    with pytest.raises(ConfigError, match=r"checkpoint.allow_changes: unknown check 'engine'"):
        load_config(checkpointed / "config.yaml", ["parallel.engine=fsdp2", "checkpoint.allow_changes=[engine]"])
