"""Compiled kernels of the KV cache, built on first use: the fused CPU decode attention over the
quantized stores (quant_decode.cpp, called from pikv.kv.quant) and over the decoupled latent's int8
codes (mla_decode.cpp, called from pikv.kv.mla); both sources are one extension, built once per variant.

Two variants of the same sources: "simd" (ops torch.ops.pikv_kernels.quant_decode / mla_decode: the
AVX-512 loops where the compiler targets AVX512F/BW, which -march=native gives on such a CPU;
elsewhere the same portable loops as the other) and "portable" (quant_decode_portable /
mla_decode_portable, compiled with -DPIKV_NO_SIMD: the auto-vectorised loops only, the baseline
`bench/kv_decode_speed.py --portable-kernel` times beside it). A store picks one with `fused_simd`
(False: portable).

`quant_decode(variant)` / `mla_decode(variant)` return the op or None when it cannot be built here
(no compiler, PIKV_KV_KERNEL=0, a build error); the caller then runs its torch path, which gives the
same numbers. One log line per process and kernel says which path runs.

Build: torch.utils.cpp_extension.load (ninja, g++ -O3 -march=native -fopenmp-simd), once per
machine and variant: the build folder is $PIKV_CACHE/torch_extensions (default
~/.cache/pikv/torch_extensions, never torch's shared ~/.cache/torch_extensions), and its name carries
a hash of the sources, the flags and this CPU's model and flags (-march=native code must not be
loaded on another CPU). Concurrent processes (pytest workers, torchrun ranks) serialise on an flock
of a file next to it: the kernel drops the lock when a process dies, unlike torch's own lock file,
which a killed build leaves behind and which then hangs every later build; holding the flock, we
remove such a stale one. Measured on the shared 2-core Xeon: the first build of both sources (ninja
compiles them in parallel) takes 15.8 s (simd) + 14.7 s (portable) at load 2.5-3 (quant_decode.cpp
alone: 9.2 s + 8.5 s at load ~3.5); later processes load both cached libraries in 0.05 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("quant_decode.cpp", "mla_decode.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("decode_math.h", "quant_decode_avx512.h", "mla_decode_avx512.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"]
# variant -> (extra flags, op name suffix)
VARIANTS = {"simd": ([], ""), "portable": (["-DPIKV_NO_SIMD"], "_portable")}
KERNELS = ("quant_decode", "mla_decode")
# how often each path ran in this process (tests assert the kernel asked for was really taken):
# "fused" the default (SIMD) kernel, "portable" the -DPIKV_NO_SIMD one, "torch" the torch path; the
# quantized stores' counters, then the decoupled latent's with the prefix "mla_"
calls = {f"{prefix}{path}": 0 for prefix in ("", "mla_") for path in ("fused", "portable", "torch")}

_state: dict = {}  # variant -> {"loaded": bool, "reason": why not}; "logged": the kernels logged


def cache_dir() -> Path:
    """The project's folder of built extensions ($PIKV_CACHE as pikv.data.corpus.resolve_cache_dir)."""
    return Path(os.environ.get("PIKV_CACHE") or "~/.cache/pikv").expanduser() / "torch_extensions"


def _cpu_tag() -> str:
    """Model and feature flags of this CPU (what -march=native compiles for)."""
    info = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return info or platform.processor() or platform.machine()


def build_name(variant: str = "simd") -> str:
    flags = FLAGS + VARIANTS[variant][0]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS]) + " ".join(flags).encode()
                            + _cpu_tag().encode() + torch.__version__.encode()).hexdigest()[:12]
    return f"pikv_decode{VARIANTS[variant][1]}_{digest}"


def _build(variant: str) -> None:
    from torch.utils.cpp_extension import load  # imported here: only a process that decodes pays for it

    name = build_name(variant)
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        (folder / "lock").unlink(missing_ok=True)  # torch's lock file, stale: we hold the only lock
        start = time.perf_counter()
        load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=FLAGS + VARIANTS[variant][0],
             build_directory=str(folder), is_python_module=False, verbose=False)
        seconds = time.perf_counter() - start
    log.debug("decode kernels %s built or loaded in %.1f s", folder, seconds)


def kernel_op(kernel: str, variant: str = "simd") -> Optional[Callable]:
    """The fused decode-attention op `kernel` (one of KERNELS) of `variant` ("simd" or
    "portable"), the extension built or loaded on the first call; None when unavailable."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {list(KERNELS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; allowed: {sorted(VARIANTS)}")
    if variant not in _state:
        loaded, reason = False, None
        if os.environ.get("PIKV_KV_KERNEL", "1") == "0":
            reason = "disabled by PIKV_KV_KERNEL=0"
        else:
            try:
                _build(variant)
                loaded = True
            except Exception as err:  # no compiler, no ninja, a build error: the torch path runs
                first_line = (str(err).splitlines() or [""])[0][:200]
                reason = f"the C++ kernel could not be built ({type(err).__name__}: {first_line})"
        _state[variant] = {"loaded": loaded, "reason": reason}
    return getattr(torch.ops.pikv_kernels, kernel + VARIANTS[variant][1]) if _state[variant]["loaded"] else None


def quant_decode(variant: str = "simd") -> Optional[Callable]:
    """The quantized stores' op (quant_decode.cpp) of `variant`, or None."""
    return kernel_op("quant_decode", variant)


def mla_decode(variant: str = "simd") -> Optional[Callable]:
    """The decoupled latent's op (mla_decode.cpp) of `variant`, or None."""
    return kernel_op("mla_decode", variant)


def reason(variant: str = "simd") -> Optional[str]:
    """Why `kernel_op(..., variant)` gave None (None when it loaded or was not asked for yet)."""
    return _state.get(variant, {}).get("reason")


def simd_tiles() -> list[int]:
    """Tiles the AVX-512 loops took in this process: [per-token keys, KIVI keys, values] (all 0
    where the default build has no AVX-512 loops, or the kernel is not loaded)."""
    return list(torch.ops.pikv_kernels.simd_tiles()) if quant_decode("simd") is not None else [0, 0, 0]


def mla_simd_tiles() -> int:
    """Tiles the AVX-512 loops of mla_decode.cpp took in this process (0 without them)."""
    return int(torch.ops.pikv_kernels.mla_simd_tiles()) if mla_decode("simd") is not None else 0


def decode_op(q_BNTD: torch.Tensor, enabled: bool, simd: bool = True,
              kernel: str = "quant_decode") -> Optional[Callable]:
    """The fused op `kernel` for one decode step of a store, or None: the caller's torch path
    runs (switched off, not on the CPU, autograd through the cache, or not buildable). `simd`
    False picks the portable build (the benchmark's baseline). Counts the path in `calls` and logs
    which one runs, once per process and kernel."""
    why = None
    if not enabled:
        why = "the fused kernel is switched off (fused_kernel = False)"
    elif q_BNTD.device.type != "cpu":
        why = f"{q_BNTD.device.type} tensors (the kernel is CPU only; a Triton version is future work)"
    elif torch.is_grad_enabled() and q_BNTD.requires_grad:
        why = "autograd through the cache (the kernel has no backward)"
    variant = "simd" if simd else "portable"
    op = None if why else kernel_op(kernel, variant)
    prefix = "" if kernel == "quant_decode" else "mla_"
    calls[prefix + (("fused" if simd else "portable") if op is not None else "torch")] += 1
    logged = _state.setdefault("logged", set())
    if kernel not in logged:
        logged.add(kernel)
        if op is not None:
            log.info("%s decode attention: fused C++ kernel (%s, pikv/kv/kernels, built in %s)", kernel, variant,
                     cache_dir())
        else:
            log.info("%s decode attention: torch path, %s", kernel, why or reason(variant))
    return op
