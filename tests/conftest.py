"""Shared pytest setup for the turbofx suite.

* ``TURBOFX_CACHE_DIR`` points at a fresh temporary directory for the whole session. It is set at
  import time, before any test module imports turbofx, so no test reads or writes the user's
  kernel cache (~/.cache/turbofx).
* ``TURBOFX_COMPILE_CACHE=0``: every compile is a fresh one (tests read pass records); the compile
  cache's own tests turn it on with monkeypatch and a temporary ``TURBOFX_CACHE_DIR``.
* ``@pytest.mark.slow`` tests are skipped unless ``TURBOFX_SLOW=1``.
* ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present (without a GPU, turbofx
  runs its Triton kernels in Triton's interpreter on the CPU).
* Every test starts from ``torch.manual_seed(0)``.
"""
from __future__ import annotations

import os
import shutil
import tempfile

_OWN_CACHE = "TURBOFX_CACHE_DIR" not in os.environ
os.environ.setdefault("TURBOFX_CACHE_DIR", tempfile.mkdtemp(prefix="turbofx-test-cache-"))
os.environ.setdefault("TURBOFX_COMPILE_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/HIP device (skipped when torch.cuda.is_available() is false)")


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.skip(reason="slow (minutes on 2 cores): set TURBOFX_SLOW=1 to run")
    gpu = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "slow" in item.keywords and not os.environ.get("TURBOFX_SLOW"):
            item.add_marker(slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(gpu)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ.get("TURBOFX_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def turbofx_cache_dir() -> str:
    """The session's kernel cache directory (``TURBOFX_CACHE_DIR``)."""
    return os.environ["TURBOFX_CACHE_DIR"]
