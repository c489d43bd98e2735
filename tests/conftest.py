from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"

# Two cores on CI: keep torch from oversubscribing them when tests run in one process.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def own_logger_restored():
    """``token2wav serve`` configures the ``token2wav`` logger (a handler, its level, no propagation to the root,
    ``serve.runner.show_own_logs``); a test that runs the command in-process must not leave that to the tests after
    it on the same worker, whose ``caplog`` hears the root logger."""
    logger = logging.getLogger("token2wav")
    before = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(before[0])
    logger.handlers[:] = before[1]
    logger.propagate = before[2]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small ops: a second thread only spin-waits on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tests whose assertions compare floating-point results (reference parity, streamed == offline, batched == alone,
# graph replay, the front end, server round trips that compare audio or ids). CI runs them twice more with the
# CPU kernels limited (AVX2, then the default kernels): `make test-kernels`. See docs/exactness.md.
PARITY_MODULES = frozenset({
    "test_batcher", "test_conformer", "test_demo_latency", "test_demo_voice", "test_engine_cached",
    "test_engine_errors", "test_engine_recompute", "test_engine_threads", "test_flow_cached", "test_flow_cv2",
    "test_flow_cv3",
    "test_frontend", "test_frontend_engine", "test_frontend_serve_cli", "test_graph_replay", "test_hifigan",
    "test_hift_cached", "test_hift_cv2", "test_hift_cv3", "test_kv_pool", "test_mel", "test_server",
    "test_server_duplex", "test_server_prompts", "test_tokenizer", "test_unet", "test_user_long_inputs",
    "test_user_model_files", "test_exactness",
})


# Modules whose assertions hold only on an otherwise idle machine: they time streams against the listener's
# clock (stalls, start buffers, the page's underruns), bound a server's waits or drains in seconds, or run Ray's
# processes on both cores. Single tests elsewhere carry @pytest.mark.wallclock. `make test` runs the rest on two
# workers (pytest-xdist, one thread each) and then these alone, one at a time.
WALLCLOCK_MODULES = frozenset({
    "test_admission", "test_browser", "test_ray", "test_server_hostile", "test_server_load",
    "test_server_shutdown", "test_server_soak", "test_threads",
})


# The kernel passes leave out the slowest repeats of a comparison the pass already makes on a smaller model
# (the same code path, the same tolerance class), and slow tests of parity modules that compare no floats (the
# demo command's report), to keep CI under 15 minutes on 2 cores; `make test` runs them.
KERNEL_PASS_LEAVES_OUT = (
    "test_demo_latency.py::test_demo_command_reports_latency_rtf_and_where_the_time_went",
    "test_batcher.py::test_fixed_shape_batches_equal_alone[demo]",
    "test_batcher.py::test_threads_through_one_batcher_equal_alone[demo]",
    "test_graph_replay.py::test_replayed_fixed_shape_solves_equal_each_rows_own_stream[cv2]",
    "test_engine_cached.py::test_window_mode_deviation",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--kernel-pass", action="store_true",
                     help="a pass under limited CPU kernels (make test-kernels): leave out KERNEL_PASS_LEAVES_OUT")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: compares float results; also run under limited CPU kernels")
    config.addinivalue_line("markers", "wallclock: asserts times or needs the cores to itself; never run beside "
                                       "another test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in PARITY_MODULES:
            item.add_marker(pytest.mark.parity)
        if module in WALLCLOCK_MODULES:
            item.add_marker(pytest.mark.wallclock)
        if item.get_closest_marker("parity") and item.get_closest_marker("wallclock"):
            # the kernel passes run every parity test on two workers
            raise pytest.UsageError(f"{item.nodeid} compares floats (parity) and needs an idle machine "
                                    "(wallclock): split the timing out of it")
    if config.getoption("--kernel-pass"):
        left = [i for i in items if i.nodeid.split("/")[-1] in KERNEL_PASS_LEAVES_OUT]
        if left:
            config.hook.pytest_deselected(items=left)
            items[:] = [i for i in items if i not in left]
