"""Studies: equal budgets per size, seed statistics in RESULTS.md, re-use only under the same config hash, the
SLURM array (resources, a port chosen on the node, signal forwarding and requeue), and a 2x2 grid end to end."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import matplotlib.image as mpimg
import pytest
import yaml

from tape_pretrain.config import POSITIONAL_NAMES, ConfigError, ModelConfig, PositionalConfig, RunConfig, from_dict
from tape_pretrain.models import build_model
from tape_pretrain.models.presets import resolve_model_config
from tape_pretrain.study.report import render_results, training_seconds
from tape_pretrain.study.runner import config_hash, plan_run, reuse_conflict, run_study, training_flops
from tape_pretrain.study.spec import SizeSpec, StudySpec, load_study
from tape_pretrain.study.stats import fit_power_law, mean_sd, paired_difference, t_quantile
from tape_pretrain.train.metrics import training_records
from tests.helpers import ROOT, base_env

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_hidden_size": 64}
TWO_LAYERS = dict(SMALL, num_layers=2)  # TAPE updates the positions in every layer but the last


def study_file(tmp_path, dataset_path, **changes):
    spec = {
        "name": "mini", "out_dir": str(tmp_path / "out"), "data_path": dataset_path,
        "base": {"model.preset": None, "trainer.seq_len": 32, "trainer.global_batch_tokens": 512,
                 "trainer.micro_batch_size": 8, "trainer.log_interval": 1, "trainer.num_threads": 1,
                 "trainer.progress_bar": False, "data.cache_dir": str(tmp_path / "cache"),
                 "parallel.engine": "fsdp2"},
        "encodings": ["rope", "tape"],
        "sizes": [{"name": "a", "model": SMALL},
                  {"name": "b", "model": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 96}}],
        "tokens_per_parameter": 0.0, "min_steps": 4, "final_loss_window": 2, "eval_multipliers": [1, 2],
        "eval_max_tokens": 2000, "nproc": 1,
    }
    spec.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- budgets -----------------------------------------------------------------------------------


def budget_spec(budget: str, **changes) -> StudySpec:
    base = {"model.preset": None, "trainer.seq_len": 32, "trainer.global_batch_tokens": 512}
    base.update(changes)
    return StudySpec(encodings=list(POSITIONAL_NAMES), sizes=[SizeSpec("a", dict(TWO_LAYERS))], seeds=[1],
                     tokens_per_parameter=20.0, budget=budget, base=base)


def budgets(spec: StudySpec, tmp_path) -> dict:
    return {run["encoding"]: plan_run(spec, run, tmp_path, "unused", 256) for run in spec.runs()}


def test_token_budget_is_the_sizes_rope_backbone_for_every_encoding(tmp_path):
    plans = budgets(budget_spec("tokens"), tmp_path)
    rope = build_model(resolve_model_config(ModelConfig(**TWO_LAYERS, preset=None, vocab_size=256, max_seq_len=32,
                                                        positional=PositionalConfig(name="rope"))))
    expected_steps = math.ceil(20.0 * rope.num_parameters() / 512)
    assert plans["tape"][1].parameters > rope.num_parameters()  # TAPE's own count would give it more steps
    for encoding, (config, budget) in plans.items():
        assert budget.backbone_parameters == rope.num_parameters(), encoding
        assert (budget.steps, budget.tokens) == (expected_steps, expected_steps * 512), encoding
        assert config["trainer"]["max_steps"] == expected_steps
    assert plans["rope"][1].non_embedding_parameters == rope.num_parameters() - 2 * 256 * 32


def test_flops_budget_matches_the_rope_run(tmp_path):
    tokens, flops = budgets(budget_spec("tokens"), tmp_path), budgets(budget_spec("flops"), tmp_path)
    target = flops["rope"][1].flops
    assert flops["rope"][1].steps == tokens["rope"][1].steps and target == tokens["rope"][1].flops
    for encoding, (_, budget) in flops.items():
        per_step = budget.flops / budget.steps
        assert abs(budget.flops - target) <= per_step / 2, encoding
    assert flops["tape"][1].steps < flops["rope"][1].steps  # TAPE spends more FLOPs per token
    assert flops["nope"][1].steps == flops["rope"][1].steps


def test_flops_budget_with_a_token_curriculum_is_within_half_a_step(tmp_path):
    """Phases fixed in tokens: the short-window phase is a larger share of a shorter run, so FLOPs per step depend
    on the step count and one division misses the target by steps."""
    phases = [{"seq_len": 16, "until_tokens": 150 * 512}, {"seq_len": 32}]
    plans = budgets(budget_spec("flops", **{"curriculum.phases": phases}), tmp_path)
    target = plans["rope"][1].flops
    for encoding, (_, budget) in plans.items():
        assert abs(budget.flops - target) <= budget.flops / budget.steps / 2, encoding


def test_training_flops_follow_the_curriculum(tmp_path):
    spec = budget_spec("tokens")
    config, budget = plan_run(spec, spec.runs()[1], tmp_path, "unused", 256)
    config["curriculum"] = {"phases": [{"seq_len": 16, "until_fraction": 0.5}, {"seq_len": 32}]}
    model = build_model(resolve_model_config(ModelConfig(**TWO_LAYERS, preset=None, vocab_size=256, max_seq_len=32,
                                                         positional=PositionalConfig(name="rope"))))
    expected = 3 * 512 * (5 * model.forward_flops_per_token(16) + 5 * model.forward_flops_per_token(32))
    assert training_flops(model, from_dict(RunConfig, config), 10) == pytest.approx(expected)


def test_a_variant_runs_its_positional_fields_on_the_sizes_rope_budget(tmp_path):
    spec = StudySpec(encodings=["rope", "tape-no-mlp"], variants={"tape-no-mlp": {"name": "tape",
                                                                                  "tape_mlp_update": False}},
                     sizes=[SizeSpec("a", dict(TWO_LAYERS))], seeds=[1], tokens_per_parameter=20.0,
                     base={"model.preset": None, "trainer.seq_len": 32, "trainer.global_batch_tokens": 512})
    plans = {run["encoding"]: plan_run(spec, run, tmp_path, "unused", 256) for run in spec.runs()}
    variant = from_dict(RunConfig, plans["tape-no-mlp"][0])
    assert (variant.model.positional.name, variant.model.positional.tape_mlp_update) == ("tape", False)
    assert variant.model.positional.tape_attention_update and plans["tape-no-mlp"][0]["run_dir"].endswith(
        "tape-no-mlp-a-s1")
    assert plans["tape-no-mlp"][1].steps == plans["rope"][1].steps
    assert plans["tape-no-mlp"][1].positional_parameters > 0


# ---- statistics --------------------------------------------------------------------------------


def test_t_quantile_and_power_law_fit():
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    paired = paired_difference({1: 1.0, 2: 2.0, 3: 5.0}, {2: 1.0, 3: 3.0, 4: 9.0})  # seeds 2 and 3: 1, 2
    assert (paired.n, paired.mean) == (2, 1.5) and paired.high == pytest.approx(1.5 + 12.7062 * 0.5, abs=1e-3)
    assert paired_difference({1: 1.0}, {2: 1.0}) is None
    n = [1e6, 3e6, 1e7, 3e7, 1e8]
    exact = fit_power_law(n, [1.8 + 400 * x**-0.35 for x in n])
    assert (exact.e, exact.a, exact.alpha) == (pytest.approx(1.8, abs=1e-6), pytest.approx(400, rel=1e-4),
                                               pytest.approx(0.35, abs=1e-6))
    noisy = fit_power_law(n, [1.8 + 400 * x**-0.35 + d for x, d in zip(n, (0.004, -0.003, 0.002, -0.004, 0.003))])
    assert noisy.e == pytest.approx(1.8, abs=0.05) and noisy.alpha == pytest.approx(0.35, abs=0.05)
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law(n[:3], [2.0, 1.9, 1.8])


def row(encoding, size, seed, val, ppl=None, n=10_000):
    return {"name": f"{encoding}-{size}-s{seed}", "encoding": encoding, "size": size, "seed": seed, "steps": 10,
            "tokens": 5120, "flops": 1e9, "parameters": 2 * n, "positional_parameters": 0, "backbone_parameters": 2 * n,
            "non_embedding_parameters": n, "train_loss": val + 0.5, "val_loss": val,
            "perplexity": {32: ppl if ppl is not None else math.exp(val)}, "curve": [], "train_seconds": 12.0}


def test_results_give_mean_sd_and_paired_t_interval():
    spec = StudySpec(encodings=["rope", "tape"], sizes=[SizeSpec("a")], seeds=[1, 2, 3], baseline="rope")
    rows = [row("rope", "a", 1, 3.0, 100.0), row("rope", "a", 2, 3.2, 110.0), row("rope", "a", 3, 3.4, 130.0),
            row("tape", "a", 1, 2.9, 90.0), row("tape", "a", 2, 3.0, 100.0), row("tape", "a", 3, 3.3, 125.0)]
    text = render_results(spec, rows)
    # rope val loss 3.0, 3.2, 3.4: mean 3.2, sample sd 0.2 (the population sd would be 0.1633)
    assert "| rope | a | 3 | 3.7000 ± 0.2000 | 3.2000 ± 0.2000 | 113.33 ± 15.28 |" in text
    # tape - rope per seed: -0.1, -0.2, -0.1 -> mean -0.1333, sd 0.05774, half width t(0.975, 2) * sd / sqrt(3)
    # = 4.3027 * 0.03333 = 0.1434 (z = 1.96 would give 0.0653); perplexity: -10, -10, -5 -> -8.33 +- 7.17
    assert "| tape | a | 3 | -0.1333 [-0.2768, 0.0101] | -0.1333 [-0.2768, 0.0101] | -8.33 [-15.50, -1.16] |" in text
    assert "| rope-a-s2 | rope | a | 2 | 20,000 | 0 | 10 | 5,120 | 1e+09 |" in text
    assert "No power-law fit" in text and "Power-law fit L" not in text


def test_results_with_one_seed_and_with_four_sizes():
    spec = StudySpec(encodings=["rope", "tape"], sizes=[SizeSpec(s) for s in "abcd"], seeds=[1], baseline="rope")
    n = {"a": 1e6, "b": 3e6, "c": 1e7, "d": 3e7}
    rows = [row(e, s, 1, 1.8 + 400 * n[s] ** -0.35 + (0.1 if e == "tape" else 0.0), n=int(n[s]))
            for e in ("rope", "tape") for s in "abcd"]
    text = render_results(spec, rows)
    assert "| rope | a | 1 | " in text and "(n=1)" in text
    assert "| tape | a | 1 | 0.1000 (n=1, no interval) | 0.1000 (n=1, no interval) |" in text
    assert "Power-law fit L = E + A·N^-α" in text and "- rope: E = 1.8000, A = 400, α = 0.3500" in text
    three = render_results(spec, [r for r in rows if r["size"] != "d"])
    assert "No power-law fit" in three and "needs at least 4 sizes (this study has 3" in three


def test_training_seconds_sum_the_logged_windows():
    records = [{"step": 2, "tokens": 1000, "tokens_per_s": 500.0}, {"step": 4, "tokens": 2000, "tokens_per_s": 250.0}]
    assert training_seconds(records) == pytest.approx(2.0 + 4.0)


def test_study_spec_errors(tmp_path):
    for change, message in (({"baseline": "fire"}, "study.baseline"), ({"seeds": [1, 1]}, "study.seeds"),
                            ({"slurm": {"signal": "B:KILL@60"}}, "study.slurm.signal"),
                            ({"slurm": {"signal": "B:TERM@60"}}, "study.slurm.signal"),  # SLURM's own on preemption
                            ({"name": "x\nscancel -u $USER"}, "study.name"), ({"name": ".."}, "study.name"),
                            ({"sizes": [{"name": "../a", "model": SMALL}]}, r"study.sizes\[0\].name"),
                            ({"sizes": [{"name": "a/b", "model": SMALL}]}, r"study.sizes\[0\].name"),
                            ({"slurm": {"time": "one day"}}, "study.slurm.time"),
                            ({"slurm": {"extra": ["--mem=1G; rm -rf ~"]}}, "study.slurm.extra"),
                            ({"encodings": ["rope", "tape-x"]}, "unknown encoding 'tape-x'"),
                            ({"variants": {"tape": {"name": "tape"}}}, "study.variants.tape"),
                            ({"variants": {"v": {"name": "tapes"}}}, "study.variants.v.name"),
                            ({"variants": {"v": {"name": "tape", "tape_mlp_updates": False}}},
                             "study.variants.v.tape_mlp_updates")):
        with pytest.raises(ConfigError, match=message):
            load_study(study_file(tmp_path, "unused", **change))


# ---- re-use ------------------------------------------------------------------------------------


def test_reuse_only_under_the_same_config_hash(tmp_path):
    spec = budget_spec("tokens")
    config, _ = plan_run(spec, spec.runs()[0], tmp_path, "unused", 256)
    digest, resolved = config_hash(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert reuse_conflict(run_dir, digest, resolved) is None  # nothing launched there yet
    (run_dir / "metrics.jsonl").write_text("")
    assert "without study_run.json" in reuse_conflict(run_dir, digest, resolved)
    older = json.loads(json.dumps(resolved))
    del older["trainer"]["progress_bar"]  # recorded before the code had this key: its default is what ran
    (run_dir / "study_run.json").write_text(json.dumps({"config_hash": "recorded-by-older-code", "config": older}))
    assert reuse_conflict(run_dir, digest, resolved) is None
    changed = json.loads(json.dumps(resolved))
    changed["trainer"]["max_steps"] += 1
    (run_dir / "study_run.json").write_text(json.dumps({"config_hash": config_hash(changed)[0], "config": changed}))
    steps = resolved["trainer"]["max_steps"]
    assert f"trainer.max_steps: {steps + 1} -> {steps}" in reuse_conflict(run_dir, digest, resolved)
    # the same config on a dataset prepared anew at the same URL: another dataset
    recorded_digest, recorded = config_hash(config, "manifest-sha-1")
    (run_dir / "study_run.json").write_text(json.dumps({"config_hash": recorded_digest, "config": recorded}))
    now_digest, now = config_hash(config, "manifest-sha-2")
    assert reuse_conflict(run_dir, recorded_digest, recorded) is None
    assert "dataset_fingerprint: 'manifest-sha-1' -> 'manifest-sha-2'" in reuse_conflict(run_dir, now_digest, now)


# ---- SLURM -------------------------------------------------------------------------------------

# The trainer as the batch script sees it: the first SIGTERM makes it save (for a second), a second one kills it
# unsaved, as in Trainer._install_signal_handlers; STUB_EXIT makes it exit at once with that status.
STUB = """#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {python} "$@"; fi
echo "args $* MASTER_PORT=$MASTER_PORT pid=$$" >> {log}
[ -z "${{STUB_EXIT:-}}" ] || exit "$STUB_EXIT"
terms=0
trap 'terms=$((terms + 1)); echo "got TERM $terms" >> {log}' TERM
while [ "$terms" = 0 ]; do sleep 0.05; done
sleep 1
[ "$terms" = 1 ] || {{ echo unsaved >> {log}; exit 143; }}
echo saved >> {log}
"""


def _wait_for(log, text, deadline):
    while text not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never logged: {log.read_text() if log.exists() else ''}"
        time.sleep(0.02)


def run_task(script, env, log, actions=()):
    """Array task 2 of ``script`` with the stubs; each action (target, signal, text to wait for) is sent to the
    batch shell or the trainer once the trainer runs. The task's exit status and the stubs' log."""
    log.unlink(missing_ok=True)
    task = subprocess.Popen(["bash", str(script)], env=env)
    deadline = time.monotonic() + 30
    _wait_for(log, "args", deadline)
    trainer = int(log.read_text().split("pid=")[1].split()[0])
    for target, sig, then in actions:
        os.kill(task.pid if target == "shell" else trainer, sig)
        _wait_for(log, then, deadline)
    return task.wait(timeout=30), log.read_text()


def test_slurm_array_directives_port_signal_and_requeue(tmp_path, dataset_path):
    path = study_file(tmp_path, dataset_path, launcher="slurm", nproc=2,
                      slurm={"time": "2:00:00", "signal": "B:USR1@90", "cpus_per_task": 6, "partition": "gpu"})
    root = run_study(str(path), [])
    script = (root / "study_array.sbatch").read_text()
    for directive in ("--array=0-3", "--gres=gpu:2", "--cpus-per-task=6", "--time=2:00:00", "--requeue",
                      "--signal=B:USR1@90", "--partition=gpu", "--nodes=1"):
        assert f"#SBATCH {directive}\n" in script
    subprocess.run(["bash", "-n", str(root / "study_array.sbatch")], check=True)
    assert "study_run.json" in os.listdir(root / "runs" / "rope-a-s1234")
    run_study(str(path), [])  # the same spec again: the recorded hashes match

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(STUB.format(python=sys.executable, log=log))
    # a failing scontrol must not replace the trainer's exit status
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\nexit 1\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = dict(base_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="77")
    sbatch = root / "study_array.sbatch"

    # near the time limit: SLURM sends USR1 to the batch shell; a TERM to the shell while the trainer saves is
    # neither forwarded nor the end of the wait
    status, calls = run_task(sbatch, env, log, [("shell", signal.SIGUSR1, "got TERM 1"),
                                                ("shell", signal.SIGTERM, "saved")])
    assert status == 0 and calls.count("got TERM") == 1 and "unsaved" not in calls
    port = calls.split("MASTER_PORT=")[1].split()[0]
    assert port.isdigit() and f"--rdzv-endpoint 127.0.0.1:{port} " in calls  # chosen on the node, at start
    assert "--shutdown-timeout 80 " in calls  # torchrun gives the workers the signal's lead time (less 10 s)
    assert "runs/tape-a-s1234/run.yaml" in calls  # array task 2: rope-a, rope-b, tape-a, tape-b
    assert "scontrol requeue 77_2" in calls

    # preemption or scancel: SLURM sends TERM to every process of the job; the trainer gets that one only
    status, calls = run_task(sbatch, env, log, [("shell", signal.SIGTERM, "args"), ("trainer", signal.SIGTERM,
                                                                                      "saved")])
    assert status == 0 and calls.count("got TERM") == 1 and "scontrol" not in calls

    status, calls = run_task(sbatch, dict(env, STUB_EXIT="5"), log)  # the trainer's status is the task's
    assert status == 5 and "scontrol" not in calls

    root = run_study(str(path), ["slurm.requeue=false", "slurm.gres=null"])
    script = (root / "study_array.sbatch").read_text()
    assert "#SBATCH --no-requeue\n" in script and "--gres" not in script
    status, calls = run_task(sbatch, env, log, [("shell", signal.SIGUSR1, "saved")])
    assert status == 0 and calls.count("got TERM") == 1 and "scontrol" not in calls

    spaced = study_file(tmp_path, dataset_path, launcher="slurm", out_dir=str(tmp_path / "out dir"))
    with pytest.raises(ConfigError, match="study.out_dir"):
        run_study(str(spaced), [])


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_runs_reuses_by_config_hash_and_reports(tmp_path, dataset_path, capfd):
    path = study_file(tmp_path, dataset_path)
    root = run_study(str(path), [])
    results = (root / "RESULTS.md").read_text()
    names = ("rope-a-s1234", "tape-a-s1234", "rope-b-s1234", "tape-b-s1234")
    for name in names:
        assert f"| {name} |" in results
    losses = [r["loss"] for _, r in sorted(training_records(root / "runs" / "tape-b-s1234").items())]
    assert "| tape-b-s1234 | tape | b | 1234 |" in results and f"| {sum(losses[-2:]) / 2:.4f} |" in results
    assert "ppl@32" in results and "ppl@64" in results and "No power-law fit" in results
    assert "(n=1, no interval)" in results
    for plot in ("loss_vs_tokens.png", "perplexity_vs_length.png", "loss_vs_parameters.png"):
        image = mpimg.imread(root / plot)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
    first = capfd.readouterr()
    for number, name in enumerate(("rope-a-s1234", "rope-b-s1234", "tape-a-s1234", "tape-b-s1234"), 1):
        assert f"study: run {number}/4 {name}: training (" in first.out
        assert re.search(rf"study: run {number}/4 {name}: done in [\d.]+s", first.out)
    assert first.err.count("eval 32: ") == first.err.count("eval 64: ") == 4 and "\r" not in first.err
    run_study(str(path), [])
    assert capfd.readouterr().out.count("already finished; skipped") == 4

    # another evaluation setting re-evaluates the same weights; it does not retrain
    run_study(str(path), ["eval_multipliers=[1]"])
    out = capfd.readouterr().out
    assert "training" not in out and "ppl@64" not in (root / "RESULTS.md").read_text()

    # a changed run config is neither re-used nor resumed, and nothing is deleted
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    changed = study_file(tmp_path, dataset_path, base={**yaml.safe_load(path.read_text())["base"], "optim.lr": 0.01})
    with pytest.raises(ConfigError, match=r"(?s)4 run\(s\).*rope-a-s1234.*optim\.lr: [0-9.e-]+ -> 0\.01"):
        run_study(str(changed), [])
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    (root / "runs" / "tape-a-s1234" / "study_run.json").unlink()  # a run whose config the study cannot know
    with pytest.raises(ConfigError, match="tape-a-s1234.*without study_run.json"):
        run_study(str(study_file(tmp_path, dataset_path)), [])


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_others_run(tmp_path, dataset_path):
    path = study_file(tmp_path, dataset_path, encodings=["rope"], baseline=None,
                      sizes=[{"name": "bad", "model": dict(SMALL, vocab_size=7)}, {"name": "a", "model": SMALL}])
    done = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "study", str(path)], env=base_env(),
                          capture_output=True, text=True, timeout=300)
    root = tmp_path / "out" / "mini"
    log = root / "runs" / "rope-bad-s1234" / "train.log"
    assert done.returncode == 1, done.stderr
    assert f"1 runs failed: rope-bad-s1234 (exit status 2; log: {log})" in done.stderr
    assert "Traceback" not in done.stderr and "model.vocab_size=7" in log.read_text()
    results = (root / "RESULTS.md").read_text()
    assert "1 of 2 runs finished" in results and "| rope-a-s1234 |" in results
    assert "## Failed runs" in results and "- rope-bad-s1234 (exit status 2" in results
    record = json.loads((root / "runs" / "rope-bad-s1234" / "study_run.json").read_text())
    assert record["failed"]["exit_status"] == 2


@pytest.mark.slow
def test_dry_run_prints_one_command_per_run(tmp_path, dataset_path):
    path = study_file(tmp_path, dataset_path)
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "study", str(path), "--dry-run"],
                         env=base_env(), capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.count("tape_pretrain.cli train") == 4


@pytest.mark.parametrize("study", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_load(study):
    spec = load_study(study)
    assert spec.runs()
    if study.name in ("pe_micro.yaml", "pe_paper_155m.yaml", "tape_ablation_micro.yaml"):
        assert len(spec.seeds) >= 3 and spec.baseline == "rope"
