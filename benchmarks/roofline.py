"""Roofline arithmetic for the benchmarks: FLOPs counted by torch, the device's dense peak, and the fraction.

Conventions (what the printed numbers mean):
- **FLOPs** are the matrix FLOPs torch's ``FlopCounterMode`` counts for the very call that is timed (matmul,
  linear, bmm, einsum, and SDPA as ``4 * B * H * S_q * S_k * d``; a multiply-add is 2 FLOPs). Element-wise
  work (GELU, LayerNorm, softmax) is not counted, as in every roofline of a transformer.
- **Achieved TFLOP/s** = those FLOPs / the median wall time of the call.
- **Datasheet peak**: the vendor's *dense* (no 2:4 sparsity) tensor-core peak for the dtype, for the GPUs in
  :data:`DATASHEET_PEAK_TFLOPS`; None elsewhere (a CPU has no such number here).
- **Measured peak**: the rate of one large square matmul in the same dtype, timed in the same process - the
  achievable ceiling of this device, and the baseline the fraction is also given against.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Dense tensor-core peaks in TFLOP/s, from NVIDIA's data sheets (the sparse figures are twice these).
# Keys are matched as substrings of torch.cuda.get_device_name(), most specific first.
DATASHEET_PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.5, "tf32": 378.0, "float32": 51.2},
    "H100 NVL": {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0},
    "H100": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    "H200": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},  # same compute as the H100 SXM5
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5},
}


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` for ``precision`` ("bfloat16", "tf32" or "float32"), or None."""
    for key, peaks in DATASHEET_PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # the CPU flash kernel is not in torch's registry; its matrix work is SDPA's, counted the same way
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """Matrix FLOPs of one call of ``fn()`` (see the module's conventions)."""
    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _cpu_sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` after one warm-up call, the device synchronised around each."""
    fn()  # warm-up (kernel selection, caches)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """TFLOP/s of a ``size x size`` by ``size x size`` matmul in ``dtype`` on ``device`` (median of ``repeats``)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    return 2 * size**3 / timed(lambda: a @ b, device, repeats) / 1e12


def roofline(flops: int, seconds: float, measured_peak: float, datasheet: float | None) -> dict:
    """Achieved TFLOP/s of ``flops`` done in ``seconds`` and its fractions of the two peaks."""
    achieved = flops / seconds / 1e12
    return {
        "tflops": round(achieved, 4),
        "of_measured_peak": round(achieved / measured_peak, 4),
        "of_datasheet_peak": None if datasheet is None else round(achieved / datasheet, 4),
    }
