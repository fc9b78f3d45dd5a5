"""Test-side fault injection for training subprocesses (torchrun workers, launch scripts): a directory on
PYTHONPATH whose sitecustomize patches the trainer when the test asks through the environment. Production code reads
no test switch; without these variables nothing is imported or patched.

TAPE_PRETRAIN_TEST_STEP_SLEEP=S      every training step takes S seconds longer (a signal or kill lands mid-run)
TAPE_PRETRAIN_TEST_HANG=R:N          rank R stalls for good in step N, once: the file
TAPE_PRETRAIN_TEST_HANG_MARKER=PATH  PATH records that the stall happened (a retried job does not stall again)
"""

import os


def _install() -> None:
    sleep = float(os.environ.get("TAPE_PRETRAIN_TEST_STEP_SLEEP", "0"))
    hang, marker = os.environ.get("TAPE_PRETRAIN_TEST_HANG"), os.environ.get("TAPE_PRETRAIN_TEST_HANG_MARKER")
    if not sleep and not (hang and marker):
        return
    import time

    from tape_pretrain.train import trainer

    schedule = trainer.learning_rate  # called once per step, with the index of the step being taken

    def slowed(step, *args, **kwargs):
        if sleep:
            time.sleep(sleep)
        if hang and marker and not os.path.exists(marker):
            rank, at = (int(x) for x in hang.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and step + 1 == at:
                with open(marker, "w") as f:
                    f.write("stalled")
                time.sleep(10**6)
        return schedule(step, *args, **kwargs)

    trainer.learning_rate = slowed


if os.environ.get("TAPE_PRETRAIN_TEST_STEP_SLEEP") or os.environ.get("TAPE_PRETRAIN_TEST_HANG"):
    _install()
