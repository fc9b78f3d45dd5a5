"""``python -m tests.slow_prep SECONDS prep ...``: the CLI with a pause of SECONDS after every shard prep writes, so
that a test's kill lands mid-run. The hook lives here, on the test side: production code reads no test switch."""

from __future__ import annotations

import sys
import time

from tape_pretrain.data import prep


def main() -> int:
    seconds = float(sys.argv[1])
    flush = prep.ShardWriter.flush

    def slow_flush(self: prep.ShardWriter) -> None:
        wrote = bool(self.pending)
        flush(self)
        if wrote:
            time.sleep(seconds)

    prep.ShardWriter.flush = slow_flush
    from tape_pretrain.cli import main as cli_main

    del sys.argv[1]  # the rest is the CLI's command line
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
