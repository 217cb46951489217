"""Test-session settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # The in-memory network runs agents as threads; with a multi-threaded intra-op pool each of them spins
    # OpenMP workers against the others (a 10x slowdown on 2 cores). Agents get one thread each in
    # production too (runtime.threads=1).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
