"""The timing harness every script in bench/ uses: interleaved rounds, medians, ratios against the
baseline of the same round, the machine and its load recorded, JSON + markdown out.

Why it lives in the package (not `bench/_harness.py`): benches are scripts, run by path, and a
script that imports a sibling needs `sys.path` edits; a unit test that loads one has to exec a file.
In `pikv.benchmark` it is an ordinary import for every script, test and notebook. It imports only
torch and the standard library; `pikv.benchmark`'s other modules hold the code benches share
(SmolLM2 loading, the kvpress comparison, seed pooling, in-process training runs) and sit at the
top of the layering beside the entry points: pikv/ modules below never import them.

Protocol: a round runs every case once; the order rotates from round to round (or is shuffled), so
a burst of load from other processes on a shared machine, or a slow drift, falls on all cases
alike. Warm-up rounds run the same way and are discarded. Per case the summary is the median over
rounds; the ratio of a case to the baseline is taken within each round, then summarised by its
median and a distribution-free interval for that median (order statistics of the binomial, exact
coverage given): robust to the outliers a shared machine produces.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ORDERS = ("rotate", "shuffle")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(repo: Optional[Path] = None) -> Optional[str]:
    """HEAD of the checkout this package is imported from, with '-dirty' if it has local changes."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """What a number depends on: CPU, cores, torch and its threads, load, code version, command, time.
    Call it at the start of a bench; `write_report` adds the load at the end."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(),
            "load_before": list(os.getloadavg()), "git_commit": git_commit(),
            "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),  # > 1 under torchrun
            "utc_start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def machine_line(machine: dict[str, Any]) -> str:
    """One markdown line with the machine and load (both ends, when the end was recorded)."""
    load = " ".join(f"{v:.2f}" for v in machine["load_before"])
    if machine.get("load_after"):
        load += " before, " + " ".join(f"{v:.2f}" for v in machine["load_after"]) + " after"
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
            f"({machine['torch_threads']} threads){', ' + machine['cuda'] if machine.get('cuda') else ''}; "
            f"load average (1/5/15 min) {load}; commit {machine['git_commit']}; {machine['utc_start']}.  \n"
            f"Command: `{machine['command']}`")


def round_orders(names: Sequence[str], rounds: int, order: str = "rotate", seed: int = 0) -> list[list[str]]:
    """The order of the cases in each round. rotate: round r starts at case r mod n (each case runs
    in each position equally often over n rounds); shuffle: a seeded permutation per round."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; allowed: {', '.join(ORDERS)}")
    names = list(names)
    if order == "rotate":
        return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]
    rng = random.Random(seed)
    return [rng.sample(names, len(names)) for _ in range(rounds)]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistic interval for the median of `values`, the narrowest
    symmetric one whose exact coverage P(x_(k) <= median <= x_(n+1-k)) is >= `confidence`; with
    fewer than 6 values no such interval exists and (min, max) is returned with its coverage."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval of no values")

    def coverage(k: int) -> float:  # 1 - 2 P(Binomial(n, 1/2) <= k - 1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


@dataclass
class Timings:
    """Seconds per call of every case, per round (warm-up excluded), and what each call returned."""
    baseline: str
    seconds: dict[str, list[float]]
    orders: list[list[str]]
    returned: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.orders)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratios(self, name: str, speedup: bool = False) -> list[float]:
        """Per round: case seconds / baseline seconds (speedup: baseline / case)."""
        pairs = zip(self.seconds[name], self.seconds[self.baseline])
        return [b / t if speedup else t / b for t, b in pairs]

    def ratio(self, name: str, speedup: bool = False, confidence: float = 0.95) -> dict[str, float]:
        """The median of the per-round ratios, its interval (see `median_interval`) and their range."""
        rs = self.ratios(name, speedup)
        lo, hi, cov = median_interval(rs, confidence)
        return {"median": statistics.median(rs), "low": lo, "high": hi, "coverage": cov, "min": min(rs), "max": max(rs)}

    def summary(self, speedup: bool = False) -> dict[str, dict[str, Any]]:
        return {n: {"median_s": self.median(n), "min_s": min(ts), "max_s": max(ts), "seconds": ts,
                    ("speedup" if speedup else "time_ratio"): self.ratio(n, speedup)}
                for n, ts in self.seconds.items()}

    def markdown(self, speedup: bool = False, unit: str = "ms", label: str = "case") -> str:
        """| case | median | min-max | ratio vs the baseline, median of rounds [interval] |"""
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        what = "speed-up" if speedup else "time"
        lines = [f"| {label} | median {unit} | min-max {unit} | {what} vs {self.baseline} (median of "
                 f"{self.rounds} rounds) [interval, coverage] |", "|---|---|---|---|"]
        for n, ts in self.seconds.items():
            r = self.ratio(n, speedup)
            lines.append(f"| {n} | {self.median(n) * scale:.4g} | {min(ts) * scale:.4g}-{max(ts) * scale:.4g} | "
                         f"{r['median']:.3f}x [{r['low']:.3f}, {r['high']:.3f}, {r['coverage']:.0%}] |")
        return "\n".join(lines) + "\n"


def run_rounds(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, baseline: Optional[str] = None,
               order: str = "rotate", seed: int = 0, before_each: Optional[Callable[[], None]] = None,
               timer: Callable[[], float] = time.perf_counter) -> Timings:
    """Time every case once per round for `warmup` + `rounds` rounds (see the module docstring).
    `before_each` runs untimed before every call (a barrier, zeroing gradients). A call's return
    value, when not None, is kept per round in `Timings.returned` (e.g. a share it measured).
    The baseline defaults to the first case."""
    if not cases:
        raise ValueError("run_rounds needs at least one case")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    baseline = next(iter(cases)) if baseline is None else baseline
    if baseline not in cases:
        raise ValueError(f"baseline={baseline!r} is not a case; cases: {', '.join(cases)}")
    orders = round_orders(list(cases), warmup + rounds, order, seed)
    seconds: dict[str, list[float]] = {n: [] for n in cases}
    returned: dict[str, list[Any]] = {}
    for r, names in enumerate(orders):
        for name in names:
            if before_each is not None:
                before_each()
            start = timer()
            value = cases[name]()
            elapsed = timer() - start
            if r >= warmup:
                seconds[name].append(elapsed)
                if value is not None:
                    returned.setdefault(name, []).append(value)
    return Timings(baseline, seconds, orders[warmup:], returned)


class Transcript:
    """Print lines as a bench produces them and keep them for its markdown report: `emit = Transcript();
    emit("| a | b |"); write_report(..., emit.text)`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def write_report(out: Path, stem: str, machine: dict[str, Any], data: dict[str, Any], markdown: str,
                 title: Optional[str] = None) -> tuple[Path, Path]:
    """Write <out>/<stem>.json ({"machine": ..., **data}) and <out>/<stem>.md (title, markdown, then
    the machine line), recording the load average at the end. Returns both paths."""
    machine = {**machine, "load_after": list(os.getloadavg()),
               "utc_end": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps({"machine": machine, **data}, indent=1, default=_jsonable) + "\n")
    head = f"# {title}\n\n" if title else ""
    md_path.write_text(f"{head}{markdown.rstrip()}\n\n{machine_line(machine)}\n")
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
