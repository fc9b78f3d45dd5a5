"""Run logs: stdlib logging with time, rank and level, to the console and to RUN_DIR/logs/rank<R>.log.

Rank 0 logs at INFO; other ranks only warnings and errors, unless logging.all_ranks. Console lines go to stdout
through the progress bar's write (tqdm.write) while a bar is shown, so a log line never lands inside the bar; the
bar itself is drawn only when stderr is a terminal, so a log file or a batch system's output never receives
carriage returns.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

LOGGER = "tape_pretrain"
FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _ConsoleHandler(logging.Handler):
    """stdout, through the live progress bar's write when there is one."""

    bar = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if _ConsoleHandler.bar is not None:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stdout)
            else:
                sys.stdout.write(message + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never stop training
            self.handleError(record)


def setup_logging(rank: int, run_dir: Path | None = None, all_ranks: bool = False) -> Path | None:
    """Configure the package logger for this process; returns the log file (None when this rank writes none).
    Idempotent: a second call (a second run in one process) replaces the handlers of the first."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    speaks = rank == 0 or all_ranks
    console = _ConsoleHandler(logging.INFO if speaks else logging.WARNING)
    console.addFilter(_RankFilter(rank))
    console.setFormatter(formatter)
    logger.addHandler(console)
    path = None
    if run_dir is not None and speaks:
        path = Path(run_dir) / "logs" / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.addFilter(_RankFilter(rank))
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    # torch deprecates the collective DeepSpeed's ZeRO checkpoints call, twice per save: not the user's to act on
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    return path


def progress_bar(enabled: bool, **kwargs):
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal, else None; log lines go through it."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(file=sys.stderr, **kwargs)
    _ConsoleHandler.bar = bar
    return bar


def close_progress_bar(bar) -> None:
    if bar is not None:
        bar.close()
        _ConsoleHandler.bar = None
