"""Shared test settings: one intra-op thread per test, so the suite's numerics do not depend on the
machine's core count and parallel test runs do not fight over 2 cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
