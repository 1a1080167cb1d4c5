"""``kedit`` with one process of a launch cut off: ROME's ``compute`` raises
KeyboardInterrupt (as Ctrl-C does) at its ``CUT_AT``-th call in the process of rank
``CUT_RANK``; the launcher then stops the other processes wherever they are.
Run as ``torchrun ... tests/cut_rank.py bench ...`` (tests/test_distributed.py)."""

import os

from kedit.cli import app
from kedit.methods.locate.rome import ROME

if int(os.environ.get("RANK", "0")) == int(os.environ["CUT_RANK"]):
    real, calls = ROME.compute, []

    def cut(self, requests):
        calls.append(1)
        if len(calls) == int(os.environ["CUT_AT"]):
            raise KeyboardInterrupt
        return real(self, requests)

    ROME.compute = cut

app(prog_name="kedit")
