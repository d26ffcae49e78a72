"""The Time-MoE data: real series bundled with statsmodels (no network).

  training series   sunspots (yearly, 1700-2008), Mauna Loa CO2 (monthly means of the weekly
                    record), and ten US macro series (quarterly 1959-2009: real GDP, consumption,
                    investment, government spending, disposable income, CPI, M1, T-bill rate,
                    unemployment, population)
  held-out series   El Nino sea-surface temperatures (monthly, 1950-2010), US inflation and real
                    interest rate (quarterly): never seen in training

Each training series contributes windows from its first `train_fraction` (train split); its
later windows, whose forecast targets lie after that boundary, form the validation split; the
held-out series' windows form the heldout split. Every window is normalised with the mean and
standard deviation of its own context (no information from the forecast targets), so trending
series and series of different units share one model. Season lengths drive the seasonal-naive
baseline (sunspots: the ~11-year solar cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Series:
    name: str
    values: np.ndarray  # float64 [N]
    season: int


_MACRO_TRAIN = ("realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "tbilrate", "unemp", "pop")
_MACRO_HELDOUT = ("infl", "realint")


def check_series(s: Series, min_len: int, what: str) -> None:
    if not np.isfinite(s.values).all():
        bad = int(np.flatnonzero(~np.isfinite(s.values))[0])
        raise ValueError(f"series {s.name!r} has a NaN/inf value at index {bad}; fill or drop it first")
    if len(s.values) < min_len:
        raise ValueError(f"series {s.name!r} has {len(s.values)} points, shorter than {what} ({min_len})")


def load_series() -> tuple[list[Series], list[Series]]:
    """(training series, held-out series)."""
    import statsmodels.api as sm

    ds = sm.datasets
    co2 = ds.co2.load_pandas().data["co2"]
    # statsmodels' documented preparation of this weekly record (59 missing weeks): monthly means,
    # a month without any reading carried forward.
    co2_monthly = co2.resample("MS").mean().ffill().to_numpy()
    macro = ds.macrodata.load_pandas().data
    elnino = ds.elnino.load_pandas().data.drop(columns="YEAR").to_numpy().reshape(-1)
    train = [Series("sunspots", ds.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(float), 11),
             Series("co2", co2_monthly, 12)]
    train += [Series(f"macro_{c}", macro[c].to_numpy(float), 4) for c in _MACRO_TRAIN]
    heldout = [Series("elnino", elnino.astype(float), 12)]
    heldout += [Series(f"macro_{c}", macro[c].to_numpy(float), 4) for c in _MACRO_HELDOUT]
    return train, heldout


def normalise(window: np.ndarray, context_len: int) -> np.ndarray:
    """Scale a window [..., L] by its first context_len points' mean and std."""
    ctx = window[..., :context_len]
    return (window - ctx.mean(-1, keepdims=True)) / (ctx.std(-1, keepdims=True) + 1e-5)


@dataclass
class WindowSet:
    """Windows [N, context_len + length] (normalised) and each window's series season."""
    windows: np.ndarray
    seasons: np.ndarray
    series: list[str]


def make_windows(series: list[Series], context_len: int, length: int, lo: float, hi: float,
                 stride: int = 1) -> WindowSet:
    """Every window of context_len + length points whose `length` targets lie in [lo*N, hi*N) of
    their series (the context may reach before lo*N). Raises ValueError for a series with NaNs or
    shorter than context_len + length."""
    wins, seasons, names = [], [], []
    for s in series:
        check_series(s, context_len + length, f"time.context_len + horizon = {context_len} + {length}")
        n = len(s.values)
        first, last = max(context_len, int(lo * n)), int(hi * n) - length
        for start in range(first, last + 1, stride):
            wins.append(s.values[start - context_len:start + length])
            seasons.append(s.season)
            names.append(s.name)
    if not wins:
        raise ValueError(f"no window of {context_len} + {length} points fits the series "
                         f"{', '.join(s.name for s in series)} in [{lo}, {hi}) of their length")
    return WindowSet(normalise(np.stack(wins), context_len).astype(np.float32), np.array(seasons), names)


def seasonal_naive(context_BT: np.ndarray, seasons_B: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat each context's last season: forecast[t] = context[T - s + (t mod s)]."""
    out = np.empty((context_BT.shape[0], horizon), dtype=context_BT.dtype)
    T = context_BT.shape[1]
    for i, s in enumerate(seasons_B):
        out[i] = context_BT[i, T - s + np.arange(horizon) % s]
    return out
