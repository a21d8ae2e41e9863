"""Decoding-sized linear products on x86-64 CPUs, by a small kernel compiled on first use.

`matmul(x, weight, bias)` is `F.linear` for activations of a few rows (a decoding step: one
per sequence) over a bf16, fp32 or int8 (per-row scaled) weight, computed by `cpu_matmul.c`: each weight row is
streamed once, several distant rows at a time, and multiplied into every row of x, with fp32
accumulation. On one AVX2 core and SmolLM2's shapes it is 1.5-2x PyTorch's bf16
matrix-vector product, 2-4x its bf16 products of 4-64 rows, and 1.3-1.6x MKL for 1-24 fp32
rows (`benchmarks/generate.py` measures the whole decoding loop). Where it doesn't apply or
pay — other devices or dtypes, gradients, autocast, tracing and dispatch modes, more rows —
it returns None and the caller runs PyTorch.

The kernel has one path per instruction set, all from the same source, and a product takes
the best one the CPU runs (`kernel_paths()`, from cpuid; `kernel_path()` names the best):

* ``avx2`` and ``avx512f`` (8 and 16 lanes): fp32 x; bf16 and int8 weights widened to fp32 in
  registers, so every product is the exact fp32 product with the stored weight (an int8
  weight's per-row scale multiplies the result).
* ``avx512bf16``: bf16 x times bf16 weights by `vdpbf16ps`, fp32 accumulation. It takes bf16
  activations (what models compute in on CPUs with native bf16), whose products it forms
  exactly; fp32 x with bf16 weights stays on the fp32-x path unless `path="avx512bf16"`
  asks for it, and then x is first rounded to bf16 (8 significant bits: relative errors up
  to 2^-9 per product). The instruction treats denormal inputs as zero.

bf16 activations (bf16 weights only, up to 16 rows) run on the bf16-dot path where the CPU
has it, else widened to fp32 (exactly) on the fp32-x path; the result is rounded to bf16.

The kernel is built with the machine's C compiler (`$CC`, else gcc or cc) into
`$DAPENG_HOME/cache/kernels/`, once per source version, and loaded with ctypes. Without a
compiler, on other CPUs, or with `DAPENG_CPU_KERNELS=0`, everything runs on PyTorch's kernels
(one warning says why when the build fails); `DAPENG_CPU_KERNELS=avx2` (or another path)
keeps to the paths up to that one, to compare them on one machine. The switch and the build
are settled at the first product of a process.
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
from typing import NamedTuple

import torch

from dapeng._files import atomic_path, dapeng_home
from dapeng.errors import DapengError

__all__ = ["GROUP", "PATHS", "available", "kernel_path", "kernel_paths", "matmul", "matmul_groupwise"]

# the kernel paths, each running on CPUs that run the ones before it (`cpu_path()` in the source)
PATHS = ("avx2", "avx512f", "avx512bf16")
# (x dtype, weight dtype) the kernel takes → the most rows it takes. fp32 x: more and PyTorch's own
# GEMMs are as fast (measured on SmolLM2's shapes, AVX2). bf16 x: 16 covers decoding batches and
# leaves prefill to PyTorch (oneDNN's bf16 GEMMs on CPUs with native bf16; crossover unmeasured).
MAX_ROWS = {
    (torch.float32, torch.bfloat16): 64,
    (torch.float32, torch.float32): 24,
    (torch.bfloat16, torch.bfloat16): 16,
    (torch.float32, torch.int8): 64,  # int8 weight-only layers; the alternative, _weight_int8pack_mm, is slower
}
_SOURCE = Path(__file__).with_name("cpu_matmul.c")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4  # weight, scale (or NULL), x, y; M, N, K, threads
GROUP = 32  # inputs per scale and zero point of a group-wise uint8 weight (`matmul_groupwise`)
GROUPWISE_MAX_ROWS = 64
_GROUPWISE_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4  # w, scale, zero, x, xsum, y; M, N, K, threads
_WEIGHT_NAMES = {torch.bfloat16: "bf16", torch.float32: "f32", torch.int8: "i8"}
# each path's weight types, as in the source's `matmul_<path>_<weight>`; paths with f32 are the fp32-x ones
_WEIGHTS = {"avx2": ("bf16", "f32", "i8"), "avx512f": ("bf16", "f32", "i8"), "avx512bf16": ("bf16",)}


class _Library(NamedTuple):
    cdll: ctypes.CDLL
    paths: tuple[str, ...]  # those this CPU runs, within DAPENG_CPU_KERNELS


def available() -> bool:
    """Whether the kernel is built (building it now if needed) and enabled."""
    return _library() is not None


def kernel_paths() -> tuple[str, ...]:
    """The paths (of `PATHS`) this CPU runs and `DAPENG_CPU_KERNELS` allows; () without the kernel."""
    lib = _library()
    return () if lib is None else lib.paths


def kernel_path() -> str | None:
    """The best of `kernel_paths()`: "avx2", "avx512f" or "avx512bf16"; None without the kernel."""
    return (kernel_paths() or (None,))[-1]


def matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` by the kernel, in x's dtype; None where it doesn't apply (see the module doc).

    Args:
        x: (…, K) activations on CPU: fp32, or bf16 over bf16 weights.
        weight: (N, K) bf16, fp32 or int8 (with `scale`), contiguous, on CPU.
        bias: optional (N,), added to the fp32 product.
        scale: (N,) fp32 per-row scales of an int8 weight: the product is `x @ (weight * scale).T`.
        path: one of `kernel_paths()` to run instead of the best for these dtypes (tests,
            comparisons); "avx512bf16" rounds fp32 x to bf16.

    Raises:
        DapengError: `path` is not one of `kernel_paths()`.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # they must record an aten op
        return None
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (
        not 1 <= rows <= MAX_ROWS.get((x.dtype, weight.dtype), 0)
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
        or (chosen := _choose(path, x.dtype, weight.dtype, lib.paths)) is None
        or (weight.dtype == torch.int8) != (scale is not None)
        or (scale is not None and (scale.shape != weight.shape[:1] or scale.device.type != "cpu"))
    ):
        return None
    dtype = x.dtype
    # vdpbf16ps multiplies bf16 by bf16 (fp32 x rounded), the others fp32 by fp32 (bf16 x widened exactly)
    x = x.to(torch.bfloat16 if chosen == "avx512bf16" else torch.float32).contiguous()
    n = weight.shape[0]
    y = torch.empty(*x.shape[:-1], n)
    run = getattr(lib.cdll, f"matmul_{chosen}_{_WEIGHT_NAMES[weight.dtype]}")
    scales = None if scale is None else scale.float().contiguous()
    run(weight.data_ptr(), None if scales is None else scales.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n, k,
        torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.to(dtype)


def matmul_groupwise(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """`F.linear(x, w, bias)` for a group-wise affine uint8 weight, by the kernel; None where it doesn't apply.

    `w[n, k] = scale[n, k // GROUP] * qweight[n, k] + zero[n, k // GROUP]`: one scale and zero
    point per `GROUP` inputs of each output row (llama.cpp's and torchao's group-wise layout).

    Args:
        x: (…, K) fp32 activations on CPU, at most `GROUPWISE_MAX_ROWS` rows; K a multiple of GROUP.
        qweight: (N, K) uint8, contiguous.
        scale: (N, K // GROUP) fp32.
        zero: (N, K // GROUP) fp32.
        bias: optional (N,).
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    n, k = qweight.shape if qweight.dim() == 2 else (0, 0)
    rows = x.numel() // k if k else 0
    groups = (n, k // GROUP)
    if (
        not 1 <= rows <= GROUPWISE_MAX_ROWS
        or k % GROUP
        or x.shape[-1] != k
        or x.dtype != torch.float32
        or qweight.dtype != torch.uint8
        or not qweight.is_contiguous()
        or scale.shape != groups
        or zero.shape != groups
        or any(t.device.type != "cpu" for t in (x, qweight, scale, zero))
        or (torch.is_grad_enabled() and x.requires_grad)
        or torch.is_autocast_enabled("cpu")
        or torch._C._len_torch_dispatch_stack() > 0
        or (lib := _library()) is None
    ):
        return None
    x = x.contiguous()
    scale, zero = scale.float().contiguous(), zero.float().contiguous()
    xsum = x.reshape(rows, k // GROUP, GROUP).sum(-1)  # (M, G): the zero points' share
    y = torch.empty(*x.shape[:-1], n)
    lib.cdll.matmul_avx2_u8g32(qweight.data_ptr(), scale.data_ptr(), zero.data_ptr(), x.data_ptr(), xsum.data_ptr(),
                               y.data_ptr(), rows, n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y


def _choose(path: str | None, x: torch.dtype, weight: torch.dtype, paths: tuple[str, ...]) -> str | None:
    """`path` (None where it doesn't take these dtypes), else the best one that doesn't round x (module doc)."""
    if path is not None and path not in paths:
        raise DapengError(
            f"kernel path {path!r} is not one this CPU runs here ({', '.join(paths)})",
            "pick one of cpu_matmul.kernel_paths()",
        )
    dot = weight == torch.bfloat16 and "avx512bf16" in paths
    if path is None:
        fp32_x = [p for p in paths if "f32" in _WEIGHTS[p]]
        path = "avx512bf16" if dot and x == torch.bfloat16 else fp32_x[-1]
    return None if path == "avx512bf16" and not dot else path


@functools.cache
def _library() -> _Library | None:
    """The built kernel and its paths, or None; decided once per process (`_library.cache_clear()` asks again)."""
    switch = os.environ.get("DAPENG_CPU_KERNELS", "1")
    if switch not in ("0", "1", *PATHS):
        raise DapengError(
            f"DAPENG_CPU_KERNELS={switch!r} is not a setting",
            f"use 0 (off), 1 (the best path the CPU runs) or one of {', '.join(PATHS)}",
        )
    if switch == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        return None
    try:
        cdll = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"dapeng: could not build its CPU decoding kernel ({e}); decoding runs on PyTorch's "
            "kernels, slower. Install gcc (or set CC) to get it; DAPENG_CPU_KERNELS=0 skips it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    cdll.cpu_path.restype = ctypes.c_int
    best = cdll.cpu_path()
    if best < 0:
        return None
    paths = PATHS[: best + 1]
    return _bound(cdll, paths if switch == "1" else paths[: PATHS.index(switch) + 1])


def _bound(cdll: ctypes.CDLL, paths: tuple[str, ...]) -> _Library:
    """The library with the signatures of its `matmul_<path>_<weight>` functions for `paths` set."""
    for p in paths:
        for w in _WEIGHTS[p]:
            fn = getattr(cdll, f"matmul_{p}_{w}")
            fn.argtypes = _ARGTYPES
            fn.restype = None
    cdll.matmul_avx2_u8g32.argtypes = _GROUPWISE_ARGTYPES
    cdll.matmul_avx2_u8g32.restype = None
    return _Library(cdll, paths)


def _build() -> Path:
    """The compiled kernel for this source and these flags, compiled now unless a previous run did."""
    compiler = _compiler()
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


def _compiler() -> str:
    """The C compiler the kernel is built with: `$CC`, else gcc, else cc."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler found")
    return compiler
