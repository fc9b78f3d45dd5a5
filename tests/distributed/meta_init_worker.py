"""Run under torchrun by test_meta_init.py: every engine that builds the model itself (FSDP2 on the meta device,
ZeRO-3 partitioned, fp32 and bf16) ends with exactly the weights of an eagerly built model, and so does a model
started from an export (model.init_from). Prints one JSON line on rank 0."""

import json
import sys

import torch

from tape_pretrain.config import load_config
from tape_pretrain.distributed.engine import build_engine
from tape_pretrain.distributed.env import init_distributed, shutdown
from tape_pretrain.models import build_model
from tape_pretrain.train.initial_weights import model_source
from tape_pretrain.train.resume import resolve_run_model_config

CASES = [("fsdp2", 0, "fp32", "tape"), ("fsdp2", 0, "fp32", "fire"), ("deepspeed", 3, "fp32", "tape"),
         ("deepspeed", 3, "bf16", "fire"), ("fsdp2", 0, "fp32", "init_from")]


def main(export_dir: str) -> None:
    env = init_distributed(120)
    results = {}
    for engine, stage, precision, encoding in CASES:
        overrides = [f"parallel.engine={engine}", f"parallel.zero_stage={stage}", f"trainer.precision={precision}",
                     "model.preset=null", "model.hidden_size=48", "model.num_heads=3", "model.num_layers=2",
                     "model.ffn_hidden_size=96", "trainer.seq_len=32", "trainer.global_batch_tokens=128",
                     "trainer.micro_batch_size=2", "seed=11"]
        if encoding == "init_from":
            overrides += ["model.positional.name=tape", f"model.init_from={export_dir}"]
        else:
            overrides.append(f"model.positional.name={encoding}")
        config = load_config(None, overrides)
        model_config = resolve_run_model_config(config, 101)
        torch.manual_seed(config.seed)
        engine_ = build_engine(model_source(model_config), config, env, grad_accum=1)
        live = engine_.full_state_dict()
        if env.is_main:
            if encoding == "init_from":
                from safetensors.torch import load_file

                want = load_file(f"{export_dir}/model.safetensors")
            else:
                torch.manual_seed(config.seed)
                want = build_model(model_config).state_dict()
            mismatched = sorted(k for k in want if not torch.equal(live[k].float().cpu(), want[k]))
            results[f"{engine}{stage}-{precision}-{encoding}"] = {"keys": sorted(live) == sorted(want),
                                                                  "mismatched": mismatched}
        del engine_
    if env.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
