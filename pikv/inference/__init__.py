"""Generation across processes (train/generate.py): a checkpoint loaded with its experts split over
the ranks (expert parallelism at decode, the training all-to-all dispatcher), prompts batched by
length, and one report gathered from every rank."""

from pikv.inference.generate import (GenerateOptions, GenerateReport, encode_prompts, format_report, generate_texts,
                                     kv_shard_group, needs_svd, read_prompts, svd_calibration)
from pikv.inference.load import check_expert_split, load_for_decoding, read_job, stored_config

__all__ = ["GenerateOptions", "GenerateReport", "check_expert_split", "encode_prompts", "format_report",
           "generate_texts", "kv_shard_group", "load_for_decoding", "needs_svd", "read_job", "read_prompts",
           "stored_config", "svd_calibration"]
