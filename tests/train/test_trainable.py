"""optim.trainable: what trains. The selection (presets and patterns, exactly the expected names; one ConfigError
per bad entry), real runs with TAPE's parameter-efficient preset on every engine (frozen parameters keep their initial
values bit for bit, trainable ones move, the optimizer holds nothing of the frozen ones, the offline consolidation
equals the live export), bitwise resume with a frozen backbone on 2 processes, and the refusal of a changed selection
on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tape_pretrain.config import ConfigError, ModelConfig, PositionalConfig, load_config
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import build_model
from tape_pretrain.train import trainable as trainable_module
from tape_pretrain.train.checkpoint import TRAINER_STATE, step_dir_name
from tape_pretrain.train.export import export_checkpoint
from tape_pretrain.train.resume import check_resume_compatible, resolve_run_model_config, resume_identity
from tape_pretrain.train.trainable import apply_trainable, trainable_names, with_trainable
from tape_pretrain.train.trainer import build_trainer
from tape_pretrain.utils.safe_load import deepspeed_safe_globals, load_dcp_metadata, weights_only_loading
from tests.helpers import metrics, run, train_command, write_config

LAYERS = 2
"""write_config's model: TAPE, 2 layers (the last layer's update weights are frozen by the model itself)."""


def tiny(name: str = "tape") -> torch.nn.Module:
    config = ModelConfig(preset=None, vocab_size=101, hidden_size=64, num_layers=LAYERS, num_heads=4,
                         ffn_hidden_size=128, max_seq_len=64, positional=PositionalConfig(name=name))
    with torch.device("meta"):
        return build_model(config)


def block(i: int, *parts: str) -> list[str]:
    return [f"layers.{i}.{part}.weight" for part in parts]


NORMS = [name for i in range(LAYERS) for name in block(i, "input_layernorm", "post_attention_layernorm")]
MLP_UPDATE = block(0, "positional.pe.x_proj", "positional.pe.up_proj", "positional.pe.down_proj")
TAPE_PRESET = {"embed_tokens.weight", "norm.weight", *NORMS, *MLP_UPDATE}
"""TAPE.md section 8's set on the 2-layer model: the last layer's MLP-side update is the model's own frozen one, and
post_attention_linear (gamma) stays at its zero init in every layer."""


# -- the selection ------------------------------------------------------------------------------------------------


def test_presets_and_patterns_select_exactly_the_expected_names():
    model = tiny()
    names = {name for name, _ in model.named_parameters()}
    last_layer_updates = {n for n in names if n.startswith(f"layers.{LAYERS - 1}.positional.")}
    assert len(last_layer_updates) == 4
    assert trainable_names(model, ["all"], model.config) == names - last_layer_updates
    assert trainable_names(model, ["tape"], model.config) == TAPE_PRESET
    assert trainable_names(model, ["layers.*.mlp.*"], model.config) == {
        *block(0, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), *block(1, "mlp.gate_proj", "mlp.up_proj",
                                                                          "mlp.down_proj")}
    # entries are a union; a pattern that also matches the model's frozen weights selects only the others
    assert trainable_names(model, ["tape", "lm_head.weight"], model.config) == TAPE_PRESET | {"lm_head.weight"}
    assert trainable_names(model, ["layers.*.positional.*"], model.config) == {
        *MLP_UPDATE, "layers.0.positional.post_attention_linear.weight"}
    assert trainable_names(model, ["*"], model.config) == names - last_layer_updates


BAD = {  # entries: the one error line
    "lora without adapters": (["lora"], "optim.trainable: [lora] leaves nothing trainable"),
    "unknown-preset": (["tape", "tapee"], "optim.trainable: unknown preset 'tapee' (presets: all, tape, lora; "),
    "no-match": (["layers.*.attn.*"], "optim.trainable: 'layers.*.attn.*' matches no parameter of this model "
                                      "(names look like 'embed_tokens.weight', "),
    "only-frozen": (["embed_tokens.*", f"layers.{LAYERS - 1}.positional.pe.*"],
                    f"optim.trainable: 'layers.{LAYERS - 1}.positional.pe.*' matches only parameters the model "
                    "keeps frozen"),
    "empty": ([], "optim.trainable is empty: nothing would train (the default is [all])"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_entry_is_one_config_error_naming_it(case):
    entries, message = BAD[case]
    model = tiny()
    with pytest.raises(ConfigError) as error:
        trainable_names(model, entries, model.config)
    assert str(error.value).startswith(message), str(error.value)


def test_tape_preset_needs_tape_and_nothing_trainable_is_refused(monkeypatch):
    rope = tiny("rope")
    with pytest.raises(ConfigError, match=r"^optim.trainable: the tape preset needs model.positional.name=tape, "
                                          r"not 'rope'$"):
        trainable_names(rope, ["tape"], rope.config)
    monkeypatch.setitem(trainable_module.PRESETS, "none", lambda model_config: [])
    with pytest.raises(ConfigError, match=r"^optim.trainable: \[none\] leaves nothing trainable$"):
        trainable_names(rope, ["none"], rope.config)


def test_config_takes_a_list_and_refuses_what_needs_no_model(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim: {lr: 0.001}\n")
    assert load_config(config).optim.trainable == ["all"]
    assert load_config(config, ["optim.trainable=[tape, lm_head.weight]"]).optim.trainable == ["tape", "lm_head.weight"]
    for override, message in (("optim.trainable=[]", "optim.trainable is empty"),
                              ("optim.trainable=[tapee]", "optim.trainable: unknown preset 'tapee'"),
                              ("optim.trainable=tape", "optim.trainable: expected a list")):
        with pytest.raises(ConfigError, match=message):
            load_config(config, [override])


def test_every_build_of_the_source_trains_the_selection_and_never_unfreezes():
    model = tiny()
    names = trainable_names(model, ["tape"], model.config)
    calls = []

    class Source:
        lazy = True

        @staticmethod
        def build(complete):
            calls.append(complete)
            return tiny()

        @staticmethod
        def initial_value(model, name, shape):
            return torch.zeros(shape)

    source = with_trainable(Source, names)
    assert source.lazy and source.initial_value is Source.initial_value
    for complete in (True, False):
        built = source.build(complete)
        assert {n for n, p in built.named_parameters() if p.requires_grad} == names
    assert calls == [True, False]
    everything = {name for name, _ in model.named_parameters()}
    apply_trainable(model, everything)  # the model's own frozen weights stay frozen
    assert not model.get_parameter(f"layers.{LAYERS - 1}.positional.pe.up_proj.weight").requires_grad


# -- real runs ----------------------------------------------------------------------------------------------------


ENGINES = {"zero1": ("deepspeed", 1, "fp32"), "zero2-bf16": ("deepspeed", 2, "bf16"), "zero3": ("deepspeed", 3, "fp32"),
           "fsdp2": ("fsdp2", 0, "fp32"), "ddp": ("ddp", 0, "fp32")}
STEPS = 3


def tape_run_config(directory: Path, dataset: str, engine: str, name: str | None = None, **overrides) -> Path:
    """The config ``directory``/NAME.yaml of run directory ``directory``/NAME (NAME: the engine's by default)."""
    engine_name, stage, precision = {**ENGINES, **RESUME_ENGINES}[engine]
    name = name or engine
    return write_config(directory / f"{name}.yaml", dataset, directory / name, **{
        "parallel.engine": engine_name, "parallel.zero_stage": stage, "trainer.precision": precision,
        "trainer.max_steps": STEPS, "optim.trainable": ["tape"], "trainer.global_batch_tokens": 1024, **overrides})


def initial_weights(config_path: Path) -> dict[str, torch.Tensor]:
    """The weights the run started from, built as the trainer builds them (the config's seed, then the model)."""
    config = load_config(config_path)
    manifest, _ = load_manifest(config.data.path)
    torch.manual_seed(config.seed)
    return build_model(resolve_run_model_config(config, int(manifest.tokenizer["vocab_size"]))).state_dict()


def export_weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in load_file(str(directory / "model.safetensors")).items()}


def optimizer_names(step_dir: Path, engine: str) -> set[str]:
    """The parameters a checkpoint holds optimizer state for: DCP's optim.state keys, or DeepSpeed's per-rank
    fp32 partitions (ZeRO-1/2 name every fragment; ZeRO-3's flat groups only count elements)."""
    engine_dir = step_dir / "engine"
    if engine in ("fsdp2", "ddp"):
        with open(engine_dir / ".metadata", "rb") as f:
            keys = load_dcp_metadata(f).state_dict_metadata
        return {key.removeprefix("optim.state.").rsplit(".", 1)[0] for key in keys if key.startswith("optim.state.")}
    names = set()
    for path in sorted((engine_dir / "engine").glob("*optim_states.pt")):
        with weights_only_loading(deepspeed_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        for mapping in state.get("param_slice_mappings", []):
            names |= set(mapping)
    return names


def assert_frozen_kept_and_trainable_moved(weights: dict, initial: dict, trainable: set[str]) -> None:
    assert set(weights) == set(initial)
    for name, value in initial.items():
        if name in trainable:
            assert not torch.equal(weights[name], value), f"{name} is trainable but did not change"
        else:
            assert torch.equal(weights[name], value), f"{name} is frozen but changed"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_path):
    """A one-process run of STEPS steps with optim.trainable=[tape] per engine, trained on first use (its config
    path; the run directory is beside it, named after the engine)."""
    workdir, done = tmp_path_factory.mktemp("trainable"), {}

    def get(engine: str) -> tuple[Path, str]:
        if engine not in done:
            config = tape_run_config(workdir, dataset_path, engine)
            done[engine] = config, run(train_command(0, config), timeout=240).stdout
        return done[engine]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_tape_preset_trains_only_its_parameters(trained, engine):
    config, out = trained(engine)
    run_dir = config.parent / engine
    initial = initial_weights(config)
    trained_count = sum(initial[name].numel() for name in TAPE_PRESET)
    frozen_count = sum(value.numel() for value in initial.values()) - trained_count
    assert f"optim.trainable [tape]: {trained_count:,} parameters train, {frozen_count:,} frozen" in out
    weights = export_weights(run_dir / "export")
    assert_frozen_kept_and_trainable_moved(weights, initial, TAPE_PRESET)
    step_dir = run_dir / "checkpoints" / step_dir_name(STEPS)
    if engine != "zero3":  # ZeRO-3's optimizer files hold flat partitions without names
        assert optimizer_names(step_dir, engine) == TAPE_PRESET
    # the offline consolidation through the engine fills what the checkpoint lacks from the run's initial weights
    export_checkpoint(str(step_dir), str(config.parent / f"{engine}-consolidated"))
    consolidated = export_weights(config.parent / f"{engine}-consolidated")
    assert set(consolidated) == set(weights)
    for name, value in consolidated.items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_frozen_parameters_are_not_in_the_optimizer(tmp_path, dataset_path, world_of_one, engine):
    config = load_config(tape_run_config(tmp_path, dataset_path, engine, **{"trainer.max_steps": 2}))
    trainer = build_trainer(config, world_of_one)
    trainer.run()
    module, optimizer = trainer.engine.module, trainer.engine.optimizer
    names = {id(param): name.removeprefix("module.") for name, param in module.named_parameters()}
    assert {name for name, param in module.named_parameters() if param.requires_grad} == {
        f"module.{n}" if engine == "ddp" else n for n in TAPE_PRESET}
    assert {names[id(param)] for group in optimizer.param_groups for param in group["params"]} == TAPE_PRESET
    assert {names[id(param)] for param in optimizer.state} == TAPE_PRESET


def test_a_changed_selection_on_resume_is_refused(trained, tmp_path):
    config, _ = trained("ddp")
    shutil.copytree(config.parent / "ddp", tmp_path / "ddp")
    moved = tmp_path / "c.yaml"
    moved.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "run_dir": str(tmp_path / "ddp")}))
    result = run(train_command(0, moved, "optim.trainable=[all]", f"trainer.max_steps={STEPS + 1}"), check=False,
                 timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: the checkpoint trained optim.trainable=[tape], this run asks for [all]: its optimizer "
                    "state would not fit; resume with the checkpoint's optim.trainable, or export it and start a new "
                    "run with model.init_from"), last
    assert max(metrics(tmp_path / "ddp")) == STEPS  # the refused attempt trained nothing
    # the same selection resumes, entries in any order; a checkpoint from before optim.trainable trained everything
    state = json.loads((tmp_path / "ddp" / "checkpoints" / step_dir_name(STEPS) / TRAINER_STATE).read_text())
    vocab_size = state["model"]["vocab_size"]
    identity = resume_identity(load_config(moved, ["optim.trainable=[tape, tape]"]), vocab_size)
    check_resume_compatible(state, identity, set())
    with pytest.raises(CheckpointError, match="optim.trainable"):  # never waived by checkpoint.allow_changes
        check_resume_compatible(state, resume_identity(load_config(moved, ["optim.trainable=[all]"]), vocab_size),
                                {"model", "data", "batch", "curriculum"})
    del state["trainable"]
    check_resume_compatible(state, resume_identity(load_config(moved, ["optim.trainable=[all]"]), vocab_size), set())
    with pytest.raises(CheckpointError, match=r"trained optim.trainable=\[all\], this run asks for \[tape\]"):
        check_resume_compatible(state, resume_identity(load_config(moved), vocab_size), set())


RESUME_ENGINES = {"fsdp2": ("fsdp2", 0, "fp32"), "zero2": ("deepspeed", 2, "fp32")}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", RESUME_ENGINES)
def test_a_frozen_backbone_resumes_bitwise_on_two_processes(tmp_path, dataset_path, engine):
    straight = tape_run_config(tmp_path, dataset_path, engine, "straight", **{"trainer.max_steps": 4})
    run(train_command(2, straight))
    paused = tape_run_config(tmp_path, dataset_path, engine, "paused", **{"trainer.max_steps": 4})
    run(train_command(2, paused, "trainer.stop_at_step=2"))
    assert optimizer_names(tmp_path / "paused" / "checkpoints" / step_dir_name(2), engine) == TAPE_PRESET
    out = run(train_command(2, paused)).stdout
    assert f"resumed from {tmp_path / 'paused' / 'checkpoints' / step_dir_name(2)} (step 2, saved by 2" in out
    reference, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "paused")
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss_hex"] == reference[step]["loss_hex"], step
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], step
    weights, want = export_weights(tmp_path / "paused" / "export"), export_weights(tmp_path / "straight" / "export")
    assert set(weights) == set(want)
    for name, value in want.items():
        assert torch.equal(weights[name], value), name
    assert_frozen_kept_and_trainable_moved(weights, initial_weights(paused), TAPE_PRESET)


def test_the_memory_plan_counts_only_what_trains():
    from tape_pretrain.memory_plan import plan_memory

    model = tiny()
    common = dict(engine="ddp", zero_stage=None, world_size=1, micro_batch_size=1, seq_len=64, precision="fp32")
    everything, tape = (plan_memory(model.config, trainable=t, **common) for t in (["all"], ["tape"]))
    total = sum(p.numel() for p in model.parameters())
    trained = sum(model.get_parameter(name).numel() for name in TAPE_PRESET)
    assert everything.parameters == tape.parameters == 4 * total
    assert (tape.gradients, tape.optimizer_states) == (4 * trained, 8 * trained)
    assert everything.optimizer_states > 8 * trained and tape.peak < everything.peak
