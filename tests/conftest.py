"""Shared test set-up: quiet, deterministic, light on threads (CI has 2 cores)."""

import os

os.environ.setdefault("DAPENG_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors, and on busy shared cores a second thread is
    often descheduled and stalls every op. Use with `pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_kernel(monkeypatch):
    """`cpu_kernel("0")` turns dapeng's CPU decoding kernel off for the test (`"1"`: on where it builds)."""
    from dapeng.layers import cpu_matmul

    def switch(value: str) -> None:
        monkeypatch.setenv("DAPENG_CPU_KERNELS", value)
        cpu_matmul._library.cache_clear()

    yield switch
    cpu_matmul._library.cache_clear()  # settled again, from the restored environment, at the next product
