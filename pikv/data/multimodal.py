"""The Flex-MoE data: scikit-learn's bundled diabetes study (Efron et al. 2004, 442 patients) as
three modalities from three different measurement procedures:

  demographics  age, sex                     what the patient reports at intake
  exam          body-mass index, blood pressure   measured at the physical examination
  serum         six blood-serum measurements (total cholesterol, LDL, HDL, TC/HDL, log
                triglycerides, glucose)      a laboratory assay of a blood sample

In a clinic each can be absent on its own (no lab visit, no exam record), which is the setting
Flex-MoE targets. The label is whether disease progression one year later is above the median of
the training patients (binary: the per-combination metric is accuracy).

Shapes: N patients, D = 10 features, M = 3 modalities. A modality combination is a bit mask over
the M modalities (bit m set = modality m observed); its index is mask - 1 (0 .. 2^M - 2), so the
full combination has index 2^M - 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODALITIES: dict[str, tuple[str, ...]] = {
    "demographics": ("age", "sex"),
    "exam": ("bmi", "bp"),
    "serum": ("s1", "s2", "s3", "s4", "s5", "s6"),
}
NUM_COMBOS = 2 ** len(MODALITIES) - 1
FULL_COMBO = NUM_COMBOS - 1


def modality_dims() -> list[int]:
    return [len(cols) for cols in MODALITIES.values()]


def combo_index(observed_BM: torch.Tensor) -> torch.Tensor:
    """observed_BM bool [B, M] -> combination index int64 [B] (mask - 1)."""
    bits = 2 ** torch.arange(observed_BM.shape[-1], device=observed_BM.device)
    return (observed_BM.long() * bits).sum(-1) - 1


def combo_mask(index: int) -> np.ndarray:
    """Combination index -> observed bool [M]."""
    return np.array([(index + 1) >> m & 1 for m in range(len(MODALITIES))], dtype=bool)


def combo_name(index: int) -> str:
    return "+".join(name for name, on in zip(MODALITIES, combo_mask(index)) if on)


def check_inputs(features_BD: torch.Tensor, observed_BM: torch.Tensor) -> None:
    """Clear errors for what a caller can get wrong: widths, dtypes, empty combinations, NaNs."""
    D, M = sum(modality_dims()), len(MODALITIES)
    if features_BD.dim() != 2 or features_BD.shape[-1] != D:
        raise ValueError(f"features shape {tuple(features_BD.shape)}: expected [batch, {D}] "
                         f"(the {M} modalities {', '.join(f'{k}={len(v)}' for k, v in MODALITIES.items())})")
    if observed_BM.shape != (features_BD.shape[0], M) or observed_BM.dtype != torch.bool:
        raise ValueError(f"observed mask shape {tuple(observed_BM.shape)} dtype {observed_BM.dtype}: expected "
                         f"bool [batch, {M}], one column per modality ({', '.join(MODALITIES)})")
    if not observed_BM.any(-1).all():
        raise ValueError("a sample has no observed modality: each needs at least one of "
                         f"{', '.join(MODALITIES)}")
    if not torch.isfinite(features_BD).all():
        raise ValueError("features contain NaN/inf; mark a missing modality in the observed mask "
                         "(its values are ignored) instead of NaN")


@dataclass
class MultimodalSplit:
    features: np.ndarray  # float32 [N, D], standardised with the training patients' statistics
    labels: np.ndarray  # int64 [N]
    observed: np.ndarray  # bool [N, M]: the modalities this split's patients have


def _train_missing(n: int, mode: str, rate: float, rng: np.random.Generator) -> np.ndarray:
    M = len(MODALITIES)
    obs = np.ones((n, M), dtype=bool)
    if mode == "random":  # each modality absent independently; a patient keeps at least one
        obs = rng.random((n, M)) >= rate
        empty = ~obs.any(1)
        obs[empty, rng.integers(0, M, empty.sum())] = True
    elif mode == "structured":
        # Monotone, clinic-like: a `rate` share of patients has no lab panel (serum); half of them
        # also no exam record (intake form only). Four of the seven combinations never occur in
        # training, so the test table also shows combinations unseen in training.
        perm = rng.permutation(n)
        no_lab = perm[: int(round(rate * n))]
        obs[no_lab, 2] = False
        obs[no_lab[: len(no_lab) // 2], 1] = False
    return obs


def load_multimodal(missing: str, missing_rate: float, validation_fraction: float,
                    heldout_fraction: float, seed: int) -> dict[str, MultimodalSplit]:
    """Patient-level split into train / validation / heldout. Training patients lack modalities as
    `missing` says; validation and heldout patients have all (the evaluation masks them into every
    combination). Raises ValueError on NaNs in the data."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    names = list(data.feature_names)
    cols = [names.index(c) for group in MODALITIES.values() for c in group]
    x = np.asarray(data.data, dtype=np.float64)[:, cols]
    y = np.asarray(data.target, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("the diabetes data contains NaN/inf values")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_held, n_val = int(round(heldout_fraction * len(y))), int(round(validation_fraction * len(y)))
    parts = {"heldout": perm[:n_held], "validation": perm[n_held:n_held + n_val], "train": perm[n_held + n_val:]}
    tr = parts["train"]
    mean, std = x[tr].mean(0), x[tr].std(0)
    threshold = np.median(y[tr])
    out = {}
    for split, idx in parts.items():
        obs = (_train_missing(len(idx), missing, missing_rate, rng) if split == "train"
               else np.ones((len(idx), len(MODALITIES)), dtype=bool))
        out[split] = MultimodalSplit(((x[idx] - mean) / std).astype(np.float32),
                                     (y[idx] > threshold).astype(np.int64), obs)
    return out


def masked_features(features: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Zero the columns of unobserved modalities (what a zero-filled model sees)."""
    col_mask = np.repeat(observed, modality_dims(), axis=1)
    return np.where(col_mask, features, 0.0).astype(np.float32)
