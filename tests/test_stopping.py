"""How a run stops: a second signal stops at once, and running out of memory (CUDA or CPU) is a
message naming what to change, while any other error passes through untouched."""

from __future__ import annotations

import signal

import pytest

from moelab.errors import MoelabError
from moelab.train.config import RunConfig
from moelab.train.state import TrainState
from moelab.train.stopping import StopSignals, out_of_memory_is_an_error


def test_the_first_signal_asks_to_stop_and_the_second_stops_at_once():
    stop = StopSignals()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and stop.signal_name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    assert stop.signal_name == "SIGTERM"  # the first signal is the one reported


def _config() -> RunConfig:
    return RunConfig.from_kwargs("data-bin", max_update=1, max_tokens=777, tokens_per_sample=64,
                                 save_dir="somewhere")


def test_a_cpu_allocation_failure_is_a_message_naming_max_tokens():
    with (pytest.raises(MoelabError, match="out of memory at update 4 .*--max-tokens 777"),
          out_of_memory_is_an_error(TrainState(num_updates=3), _config())):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 123456789 bytes.")


def test_another_runtime_error_passes_through_unchanged():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with (pytest.raises(RuntimeError) as raised,
          out_of_memory_is_an_error(TrainState(), _config())):
        raise error
    assert raised.value is error and not isinstance(raised.value, MoelabError)
