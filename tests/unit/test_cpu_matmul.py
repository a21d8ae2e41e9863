"""The decoding kernel (`layers/cpu_matmul.c`): products against float64 references, where it steps aside, its build."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dapeng.layers import cpu_matmul

needs_kernel = pytest.mark.skipif(
    not cpu_matmul.available(), reason="the kernel needs x86-64 with AVX2 and a C compiler"
)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_equal_float64_reference(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for rows in (1, 2, 3, 4, 5, 8, 9, 17, cpu_matmul.MAX_ROWS[dtype]):
            # N off the 4 segments and 16-row blocks, fewer rows than segments, K off the 8 lanes
            for n, k in [(37, 576), (16, 1536), (3, 64), (5, 13), (33, 100)]:
                weight = torch.randn(n, k, generator=g).to(dtype)
                x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
                out = cpu_matmul.matmul(x, weight, bias)
                assert out is not None and out.dtype == torch.float32 and out.shape == (rows, n)
                expected = F.linear(x.double(), weight.double(), bias.double())
                torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_leading_dims_are_kept():
    x, weight = torch.randn(2, 3, 64), torch.randn(10, 64).bfloat16()
    out = cpu_matmul.matmul(x, weight)
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out, F.linear(x, weight.float()), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_steps_aside_where_pytorch_must_run():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from dapeng.layers.fused import linear_weight

    x, weight = torch.randn(4, 64), torch.randn(10, 64)
    assert cpu_matmul.matmul(x, weight) is not None
    assert cpu_matmul.matmul(torch.randn(cpu_matmul.MAX_ROWS[torch.float32] + 1, 64), weight) is None
    assert cpu_matmul.matmul(x.bfloat16(), weight.bfloat16()) is None  # activations must be fp32
    assert cpu_matmul.matmul(x, weight.t().contiguous().t()) is None  # not contiguous
    assert cpu_matmul.matmul(x, weight.half()) is None
    assert cpu_matmul.matmul(x, weight.requires_grad_()) is None  # autograd must see the product
    with torch.no_grad():
        assert cpu_matmul.matmul(x, weight) is not None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        assert cpu_matmul.matmul(x, weight) is None  # a dispatch mode must see an aten op
    assert counter.get_total_flops() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_matmul.matmul(x, weight.detach()) is None
    frozen = weight.detach()
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: linear_weight(t, frozen), (x,))  # the tracer must record the product
        other = torch.randn(4, 64)
        torch.testing.assert_close(traced(other), F.linear(other, frozen))
        with FakeTensorMode():
            assert cpu_matmul.matmul(torch.randn(4, 64), torch.randn(10, 64)) is None


def test_switch_and_failed_build_fall_back_with_one_warning(tmp_path, monkeypatch, cpu_kernel):
    cpu_kernel("0")
    assert cpu_matmul.matmul(torch.randn(4, 64), torch.randn(10, 64)) is None
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_matmul.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_matmul.platform, "machine", lambda: "x86_64")
    cpu_kernel("1")
    with pytest.warns(RuntimeWarning, match="could not build its CPU decoding kernel"):
        assert cpu_matmul.matmul(torch.randn(4, 64), torch.randn(10, 64)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every product
        assert cpu_matmul.matmul(torch.randn(4, 64), torch.randn(10, 64)) is None
    kernels = tmp_path / "home" / "cache" / "kernels"
    assert not kernels.exists() or not any(kernels.iterdir())  # nothing half-written left behind


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path))
    kernels = tmp_path / "cache" / "kernels"
    kernels.mkdir(parents=True)
    other = kernels / "cpu_matmul-0123456789abcdef.so"
    other.write_bytes(b"the build of another source, which another dapeng may be loading")
    built = cpu_matmul._build()
    assert built.parent == kernels and sorted(kernels.iterdir()) == sorted([built, other])
    stamp = built.stat().st_mtime_ns
    assert cpu_matmul._build() == built and built.stat().st_mtime_ns == stamp  # not compiled again
