"""Process-level settings that a CPU can check in one process: the split timeouts, nccl's error handling and
flight recorder, determinism, device-dependent chunk sizes, and their config checks. (The timeouts in action,
under real gloo processes: test_faults.py; on nccl: test_gpu.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dif_maml_dist.comm.process import configure_process, group_timeout_s, nccl_environment
from dif_maml_dist.config import Config, RuntimeConfig
from dif_maml_dist.engine.learner import GPU_EVAL_CHUNK_FACTOR, eval_chunk_for
from dif_maml_dist.run.validate import validate


def test_the_process_group_timeout_is_the_exchange_timeout_on_gloo_and_a_later_backstop_on_nccl():
    """gloo's waits raise at the group's timeout, so it is runtime.timeout_s itself; nccl's watchdog must fire
    only after the host-side wait has named who is behind, so it sits at twice that. Catches a watchdog that
    aborts the process (with nccl's message, naming no one) before the agent can say which peer hung."""
    cfg = RuntimeConfig(timeout_s=30)
    assert group_timeout_s(cfg, "gloo") == 30
    assert group_timeout_s(cfg, "nccl") == 60


def test_nccl_environment_turns_on_error_handling_and_dumps_the_flight_recorder_into_the_run():
    """What nccl reads at process-group creation: async error handling on (a timeout aborts instead of leaving
    kernels waiting forever), a dump on timeout, a flight-recorder buffer, and the dump's location in the run
    directory rather than /tmp. Catches a recorder with a zero-sized buffer (torch's default: nothing recorded)."""
    env = nccl_environment(RuntimeConfig(), Path("/runs/a/flight_recorder"))
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == "/runs/a/flight_recorder/agent"
    assert "TORCH_FR_DUMP_TEMP_FILE" not in nccl_environment(RuntimeConfig(), None)


def test_configure_process_sets_threads_and_determinism_on_every_device(monkeypatch):
    """Threads are set whatever the device (a GPU rank used to keep an all-core pool), and
    runtime.deterministic turns on PyTorch's deterministic algorithms with cuBLAS's fixed workspace."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    try:
        configure_process(RuntimeConfig(deterministic=True), threads=2)
        assert torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
        configure_process(RuntimeConfig(), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def test_evaluation_chunks_follow_the_config_or_the_device():
    """runtime.eval_chunk wins; by default the family's CPU figure on the CPU and a multiple of it on a GPU."""
    assert eval_chunk_for(None, 8, torch.device("cpu")) == 8
    assert eval_chunk_for(None, 8, torch.device("cuda", 0)) == 8 * GPU_EVAL_CHUNK_FACTOR
    assert eval_chunk_for(3, 8, torch.device("cuda", 0)) == 3


@pytest.mark.parametrize("field, value, message", [
    ("init_timeout_s", 1.0, "runtime.init_timeout_s=1 is too short: starting the process group alone takes "
                            "seconds; use at least 5"),
    ("timeout_s", 2.0, "runtime.timeout_s=2 is too short: a neighbour merely descheduled"),
    ("eval_timeout_s", 100.0, "runtime.eval_timeout_s=100 is shorter than runtime.timeout_s=300"),
    ("eval_chunk", 0, "runtime.eval_chunk must be a positive number, got 0"),
    ("agent_chunk", -4, "runtime.agent_chunk must be a positive number, got -4"),
])
def test_runtime_settings_are_checked_in_one_line(field, value, message):
    """Each bad runtime setting is refused with one line naming the key and what to do."""
    cfg = Config()
    setattr(cfg.runtime, field, value)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
