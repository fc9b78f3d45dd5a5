"""The trainer assembled from parts, in this process: a stop signal that arrives during the final step saves the
checkpoint before anything else (no evaluation, no export), and the resumed run then only exports."""

import json
import os
import signal

from tape_pretrain.config import load_config
from tape_pretrain.train.trainer import build_parts, build_trainer
from tests.helpers import write_config


def test_a_stop_signal_in_the_final_step_saves_before_anything_else(tmp_path, dataset_path, world_of_one):
    config = load_config(write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "parallel.engine": "ddp", "trainer.max_steps": 3, "trainer.eval_interval": 1, "checkpoint.interval": 0}))
    trainer = build_trainer(config, world_of_one)
    events = []
    optimizer_step, evaluate, save, export = (trainer.engine.optimizer_step, trainer.evaluate, trainer.checkpoints.save,
                                              trainer.write_export)

    def step(lr):
        if trainer.step == 2:  # the final step is under way
            os.kill(os.getpid(), signal.SIGTERM)
        return optimizer_step(lr)

    trainer.engine.optimizer_step = step
    trainer.evaluate = lambda windows: events.append(("evaluate", trainer.step)) or evaluate(windows)
    trainer.checkpoints.save = lambda *a, **k: events.append(("save", trainer.step)) or save(*a, **k)
    trainer.write_export = lambda: events.append(("export", trainer.step)) or export()
    trainer.run()
    assert events == [("evaluate", 1), ("evaluate", 2), ("save", 3)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by_signal"] and not summary["finished"] and summary["export"] is None
    assert trainer._watchdogs and all(w.finished.is_set() for w in trainer._watchdogs)  # the run's exit disarmed it

    resumed = build_trainer(config, world_of_one)
    assert resumed.step == 3
    resumed.write_export = lambda: events.append(("export", resumed.step)) or export()
    resumed.run()
    assert events[-1] == ("export", 3)


def test_parts_are_built_without_a_trainer(tmp_path, dataset_path, world_of_one):
    config = load_config(write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "parallel.engine": "ddp", "trainer.global_batch_tokens": 2048, "trainer.micro_batch_size": 4}))
    parts = build_parts(config, world_of_one)
    assert parts.grad_accum == 2048 // 64 // 4
    assert parts.model_config.vocab_size == int(parts.data.manifest.tokenizer["vocab_size"])
    assert parts.checkpoints.steps() == [] and parts.data.loader.windows_consumed == 0
