"""What the hardware runs natively: the one place every package asks (training, loading, decoding).

`DAPENG_NATIVE_BF16=1` (or `0`) makes dapeng treat the CPU as having (or lacking) native bf16,
so one machine can run the code path of the other kind: the test suite forces it to cover the
default path of AVX-512/AMX CPUs on an AVX2-only one (correct there, only slower).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["native_bf16"]

NATIVE_BF16_ENV = "DAPENG_NATIVE_BF16"


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 runs natively (fast) on `device`.

    On CPUs oneDNN reports it for AVX-512 (BW/VL/DQ), AMX and Arm bf16; on AVX2-only CPUs
    bf16 falls back to reference kernels, several times slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_native_bf16()


@functools.cache
def _cpu_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
