"""Which CPU a measured plan belongs to.

A calibrated or tuned ``fast`` artifact holds kernel choices measured on one machine, and the best choice
differs between CPUs (gathers are cheap on recent Intel cores and microcoded on AMD Zen 4/5; dense ONNX
Runtime's GEMV is 3x faster on Zen 5 than on the Xeon of bench/RESULTS.md). The exporter records the CPU
it measured on (``plan_cpu`` in the artifact's metadata); ``sparsekit.runtime.replan`` measures again when
an artifact is loaded on a CPU with another ``cpu_key``.
"""

from __future__ import annotations

import platform
from pathlib import Path

from sparsekit.runtime.layers import kernel_isa

CPUINFO = Path("/proc/cpuinfo")
FIELDS = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "model_name"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's vendor, family, model and model name from /proc/cpuinfo ({} elsewhere)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        name = FIELDS.get(key.strip())
        if name and name not in out:
            out[name] = value.strip()
    return out


def cpu_identity() -> dict[str, str]:
    """vendor, family, model, model_name (Linux: /proc/cpuinfo; elsewhere what ``platform`` says), the
    machine architecture and the kernels' active code path (``SPARSEKIT_ISA`` changes it)."""
    info = _cpuinfo()
    if not info:
        info = {"vendor": "", "family": "", "model": "", "model_name": platform.processor()}
    return {"vendor": info.get("vendor", ""), "family": info.get("family", ""), "model": info.get("model", ""),
            "model_name": info.get("model_name", ""), "machine": platform.machine(), "isa": kernel_isa()}


def cpu_key(identity: dict[str, str]) -> str:
    """What a plan depends on: vendor, family and model (the microarchitecture), architecture and code path.
    Two SKUs of one microarchitecture share a key (their kernels' relative speeds match)."""
    return "/".join(identity.get(k, "") for k in ("vendor", "family", "model", "machine", "isa"))


def describe(identity: dict[str, str]) -> str:
    """One line for notes: "AMD EPYC 9R14 (AuthenticAMD family 25 model 17, avx512)"."""
    name = identity.get("model_name") or "unknown CPU"
    return (f"{name} ({identity.get('vendor') or '?'} family {identity.get('family') or '?'} model "
            f"{identity.get('model') or '?'}, {identity.get('isa') or '?'})")
