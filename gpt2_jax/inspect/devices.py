"""Peak memory bandwidth and matmul throughput of known accelerators, for utilisation figures.

Figures are the vendors' published dense (no sparsity) peaks for one JAX device. ``float32`` is the peak that
JAX's default matmul precision reaches: TF32 tensor cores on NVIDIA Ampere and newer, one bfloat16 pass on TPUs.
Unknown devices (every CPU included) give None here; the bench then measures the device's own peaks
(:mod:`gpt2_jax.inspect.peaks`), or takes ``--peak-bandwidth`` / ``--peak-flops``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """One device's peaks: ``bandwidth_gbs`` (GB/s = 1e9 bytes/s) and ``tflops`` per compute dtype (1e12 FLOP/s)."""

    name: str
    bandwidth_gbs: float
    tflops: dict[str, float]


def _gpu(name: str, gbs: float, half: float, tf32: float) -> DevicePeaks:
    return DevicePeaks(name, gbs, {"bfloat16": half, "float16": half, "float32": tf32})


def _tpu(name: str, gbs: float, bf16: float) -> DevicePeaks:
    return DevicePeaks(name, gbs, {"bfloat16": bf16, "float16": bf16, "float32": bf16})


# (lower-case substring of jax's device_kind, peaks); the first match wins, so specific names come first.
KNOWN_DEVICES: tuple[tuple[str, DevicePeaks | None], ...] = (
    ("h100 pcie", _gpu("NVIDIA H100 PCIe", 2000, 756, 378)),
    ("h100 nvl", _gpu("NVIDIA H100 NVL", 3900, 835, 418)),
    ("gh200", None),  # HBM3 and HBM3e versions differ (4.0 / 4.9 TB/s): give the peak
    ("h100", _gpu("NVIDIA H100 SXM", 3350, 989, 494)),
    ("h200", _gpu("NVIDIA H200 SXM", 4800, 989, 494)),
    ("a100-sxm4-80gb", _gpu("NVIDIA A100 SXM 80GB", 2039, 312, 156)),
    ("a100 80gb pcie", _gpu("NVIDIA A100 PCIe 80GB", 1935, 312, 156)),
    ("a100", _gpu("NVIDIA A100 40GB", 1555, 312, 156)),
    ("l40s", _gpu("NVIDIA L40S", 864, 362, 183)),
    ("l4", _gpu("NVIDIA L4", 300, 121, 60)),
    ("v100", DevicePeaks("NVIDIA V100", 900, {"float16": 125, "float32": 15.7})),
    ("t4", DevicePeaks("NVIDIA T4", 320, {"float16": 65, "float32": 8.1})),
    ("tpu v4", _tpu("TPU v4", 1200, 275)),
    ("tpu v5 lite", _tpu("TPU v5e", 819, 197)),
    ("tpu v5e", _tpu("TPU v5e", 819, 197)),
    ("tpu v5p", _tpu("TPU v5p", 2765, 459)),
    ("tpu v5", _tpu("TPU v5p", 2765, 459)),
    ("tpu v6 lite", _tpu("TPU v6e", 1640, 918)),
    ("tpu v6e", _tpu("TPU v6e", 1640, 918)),
)


def lookup_device(device_kind: str) -> DevicePeaks | None:
    """The peaks of a device by its ``jax.Device.device_kind`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or None when
    it is not in :data:`KNOWN_DEVICES` (or ambiguous there)."""
    kind = device_kind.lower()
    for pattern, peaks in KNOWN_DEVICES:
        if pattern in kind:
            return peaks
    return None


def resolve_peaks(device: Any, dtype: str, bandwidth_gbs: float | None = None,
                  tflops: float | None = None, measured: Any = None) -> dict[str, Any]:
    """The peaks to divide by: the given ones, else the table's for ``device`` at ``dtype``, else the
    ``measured`` ones (a :class:`~gpt2_jax.inspect.peaks.MeasuredPeaks`), else None.

    Returns:
        ``{"bandwidth_gbs", "bandwidth_source", "tflops", "tflops_source", "known_as"}``, sources being
        ``"given"``, ``"table"``, ``"measured"`` or None (unknown).
    """
    known = lookup_device(getattr(device, "device_kind", ""))
    out: dict[str, Any] = {"known_as": known.name if known else None}
    if bandwidth_gbs is not None:
        out["bandwidth_gbs"], out["bandwidth_source"] = float(bandwidth_gbs), "given"
    elif known is not None:
        out["bandwidth_gbs"], out["bandwidth_source"] = float(known.bandwidth_gbs), "table"
    elif measured is not None:
        out["bandwidth_gbs"], out["bandwidth_source"] = float(measured.bandwidth_gbs), "measured"
    else:
        out["bandwidth_gbs"], out["bandwidth_source"] = None, None
    if tflops is not None:
        out["tflops"], out["tflops_source"] = float(tflops), "given"
    elif known is not None and dtype in known.tflops:
        out["tflops"], out["tflops_source"] = float(known.tflops[dtype]), "table"
    elif measured is not None and dtype in measured.tflops:
        out["tflops"], out["tflops_source"] = float(measured.tflops[dtype]), "measured"
    else:
        out["tflops"], out["tflops_source"] = None, None
    return out
