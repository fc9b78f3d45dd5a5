"""Test-side fault injection for training subprocesses (torchrun workers, launch scripts): a directory on
PYTHONPATH whose sitecustomize patches the trainer when the test asks through the environment. Production code reads
no test switch; without these variables nothing is imported or patched.

TAPE_PRETRAIN_TEST_STEP_SLEEP=S      every training step takes S seconds longer (a signal or kill lands mid-run)
TAPE_PRETRAIN_TEST_HANG=R:N          rank R stalls for good after step N (outside any collective), once: the file
TAPE_PRETRAIN_TEST_HANG_MARKER=PATH  PATH records that the stall happened (a retried job does not stall again)
"""

import os


def _install() -> None:
    sleep = float(os.environ.get("TAPE_PRETRAIN_TEST_STEP_SLEEP", "0"))
    hang, marker = os.environ.get("TAPE_PRETRAIN_TEST_HANG"), os.environ.get("TAPE_PRETRAIN_TEST_HANG_MARKER")
    if not sleep and not (hang and marker):
        return
    import sys
    import time

    from tape_pretrain.train import trainer

    agree = trainer.all_agree_any  # the training loop's first call after each optimizer step (the stop vote)

    def after_step(flag, env):
        if sleep:
            time.sleep(sleep)
        if hang and marker and not os.path.exists(marker):
            rank, at = (int(x) for x in hang.split(":"))
            step = sys._getframe(1).f_locals["self"].step  # the Trainer's, just incremented
            if env.rank == rank and step == at:
                with open(marker, "w") as f:
                    f.write("stalled")
                time.sleep(10**6)
        return agree(flag, env)

    trainer.all_agree_any = after_step


if os.environ.get("TAPE_PRETRAIN_TEST_STEP_SLEEP") or os.environ.get("TAPE_PRETRAIN_TEST_HANG"):
    _install()
