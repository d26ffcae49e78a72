"""What the scripts in bench/ share. The harness (`pikv.benchmark.harness`, re-exported here) needs
only torch; the other modules import the parts of pikv they measure and are imported explicitly:
`pikv.benchmark.runs` (train a config in-process), `pikv.benchmark.smollm2` (the frozen SmolLM2
anchor model and its corpus windows), `pikv.benchmark.kvpress` (PiKV policies vs kvpress presses),
`pikv.benchmark.seeds` (KV results pooled over training seeds)."""

from pikv.benchmark.harness import (Timings, Transcript, machine_info, machine_line, median_interval, round_orders,
                                    run_rounds, write_report)

__all__ = ["Timings", "Transcript", "machine_info", "machine_line", "median_interval", "round_orders", "run_rounds",
           "write_report"]
