"""pikv.benchmark.harness: round order, ratios within rounds, the median interval, the report files."""

import json
import time

import pytest

from pikv.benchmark import machine_info, median_interval, round_orders, run_rounds, write_report


def test_rotating_order_puts_every_case_in_every_position():
    orders = round_orders(["a", "b", "c"], 6)
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]] and orders[3:] == orders[:3]
    for position in range(3):
        assert sorted(o[position] for o in orders[:3]) == ["a", "b", "c"]


def test_shuffled_order_is_seeded_and_runs_each_case_once_per_round():
    a, b = round_orders("abcd", 5, "shuffle", seed=3), round_orders("abcd", 5, "shuffle", seed=3)
    assert a == b and all(sorted(o) == list("abcd") for o in a)
    assert len({tuple(o) for o in a}) > 1  # not one fixed order
    with pytest.raises(ValueError, match=r"order='random'; allowed: rotate, shuffle"):
        round_orders("ab", 2, "random")


def test_calls_follow_the_orders_and_warmup_is_discarded():
    calls = []
    cases = {n: (lambda n=n: calls.append(n)) for n in "xyz"}
    t = run_rounds(cases, rounds=4, warmup=2)
    assert calls == [n for o in round_orders("xyz", 6) for n in o]  # warm-up rounds rotate too
    assert t.orders == round_orders("xyz", 6)[2:] and all(len(v) == 4 for v in t.seconds.values())


def test_ratios_are_taken_within_each_round_on_a_known_clock():
    """A fake clock: 'slow' costs 3x 'fast' in every round, and the whole machine is 10x slower
    in round 2 (a load burst). Per-round ratios stay exactly 3; the medians are of raw seconds."""
    clock = [0.0]
    round_of = {"n": 0}
    scale = {0: 1.0, 1: 1.0, 2: 10.0, 3: 1.0, 4: 1.0}

    def case(cost):
        def fn():
            clock[0] += cost * scale[round_of["n"] // 2]
            round_of["n"] += 1
        return fn

    t = run_rounds({"fast": case(1.0), "slow": case(3.0)}, rounds=5, warmup=0, timer=lambda: clock[0])
    assert t.seconds["fast"] == [1.0, 1.0, 10.0, 1.0, 1.0] and t.seconds["slow"] == [3.0, 3.0, 30.0, 3.0, 3.0]
    assert t.ratios("slow") == [3.0] * 5 and t.ratio("slow")["median"] == 3.0
    assert t.ratio("slow", speedup=True)["median"] == pytest.approx(1 / 3)
    assert t.median("slow") == 3.0 and t.ratio("fast")["median"] == 1.0


def test_ratio_of_real_work_with_a_known_cost_relation():
    """3x the loop iterations costs ~3x the CPU time. Timed with thread_time (CPU time of this
    thread), so other processes on a shared machine do not enter; 2.4-3.6 leaves room for cache
    and frequency effects."""
    def work(n):
        return lambda: sum(i * i for i in range(n))

    t = run_rounds({"once": work(100_000), "thrice": work(300_000)}, rounds=7, warmup=1, timer=time.thread_time)
    r = t.ratio("thrice")
    assert 2.4 < r["median"] < 3.6 and r["low"] <= r["median"] <= r["high"]


def test_median_interval_uses_order_statistics_with_exact_coverage():
    lo, hi, cov = median_interval(list(range(10, 0, -1)))  # n=10: x_(2)..x_(9), 1 - 2*11/1024
    assert (lo, hi) == (2, 9) and cov == pytest.approx(1 - 22 / 1024)
    lo, hi, cov = median_interval([5.0, 1.0, 3.0, 2.0, 4.0])  # n=5 has no 95% interval: min-max
    assert (lo, hi) == (1.0, 5.0) and cov == pytest.approx(1 - 2 / 32)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"baseline='z' is not a case; cases: a"):
        run_rounds({"a": lambda: None}, rounds=1, baseline="z")
    with pytest.raises(ValueError, match=r"rounds=0 must be >= 1"):
        run_rounds({"a": lambda: None}, rounds=0)


def test_report_files_hold_the_machine_the_data_and_the_table(tmp_path):
    machine = machine_info(["bench/x.py", "--quick"])
    assert machine["command"].endswith("bench/x.py --quick") and len(machine["load_before"]) == 3
    assert machine["cores"] >= 1 and machine["torch"] and machine["utc_start"].endswith("+00:00")
    t = run_rounds({"base": lambda: None, "other": lambda: 7}, rounds=3, warmup=0)
    json_path, md_path = write_report(tmp_path / "out", "x", machine, {"timings": t.summary(), "note": tmp_path},
                                      t.markdown(), title="X bench")
    report = json.loads(json_path.read_text())
    assert report["machine"]["command"] == machine["command"] and len(report["machine"]["load_after"]) == 3
    assert report["note"] == str(tmp_path) and report["timings"]["other"]["time_ratio"]["median"] > 0
    assert len(report["timings"]["base"]["seconds"]) == 3 and t.returned == {"other": [7, 7, 7]}
    md = md_path.read_text()
    assert md.startswith("# X bench\n\n| case | median ms |") and "| other |" in md
    assert "time vs base (median of 3 rounds)" in md and "Command: `" in md and "bench/x.py --quick`" in md
    assert f"{machine['cores']} cores" in md and " after;" in md
