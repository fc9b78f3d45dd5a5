"""bench train: one step through the full trainer (loader, curriculum reshape, engine, logging) vs a bare
forward/backward/AdamW step of the same model on the same batch shape, in one process."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tape_pretrain.bench.loader import prepared_dataset
from tape_pretrain.bench.timing import format_result
from tape_pretrain.config import load_config, to_dict
from tape_pretrain.distributed.engine import lm_loss
from tape_pretrain.models import build_model
from tape_pretrain.train.resume import resolve_run_model_config


def run(steps: int = 12, warmup: int = 4) -> dict:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        url = prepared_dataset(tmp)
        overrides = [f"run_dir={tmp}/run", f"data.path={url}", f"data.cache_dir={tmp}/cache",
                     "model.preset=tiny", "trainer.seq_len=256", "trainer.global_batch_tokens=8192",
                     "trainer.micro_batch_size=8", f"trainer.max_steps={warmup + steps}", "trainer.log_interval=1",
                     "trainer.num_threads=2", "trainer.progress_bar=false", "parallel.engine=deepspeed",
                     f"parallel.zero_stage={1 if torch.cuda.is_available() else 0}",  # DeepSpeed refuses ZeRO-0 in bf16
                     "checkpoint.interval=0", "trainer.eval_interval=0"]
        config = load_config(None, overrides)

        def trainer_step_time(name: str, *more: str) -> float:
            # each run in a process of its own: DeepSpeed keeps the first process group of a process
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(to_dict(load_config(None, [*overrides, f"run_dir={tmp}/{name}", *more]))))
            subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "train", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
            lines = [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            return statistics.median(r["step_time_s"] for r in lines if "loss" in r and r["step"] > warmup)

        trainer_step = trainer_step_time("run")
        document_step = trainer_step_time("document", "model.attention=document")
        mixture = ", ".join(f"{{path: {url}, name: {name}, weight: {w}}}" for name, w in (("a", 5), ("b", 3), ("c", 2)))
        mixture_step = trainer_step_time("mixture", "data.path=null", f"data.sources=[{mixture}]")

        from tape_pretrain.data.manifest import load_manifest

        manifest, _ = load_manifest(url)
        model = build_model(resolve_run_model_config(config, int(manifest.tokenizer["vocab_size"])))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, model.config.vocab_size, (32, 257))
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            for chunk in tokens.split(8):
                lm_loss(model(chunk[:, :-1]), chunk[:, 1:]).div(4).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        bare_step = statistics.median(times)
    print(f"trainer step {trainer_step * 1000:.1f} ms vs bare step {bare_step * 1000:.1f} ms "
          f"(tiny TAPE, 8192 tokens/step, DeepSpeed ZeRO-0, one process); model.attention=document "
          f"{document_step * 1000:.1f} ms, a 3-source mixture {mixture_step * 1000:.1f} ms")
    result = {"trainer_step_ms": trainer_step * 1000, "bare_step_ms": bare_step * 1000,
              "trainer_overhead": trainer_step / bare_step, "document_step_ms": document_step * 1000,
              "document_vs_causal": document_step / trainer_step, "mixture_step_ms": mixture_step * 1000,
              "mixture_vs_single": mixture_step / trainer_step}
    print(format_result(result))
    return result
