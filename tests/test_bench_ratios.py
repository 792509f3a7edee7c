"""train/bench_step.py's ratios: taken within each round, median over rounds, and only for the modes that ran (a run
of `--modes forward deep-suffix` still gets issue 16's deep-suffix verdict)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def row(kind: str, mode: str, rounds: list[float], mem: float = 100.0) -> dict:
    return {"kind": kind, "mode": mode, "round_medians_s": rounds, "median_s": sorted(rounds)[len(rounds) // 2],
            "step_mem_mb": mem, "peak_rss_mb": mem + 1000}


def test_deep_suffix_ratio_without_the_fast_mode(tmp_path):
    bench = load_script("train/bench_step.py", "bench_step")
    # Round by round 1.2, 1.5, 1.1: the median is 1.2 (within target); a ratio of the medians would differ.
    results = [row("pairs", "forward", [2.0, 2.0, 3.0]), row("pairs", "deep-suffix", [2.4, 3.0, 3.3])]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": results, "ratios": {}}))
    ratios = bench.ratios_of_file(path)["pairs"]
    assert ratios["deep_suffix_over_forward_per_round"] == pytest.approx([1.2, 1.5, 1.1])
    assert ratios["deep_suffix_over_forward"] == pytest.approx(1.2)
    assert ratios["deep_suffix_meets_target"] is True
    assert "fast_over_forward" not in ratios and "meets_requirements" not in ratios
    assert json.loads(path.read_text())["ratios"]["pairs"] == ratios  # written back


def test_base_modes_give_the_requirements_verdict():
    bench = load_script("train/bench_step.py", "bench_step")
    merged = {("pairs", mode): row("pairs", mode, rounds, mem) for mode, rounds, mem in [
        ("forward", [2.0, 2.0], 10.0), ("fast", [2.4, 2.4], 40.0), ("full", [4.0, 4.0], 100.0),
        ("lora", [4.0, 4.0], 120.0)]}
    ratios = bench.compute_ratios(merged, ["pairs"], ["forward", "fast", "full", "lora"])["pairs"]
    assert ratios["fast_over_forward"] == pytest.approx(1.2) and ratios["fast_mem_over_full"] == pytest.approx(0.4)
    assert ratios["meets_requirements"] is True
    merged["pairs", "fast"]["step_mem_mb"] = 60.0  # 0.6 of full: over the 0.5 memory requirement
    ratios = bench.compute_ratios(merged, ["pairs"], ["forward", "fast", "full", "lora"])["pairs"]
    assert ratios["meets_requirements"] is False
