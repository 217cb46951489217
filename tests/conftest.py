"""Test-session settings."""

import os

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


@pytest.fixture(autouse=True, scope="session")
def _dataset_caches_in_the_session_folder(tmp_path_factory):
    # Decoded datasets go to data.cache_dir, by default under $XDG_CACHE_HOME: the session's own folder, so that no
    # test (nor the processes it starts, which inherit the variable) writes into the user's home. Set for the whole
    # session, before module fixtures that train. Sharing it is safe: a cache is named by its files' times, which
    # differ between tests' fixtures (a test that counts cache files passes its own data.cache_dir).
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous
