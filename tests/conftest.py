"""Shared fixtures: generated sample acquisitions, the Prefect harness, GPU detection."""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest

# Prefect's temporary local server: no analytics (no internet), time to start on slow CI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _has_cuda() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device: all mean "no GPU"
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory):
    """The `tiny` sample acquisition (seed 0), generated once per session."""
    from lightsheet.sample import generate

    path = tmp_path_factory.mktemp("sample-tiny")
    generate(path, size="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """The `small` sample acquisition (seed 0), generated once per session."""
    from lightsheet.sample import generate

    path = tmp_path_factory.mktemp("sample-small")
    generate(path, size="small", seed=0)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def two_dask_threads():
    """Dask's local scheduler at 2 threads (the machine is shared); use with usefixtures."""
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.fixture(scope="module")
def uint16_volume():
    """A small (T, C, Z, Y, X) uint16 image whose sides cut into uneven chunks."""
    rng = np.random.default_rng(5)
    return rng.integers(0, 4000, (1, 2, 23, 70, 45), dtype=np.uint16)
