"""What this machine's CPU is and can do, read from /proc/cpuinfo (Linux); benchmarks record it beside their numbers."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor"), else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (avx2, avx512_vnni, amx_bf16, ...); empty where /proc/cpuinfo is missing."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_summary() -> dict:
    """Model name, and the flags that decide int8 and bfloat16 speed on a CPU (AVX-512, VNNI, AMX, AVX512-BF16)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpu": cpu_name(), "cpu_flags": [flag for flag in wanted if flag in cpu_flags()]}


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """The installed version of each distribution in `names` (None where it is not installed); benchmarks record
    them beside their numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
