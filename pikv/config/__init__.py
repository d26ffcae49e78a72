"""Typed job configuration: the schema, its defaults and the checks that need no builder.

Defaults live here (the tiny CPU model); `configs/*.yaml` holds only what differs; CLI dotlist
overrides (`train.max_steps=10`) come last. This is lingua's/OLMo-core's layering, built on
OmegaConf structured configs so an unknown key or a wrong type is rejected by the schema itself.
`validate` checks each key's range and choices and the rules between sections; every builder
(create_moe, the routers, the model, the KV compressor, the data pipeline) checks its own options,
and `pikv.tasks.check_job` runs them all before any work. Every error names the key, the bad value
and what is allowed. The package imports nothing else from pikv: it is the bottom of the layering.
schema.py holds the dataclasses, checks.py the checks; this module loads, merges and stores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pikv.config.checks import (CHOICES, RESUME_MODES, OptionError, config_keys, default_latent_window,
                                invalid_key, moe_layer_indices, resolve, validate)
from pikv.config.schema import (DataConfig, DistillConfig, FlexConfig, JobConfig, KVConfig, LoggingConfig,
                                LRGroup, ModelConfig, MoEConfig, ParallelConfig, TimeConfig, TrainConfig)

__all__ = ["CHOICES", "RESUME_MODES", "RENAMED", "OptionError", "config_keys", "default_latent_window",
           "invalid_key", "moe_layer_indices", "resolve", "validate", "DataConfig", "DistillConfig",
           "FlexConfig", "JobConfig", "KVConfig", "LoggingConfig", "LRGroup", "ModelConfig", "MoEConfig",
           "ParallelConfig", "TimeConfig", "TrainConfig", "merge_config", "load_config", "to_dict",
           "from_dict", "save_yaml"]

# Keys renamed so that one word means one thing (docs/architecture.md, "Names"). A YAML file or an
# override that uses the old key is an error naming the new one; a config stored in a checkpoint
# written before the rename is migrated (it must stay loadable for eval and export).
RENAMED = {"kv.distill_weight": "kv.attn_error_weight"}
# Keys added after configs were already being stored, with the behaviour a stored config that lacks
# one was written under (not today's default, which may differ: the default rotary fraction is 0.5).
ADDED = {"model.rotary_fraction": 1.0,
         "kv.latent_bits": 16,  # before int8 latents: fp16 codes
         "kv.latent_window": 0}  # before the exact window: none


def _schema_error(err: OmegaConfBaseException, where: str) -> ValueError:
    key = getattr(err, "full_key", None) or "?"
    msg = getattr(err, "msg", str(err)).splitlines()[0]
    return ValueError(f"{where}: config key '{key}': {msg}")


def _check_renamed(keys: list[str], where: str) -> None:
    for key in keys:
        if key in RENAMED:
            raise ValueError(f"{where}: config key '{key}' was renamed to '{RENAMED[key]}'")


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return []
    return [k for name, v in data.items() for k in [prefix + str(name)] + _dotted_keys(v, f"{prefix}{name}.")]


def merge_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                 base: Optional[dict] = None) -> JobConfig:
    """Defaults <- `base` (a nested dict: the values of a pretrained model, pikv.tasks.pretrained) <-
    YAML file <- dotlist overrides, schema-checked (unknown keys, types) only."""
    merged = OmegaConf.structured(JobConfig)
    if base:
        merged = OmegaConf.merge(merged, OmegaConf.create(base))
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--config {path!r}: no such file")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:  # one line naming the file and the place, not a parser traceback
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path}: malformed YAML{where}: {problem}") from None
        _check_renamed(_dotted_keys(OmegaConf.to_container(loaded)), f"config file {path}")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"config file {path}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        _check_renamed([item.split("=", 1)[0].strip()], f"override {item!r}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"override {item!r}") from None
    return OmegaConf.to_object(merged)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    """Defaults <- YAML file <- dotlist overrides, resolved and validated (the checks that need no
    builder; an entry point runs pikv.tasks.load_job, which adds the builders' checks)."""
    return validate(resolve(merge_config(path, overrides)))


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> JobConfig:
    """Rebuild a config stored in a checkpoint or run directory (same validation as load); keys
    renamed since it was written (RENAMED) are migrated, keys added since (ADDED) take the value it
    was written under."""
    data = {section: dict(v) if isinstance(v, dict) else v for section, v in data.items()}
    for old, new in RENAMED.items():
        (s_old, n_old), (s_new, n_new) = old.split("."), new.split(".")
        if n_old in data.get(s_old, {}):
            data[s_new][n_new] = data[s_old].pop(n_old)
    for key, written_under in ADDED.items():
        section, name = key.split(".")
        if isinstance(data.get(section), dict):
            data[section].setdefault(name, written_under)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _schema_error(err, "stored config") from None
    return validate(resolve(OmegaConf.to_object(merged)))


def save_yaml(cfg: JobConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
