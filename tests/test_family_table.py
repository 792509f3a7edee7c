"""train/family_table.py assembles issue 16's table from results files: recorded rows, the zero-shot folder, the
step benchmark, and "not run" for a method whose run is not recorded."""

import json

from tests.conftest import load_script


def test_family_table_from_results_files(tmp_path, monkeypatch):
    family = load_script("train/family_table.py", "family_table")
    zero = tmp_path / "zero"
    zero.mkdir()
    for task, score in zip(family.TASKS, (0.6, 0.5, 0.2, 0.4)):
        (zero / f"{task}.json").write_text(json.dumps({"task_name": task, "scores": {"test": [{"main_score": score}]}}))
    monkeypatch.setattr(family, "ROWS", (("zero", None, str(zero)), ("suffix", "fast", "s"), ("prefix", "prefix", "p")))
    budget = tmp_path / "budget.jsonl"
    budget.write_text(json.dumps({"name": "s", "scores": dict(zip(family.TASKS, (70.0, 60.0, 30.0, 50.0))),
                                  "trained_params": None, "training_minutes": 60.1, "seconds_per_step": 9.5,
                                  "encode_texts_per_s": 18.8, "cpu": "Some CPU (notes)"}) + "\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [
        {"mode": "fast", "kind": "pairs", "median_s": 2.701, "step_mem_mb": 1024.0, "trainable_params": 9216},
        {"mode": "fast", "kind": "triplets", "median_s": 9.0, "step_mem_mb": 1.0, "trainable_params": 9216}]}))
    out = tmp_path / "family.md"
    assert family.main(["--budget", str(budget), "--bench", str(bench), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| zero | 60.0 | 50.0 | 20.0 | 40.0 | 42.5 |")
    assert lines[3] == ("| suffix | **70.0** | **60.0** | **30.0** | **50.0** | 52.5 | 9,216 | 60.1 | 9.5 | 2.7 | 1.0 "
                        "| 18.8 | Some CPU |")
    assert lines[4].startswith("| prefix | not run |")
    assert out.with_suffix(".png").stat().st_size > 0
