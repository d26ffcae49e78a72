"""Compiled kernels of the KV cache, built on first use: the fused CPU decode attention over the
quantized stores (quant_decode.cpp, called from pikv.kv.quant).

`quant_decode()` returns the op (torch.ops.pikv_kernels.quant_decode) or None when it cannot be
built here (no compiler, PIKV_KV_KERNEL=0, a build error); the caller then runs its torch path,
which gives the same numbers. One log line per process says which path runs.

Build: torch.utils.cpp_extension.load (ninja, g++ -O3 -march=native -fopenmp-simd), once per
machine: the build folder is $PIKV_CACHE/torch_extensions (default ~/.cache/pikv/torch_extensions,
never torch's shared ~/.cache/torch_extensions), and its name carries a hash of the source and of
this CPU's model and flags (-march=native code must not be loaded on another CPU). Concurrent
processes (pytest workers, torchrun ranks) serialise on an flock of a file next to it: the kernel
drops the lock when a process dies, unlike torch's own lock file, which a killed build leaves
behind and which then hangs every later build; holding the flock, we remove such a stale one.
Measured: the first build takes ~40 s on the shared 2-core Xeon (loaded); later processes load
the cached library in well under a second.
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

SOURCE = Path(__file__).with_name("quant_decode.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"]
# how often each path ran in this process (tests assert the fused kernel was really taken)
calls = {"fused": 0, "torch": 0}

_state: dict = {}  # "op": the loaded op or None, "reason": why not


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


def build_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_tag().encode()
                            + torch.__version__.encode()).hexdigest()[:12]
    return f"pikv_quant_decode_{digest}"


def _build() -> Callable:
    from torch.utils.cpp_extension import load  # imported here: only a process that decodes pays for it

    name = build_name()
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        (folder / "lock").unlink(missing_ok=True)  # torch's lock file, stale: we hold the only lock
        start = time.perf_counter()
        load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(folder),
             is_python_module=False, verbose=False)
        seconds = time.perf_counter() - start
    log.debug("quant_decode kernel %s built or loaded in %.1f s", folder, seconds)
    return torch.ops.pikv_kernels.quant_decode


def quant_decode() -> Optional[Callable]:
    """The fused decode-attention op, built or loaded on the first call; None when unavailable."""
    if "op" not in _state:
        op, reason = None, None
        if os.environ.get("PIKV_KV_KERNEL", "1") == "0":
            reason = "disabled by PIKV_KV_KERNEL=0"
        else:
            try:
                op = _build()
            except Exception as err:  # no compiler, no ninja, a build error: the torch path runs
                first_line = (str(err).splitlines() or [""])[0][:200]
                reason = f"the C++ kernel could not be built ({type(err).__name__}: {first_line})"
        _state.update(op=op, reason=reason)
    return _state["op"]


def decode_op(q_BNTD: torch.Tensor, enabled: bool) -> Optional[Callable]:
    """The fused op for one decode step of a quantized store, or None: the caller's torch path
    runs (switched off, not on the CPU, autograd through the cache, or not buildable). Counts the
    path in `calls` and logs which one runs, once per process."""
    reason = None
    if not enabled:
        reason = "the fused kernel is switched off (fused_kernel = False)"
    elif q_BNTD.device.type != "cpu":
        reason = f"{q_BNTD.device.type} tensors (the kernel is CPU only; a Triton version is future work)"
    elif torch.is_grad_enabled() and q_BNTD.requires_grad:
        reason = "autograd through the cache (the kernel has no backward)"
    op = None if reason else quant_decode()
    calls["fused" if op is not None else "torch"] += 1
    if not _state.get("logged"):
        _state["logged"] = True
        if op is not None:
            log.info("quantized decode attention: fused C++ kernel (pikv/kv/kernels, built in %s)", cache_dir())
        else:
            log.info("quantized decode attention: torch blockwise path, %s", reason or _state["reason"])
    return op
