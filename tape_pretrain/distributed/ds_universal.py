"""DeepSpeed's universal-checkpoint converter, run weights-only (``python -m tape_pretrain.distributed.ds_universal
ARGS`` takes ds_to_universal's arguments). A separate process, so that the converter issues no collective on the
training job's process group."""

from __future__ import annotations

import os
import runpy
import sys

import torch

from tape_pretrain.utils.safe_load import NO_WEIGHTS_ONLY_ENV, WEIGHTS_ONLY_ENV, deepspeed_safe_globals

if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # the training process relays each phase line as it comes
    os.environ[WEIGHTS_ONLY_ENV] = "1"  # inherited by the converter's worker processes
    os.environ.pop(NO_WEIGHTS_ONLY_ENV, None)  # torch refuses both set
    torch.serialization.add_safe_globals(deepspeed_safe_globals())
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
