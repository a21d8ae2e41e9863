"""The decoding kernel (`layers/cpu_matmul.c`): every path against float64 references, where it steps aside, its build."""

import ctypes
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dapeng.errors import DapengError
from dapeng.layers import cpu_matmul

needs_kernel = pytest.mark.skipif(
    not cpu_matmul.available(), reason="the kernel needs x86-64 with AVX2 and a C compiler"
)
F32, BF16, I8 = torch.float32, torch.bfloat16, torch.int8
# (path, x dtype, weight dtype, rtol): every product the kernel computes. The bf16-dot path rounds
# fp32 x to bf16 first and forms exact products of bf16 values: against the float64 product of
# the rounded x it is as close as the fp32-x paths; a bf16 x comes back rounded to bf16 (2^-9).
PRODUCTS = [
    ("avx2", F32, BF16, 1e-5),
    ("avx2", F32, F32, 1e-5),
    ("avx2", F32, I8, 1e-5),
    ("avx512f", F32, BF16, 1e-5),
    ("avx512f", F32, F32, 1e-5),
    ("avx512f", F32, I8, 1e-5),
    ("avx512bf16", F32, BF16, 1e-5),
    ("avx512bf16", BF16, BF16, 2**-8),
    (None, BF16, BF16, 2**-8),  # bf16 x on the best path for it: widened to fp32 on CPUs without avx512bf16
]


def _runs(path: str | None) -> None:
    if not cpu_matmul.available():
        pytest.skip("the kernel needs x86-64 with AVX2 and a C compiler")
    if path is not None and path not in cpu_matmul.kernel_paths():
        pytest.skip(f"CPU lacks {path}")


@pytest.mark.parametrize(("path", "x_dtype", "dtype", "rtol"), PRODUCTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_products_equal_float64_reference(path, x_dtype, dtype, rtol, threads):
    _runs(path)
    _check_products(path, x_dtype, dtype, rtol, threads)


@pytest.fixture(scope="module")
def emulated_avx512(tmp_path_factory):
    """The kernel built with each AVX-512 intrinsic computed in plain C (tests/unit/avx512_emulation.h)."""
    built = tmp_path_factory.mktemp("emulated") / "cpu_matmul.so"
    shim = Path(__file__).with_name("avx512_emulation.h")
    # the headers first, so that the shim's renaming applies to the kernel's source only
    includes = [arg for header in ("immintrin.h", "omp.h", "stdint.h", str(shim)) for arg in ("-include", header)]
    flags = [*cpu_matmul._FLAGS, "-Wno-psabi", *includes]  # psabi: 64-byte vectors passed without AVX-512
    subprocess.run([cpu_matmul._compiler(), *flags, str(cpu_matmul._SOURCE), "-o", str(built)], check=True, timeout=120)
    return cpu_matmul._bound(ctypes.CDLL(str(built)), cpu_matmul.PATHS)


@needs_kernel
@pytest.mark.parametrize(("path", "x_dtype", "dtype", "rtol"), [p for p in PRODUCTS if p[0] != "avx2"])
def test_avx512_paths_on_emulated_intrinsics(path, x_dtype, dtype, rtol, emulated_avx512, monkeypatch):
    """The AVX-512 paths' loops, lanes and tails, on any x86-64 with AVX2 (the instructions: the test below).

    Their library runs every path, as on a CPU with avx512bf16: bf16 x (path None) takes the bf16-dot one.
    """
    monkeypatch.setattr(cpu_matmul, "_library", lambda: emulated_avx512)
    _check_products(path, x_dtype, dtype, rtol, threads=2)


def _check_products(path: str | None, x_dtype: torch.dtype, dtype: torch.dtype, rtol: float, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        most = cpu_matmul.MAX_ROWS[(x_dtype, dtype)]
        for rows in sorted({r for r in (1, 2, 3, 4, 5, 8, 9, 16, 17) if r < most} | {most}):
            # N off the 4 segments and 16-row blocks, fewer rows than segments, K off the 8-32 lanes
            for n, k in [(37, 576), (16, 1536), (3, 64), (5, 13), (33, 100), (7, 88)]:
                if dtype == I8:  # int8 values with per-row scales, as Int8Linear stores them
                    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=I8)
                    scale = torch.rand(n, generator=g) / 64
                else:
                    weight, scale = torch.randn(n, k, generator=g).to(dtype), None
                x, bias = torch.randn(rows, k, generator=g).to(x_dtype), torch.randn(n, generator=g)
                out = cpu_matmul.matmul(x, weight, bias, scale=scale, path=path)
                assert out is not None and out.dtype == x_dtype and out.shape == (rows, n)
                used = x.bfloat16() if path == "avx512bf16" else x  # what the path multiplies
                dense = weight.double() * (scale.double()[:, None] if scale is not None else 1.0)
                expected = F.linear(used.double(), dense, bias.double())
                torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_groupwise_products_equal_float64_reference(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for rows in (1, 2, 3, 4, 5, 8, 9, 64):
            for n, k in [(37, 576), (16, 1536), (3, 64), (5, 32)]:
                q = torch.randint(0, 256, (n, k), generator=g).to(torch.uint8)
                scale, zero = torch.rand(n, k // 32, generator=g) / 64, torch.randn(n, k // 32, generator=g)
                x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
                out = cpu_matmul.matmul_groupwise(x, q, scale, zero, bias)
                assert out is not None and out.shape == (rows, n)
                dense = (q.double().reshape(n, k // 32, 32) * scale.double()[..., None]
                         + zero.double()[..., None]).reshape(n, k)
                torch.testing.assert_close(out.double(), F.linear(x.double(), dense, bias.double()), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_groupwise_steps_aside_where_it_doesnt_apply():
    q, s = torch.zeros(10, 64, dtype=torch.uint8), torch.ones(10, 2)
    assert cpu_matmul.matmul_groupwise(torch.randn(4, 64), q, s, s) is not None
    assert cpu_matmul.matmul_groupwise(torch.randn(cpu_matmul.GROUPWISE_MAX_ROWS + 1, 64), q, s, s) is None
    assert cpu_matmul.matmul_groupwise(torch.randn(4, 64).bfloat16(), q, s, s) is None
    assert cpu_matmul.matmul_groupwise(torch.randn(4, 48), torch.zeros(10, 48, dtype=torch.uint8), s, s) is None
    assert cpu_matmul.matmul_groupwise(torch.randn(4, 64), q, torch.ones(10, 3), s) is None


@pytest.mark.parametrize(
    ("paths", "best_fp32_x", "bf16_x"),
    [
        (("avx2",), "avx2", "avx2"),
        (("avx2", "avx512f"), "avx512f", "avx512f"),
        (cpu_matmul.PATHS, "avx512f", "avx512bf16"),
    ],
)
def test_each_cpu_kind_gets_its_best_path_that_keeps_x(paths, best_fp32_x, bf16_x):
    choose = cpu_matmul._choose
    assert choose(None, F32, BF16, paths) == best_fp32_x  # fp32 x is never rounded unless asked
    assert choose(None, F32, F32, paths) == best_fp32_x
    assert choose(None, BF16, BF16, paths) == bf16_x
    assert choose("avx2", BF16, BF16, paths) == "avx2"
    if "avx512bf16" in paths:
        assert choose("avx512bf16", F32, BF16, paths) == "avx512bf16"
        assert choose("avx512bf16", F32, F32, paths) is None  # vdpbf16ps multiplies bf16 weights only
    else:
        with pytest.raises(DapengError, match="'avx512bf16' is not one this CPU runs"):
            choose("avx512bf16", F32, BF16, paths)


def test_paths_are_those_the_cpu_reports(cpu_kernel):
    cpuinfo = Path("/proc/cpuinfo")
    cpu_kernel("1")
    _runs(None)
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = ["avx2"]
    if "avx512f" in flags:
        expected.append("avx512f")
        if "avx512_bf16" in flags:
            expected.append("avx512bf16")
    assert cpu_matmul.kernel_paths() == tuple(expected) and cpu_matmul.kernel_path() == expected[-1]
    cpu_kernel("avx2")  # the switch keeps to the paths up to one
    assert cpu_matmul.kernel_paths() == ("avx2",) and cpu_matmul.kernel_path() == "avx2"
    cpu_kernel("0")
    assert cpu_matmul.kernel_paths() == () and cpu_matmul.kernel_path() is None
    cpu_kernel("avx")
    with pytest.raises(DapengError, match="DAPENG_CPU_KERNELS='avx' is not a setting"):
        cpu_matmul.kernel_path()


def test_avx512_paths_compile_to_their_instructions(tmp_path):
    try:
        compiler = cpu_matmul._compiler()
    except OSError:
        pytest.skip("no C compiler")
    asm = tmp_path / "cpu_matmul.s"
    flags = [f for f in cpu_matmul._FLAGS if f != "-shared"]  # the build's flags, to assembly text
    subprocess.run([compiler, *flags, "-S", str(cpu_matmul._SOURCE), "-o", str(asm)], check=True, timeout=120)
    text = asm.read_text()

    def body(name: str) -> str:
        return text[text.index(f"\n{name}:") : text.index(f".size\t{name}, ")]

    for path, weights in cpu_matmul._WEIGHTS.items():
        for w in weights:
            assert f"\nmatmul_{path}_{w}:" in text  # what ctypes loads
    for rows in range(1, 9):
        assert "%zmm" not in body(f"dot_avx2_bf16_1_{rows}")  # the AVX2 path stays AVX2
        assert re.search(r"vfmadd\d+ps\t.*%zmm", body(f"dot_avx512f_f32_1_{rows}"))
        assert "vdpbf16ps" in body(f"dot_avx512bf16_bf16_1_{rows}")


@needs_kernel
def test_bf16_decoding_on_cpus_with_native_bf16_runs_its_products_in_the_kernel(monkeypatch):
    import dapeng.models.lm as lm
    from dapeng.models import MODELS

    monkeypatch.setattr(lm, "native_bf16", lambda device="cpu": True)  # such CPUs decode with bf16 activations
    torch.manual_seed(0)
    tiny = {"vocab_size": 40, "hidden": 16, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 32}
    model = MODELS.create("lm", **tiny, max_positions=64).to(BF16).eval()
    assert model._activation_dtype() == BF16
    products, matmul = [], cpu_matmul.matmul

    def spy(x, weight, bias=None, **kwargs):
        out = matmul(x, weight, bias, **kwargs)
        products.append((x.numel() // x.shape[-1], out is not None and out.dtype == x.dtype == BF16))
        return out

    monkeypatch.setattr(cpu_matmul, "matmul", spy)
    ids = torch.randint(3, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    assert model.generate(ids, max_new_tokens=4).shape == (2, 24)
    decoding = [by_kernel for rows, by_kernel in products if rows == 2]
    assert len(decoding) == 3 * 2 * 7 + 4 and all(decoding)  # 3 steps × 2 layers × 7 products, 4 heads
    assert not any(by_kernel for rows, by_kernel in products if rows == 40)  # the prefill: PyTorch's GEMMs


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
    assert cpu_matmul.matmul(torch.randn(cpu_matmul.MAX_ROWS[(F32, F32)] + 1, 64), weight) is None
    assert cpu_matmul.matmul(x.bfloat16(), weight) is None  # bf16 activations over bf16 weights only
    assert cpu_matmul.matmul(torch.randn(cpu_matmul.MAX_ROWS[(BF16, BF16)] + 1, 64).bfloat16(), weight.bfloat16()) is None
    with pytest.raises(DapengError, match="'sse' is not one this CPU runs"):
        cpu_matmul.matmul(x, weight, path="sse")
    assert cpu_matmul.matmul(x, weight.t().contiguous().t()) is None  # not contiguous
    assert cpu_matmul.matmul(x, weight.half()) is None
    q = torch.zeros(10, 64, dtype=I8)
    assert cpu_matmul.matmul(x, q) is None and cpu_matmul.matmul(x, weight, scale=torch.ones(10)) is None  # int8 ⇔ scale
    assert cpu_matmul.matmul(x, q, scale=torch.ones(10)) is not None
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
