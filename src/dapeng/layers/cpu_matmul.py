"""Decoding-sized linear products on x86-64 CPUs, by a small AVX2 kernel compiled on first use.

`matmul(x, weight, bias)` is `F.linear` for fp32 activations of a few rows (a decoding step:
one per sequence) over a bf16 or fp32 weight, computed by `cpu_matmul.c`: each weight row is
streamed once, several distant rows at a time, widened to fp32 in registers and multiplied
into every row of x, with fp32 accumulation. On one AVX2 core and SmolLM2's shapes it is
1.5-2x PyTorch's bf16 matrix-vector product, 2-4x its bf16 products of 4-64 rows, and
1.3-1.6x MKL for 1-24 fp32 rows (`benchmarks/generate.py` measures the whole decoding loop).
Where it doesn't apply or pay — other devices or dtypes, gradients, autocast, tracing and
dispatch modes, more rows — it returns None and the caller runs PyTorch.

The kernel is built with the machine's C compiler (`$CC`, else gcc or cc) into
`$DAPENG_HOME/cache/kernels/`, once per source version, and loaded with ctypes. Without a
compiler, on other CPUs, or with `DAPENG_CPU_KERNELS=0`, everything runs on PyTorch's kernels
(one warning says why when the build fails). The switch and the build are settled at the
first product of a process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from dapeng._files import atomic_path, dapeng_home

__all__ = ["available", "matmul"]

# more rows than this and PyTorch's own GEMMs are as fast (measured on SmolLM2's shapes)
MAX_ROWS = {torch.bfloat16: 64, torch.float32: 24}
_SOURCE = Path(__file__).with_name("cpu_matmul.c")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4


def available() -> bool:
    """Whether the kernel is built (building it now if needed) and enabled."""
    return _library() is not None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` by the kernel, in fp32; None where it doesn't apply (see the module doc).

    Args:
        x: (…, K) fp32 activations on CPU.
        weight: (N, K) bf16 or fp32, contiguous, on CPU.
        bias: optional (N,), added after the product.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # they must record an aten op
        return None
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (
        not 1 <= rows <= MAX_ROWS.get(weight.dtype, 0)
        or x.dtype != torch.float32
        or x.layout != torch.strided
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or weight.dim() != 2
        or weight.shape[1] != k
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.is_autocast_enabled("cpu")
        or torch._C._len_torch_dispatch_stack() > 0  # FLOP counters, fake tensors: likewise
        or (lib := _library()) is None
    ):
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    n = weight.shape[0]
    y = torch.empty(*x.shape[:-1], n)
    run = lib.matmul_bf16 if weight.dtype == torch.bfloat16 else lib.matmul_f32
    run(weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None; decided once per process (`_library.cache_clear()` to ask again)."""
    if os.environ.get("DAPENG_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"dapeng: could not build its CPU decoding kernel ({e}); decoding runs on PyTorch's "
            "kernels, slower. Install gcc (or set CC) to get it; DAPENG_CPU_KERNELS=0 skips it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for fn in (lib.matmul_bf16, lib.matmul_f32):
        fn.argtypes = _ARGTYPES
        fn.restype = None
    return lib


def _build() -> Path:
    """The compiled kernel for this source and these flags, compiled now unless a previous run did."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler found")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = dapeng_home() / "cache" / "kernels" / f"cpu_matmul-{key}.so"
    if not target.exists():
        with atomic_path(target) as tmp:
            done = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
                raise OSError(f"{compiler} failed: {first[:200]}")
    return target
