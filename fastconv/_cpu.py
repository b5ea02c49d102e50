"""What the CPU reports at run time: vector ISA, vector width and cache sizes.

Kernels that emit their own vector code (the GEMM micro-kernel) size their register tiles and
cache blocks from here; nothing assumes one ISA.  The same machine kind has been an AMD Zen 3
(AVX2, 16 vector registers) in one session and a Zen 4 (AVX-512, 32 registers) in the next.

* ISA: ``'avx512'`` when the CPU has avx512f, ``'avx2'`` with avx2 and fma, else ``'portable'``
  (16-byte vectors: SSE2 on any x86-64, NEON-sized elsewhere; LLVM lowers them to what exists).
  Read from the CPU features numba compiles for: ``NUMBA_CPU_FEATURES`` / ``NUMBA_CPU_NAME`` when
  the user set them (e.g. a portable cache build), else llvmlite's host features, else
  ``/proc/cpuinfo``.  numba's on-disk cache is keyed by the target CPU's name and features, so code
  compiled for one ISA is never loaded on another.
* Caches: L1d, L2, L3 bytes of cpu0 from ``/sys/devices/system/cpu/cpu0/cache``; where that is
  missing, 32 KiB / 512 KiB / 8 MiB (the smallest of recent x86 server cores).
"""
from __future__ import annotations

import functools
import os

#: bytes of one vector register per ISA, and how many such registers it has
VECTOR_BYTES = {"avx512": 64, "avx2": 32, "portable": 16}
VECTOR_REGISTERS = {"avx512": 32, "avx2": 16, "portable": 16}

_DEFAULT_CACHES = {"l1d": 32 << 10, "l2": 512 << 10, "l3": 8 << 20}


def _features_from(text):
    """The set of enabled feature names in an LLVM feature string ``+avx2,-avx512f,...``."""
    return {f[1:].lower() for f in text.replace(" ", "").split(",") if f.startswith("+")}


@functools.cache
def cpu_features() -> frozenset:
    """Enabled CPU feature names (LLVM spelling: 'avx2', 'fma', 'avx512f', ...)."""
    import numba

    feats = numba.config.CPU_FEATURES
    if feats:  # the user pinned the target numba compiles for: describe that, not the host
        return frozenset(_features_from(feats))
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return frozenset()  # a named generic target without features: assume nothing
    try:
        from llvmlite import binding

        return frozenset(_features_from(binding.get_host_cpu_features().flatten()))
    except Exception:  # pragma: no cover - llvmlite without host feature support
        pass
    try:  # pragma: no cover - fallback
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()  # pragma: no cover


def isa_of(features) -> str:
    """'avx512', 'avx2' or 'portable' for a set of feature names."""
    if "avx512f" in features:
        return "avx512"
    if "avx2" in features and "fma" in features:
        return "avx2"
    return "portable"


@functools.cache
def isa() -> str:
    """The vector ISA fastconv's own kernels target on this machine."""
    return isa_of(cpu_features())


@functools.cache
def vendor() -> str:
    """'amd', 'intel' or '' (unknown): the CPU's maker, from /proc/cpuinfo.  Machines of one ISA differ
    by maker in what runs fast (Zen 4 splits 512-bit operations, its gathers are slow), so the
    calibration of 'auto' keeps a table per ISA and maker (:func:`fastconv._select.table_for`)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    v = line.split(":", 1)[1].strip()
                    return {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(v, "")
    except OSError:  # pragma: no cover - no procfs
        pass
    return ""  # pragma: no cover


def calibration_key() -> str:
    """The calibration table this machine's fit is stored under: 'avx512-amd', or the ISA alone
    where the maker is unknown."""
    return f"{isa()}-{vendor()}" if vendor() else isa()


def vector_bytes() -> int:
    """Bytes of one vector register for :func:`isa` (64, 32 or 16)."""
    return VECTOR_BYTES[isa()]


def _parse_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * mult


@functools.cache
def cache_sizes(root="/sys/devices/system/cpu/cpu0/cache") -> dict:
    """``{'l1d': bytes, 'l2': bytes, 'l3': bytes}`` of one core (L3: the whole shared cache)."""
    sizes = dict(_DEFAULT_CACHES)
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return sizes
    for e in entries:
        try:
            with open(os.path.join(root, e, "level")) as fh:
                level = int(fh.read())
            with open(os.path.join(root, e, "type")) as fh:
                kind = fh.read().strip()
            with open(os.path.join(root, e, "size")) as fh:
                size = _parse_size(fh.read())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size <= 0:
            continue
        key = {1: "l1d", 2: "l2", 3: "l3"}.get(level)
        if key is not None:
            sizes[key] = size
    return sizes


def describe() -> dict:
    """Everything above in one dict (for reports and bug reports)."""
    return {"isa": isa(), "vector_bytes": vector_bytes(), **cache_sizes()}
