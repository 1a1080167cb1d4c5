"""Shared test settings.

Tests run tiny models (hidden size 32), which are fastest on one thread; on a machine
shared with other work extra torch threads spin-wait and make a 1 s edit take 40 s.
The embedded-model tests lose a little from it; the suite as a whole gains.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
