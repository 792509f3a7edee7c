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
    monkeypatch.setattr(family, "SEEDS", (("suffix", ("s", "s2", "s3")), ("prefix", ("p", "p2"))))
    budget = tmp_path / "budget.jsonl"
    budget.write_text(json.dumps({"name": "s", "scores": dict(zip(family.TASKS, (70.0, 60.0, 30.0, 50.0))),
                                  "average": 52.7,  # as compare.py recorded it (re-summed: 52.5); the table keeps it
                                  "trained_params": None, "training_minutes": 60.1, "seconds_per_step": 9.5,
                                  "encode_texts_per_s": 18.8, "cpu": "Some CPU (notes)", "overrides": {"seed": 7},
                                  "steps": 100, "dev_curve": [[50, 30.5, 80.0], [100, 60.1, 81.0]]})
                      + "\n" + json.dumps({"name": "s2", "scores": dict(zip(family.TASKS, (71.0, 61.0, 31.0, 49.0))),
                                           "average": 53.1,  # as compare.py recorded it; the table keeps it
                                           "cpu": "Some CPU", "overrides": {"seed": 8},
                                           "steps": 240, "dev_curve": [[80, 9.0, 79.0], [240, 27.0, 82.0]]}) + "\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [
        {"mode": "fast", "kind": "pairs", "median_s": 2.701, "step_mem_mb": 1024.0, "trainable_params": 9216},
        {"mode": "fast", "kind": "triplets", "median_s": 9.0, "step_mem_mb": 1.0, "trainable_params": 9216}]}))
    out = tmp_path / "family.md"
    assert family.main(["--budget", str(budget), "--bench", str(bench), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| zero | 60.0 | 50.0 | 20.0 | 40.0 | 42.5 |")
    assert lines[3] == ("| suffix | **70.0** | **60.0** | **30.0** | **50.0** | 52.7 | 9,216 | 60.1 | 9.5 | 2.7 | 1.0 "
                        "| 18.8 | Some CPU |")
    assert lines[4].startswith("| prefix | not run |")
    seeds = lines[lines.index("Seeds (runs that differ only in `seed`):") + 2:]
    assert seeds[2] == "| suffix | s | 7 | 70.0 | 60.0 | 30.0 | 50.0 | 52.7 | Some CPU |"
    assert seeds[3] == "| suffix | s2 | 8 | 71.0 | 61.0 | 31.0 | 49.0 | 53.1 | Some CPU |"
    assert seeds[4].startswith("| suffix | s3 | not run |")  # a seed still to run
    assert seeds[5] == ("| **suffix** | mean of 2 seeds | – | 70.5 | 60.5 | 30.5 | 49.5 | **52.9** (spread 0.4) "
                        "| – |")  # the mean of the seeds that ran
    assert seeds[6].startswith("| prefix | p | not run |") and seeds[7].startswith("| prefix | p2 | not run |")
    assert len(seeds) == 8  # no mean for a method with fewer than two seeds run
    assert out.with_suffix(".png").stat().st_size > 0
    # the seed picture: dev against the share of each run's own budget steps (a faster CPU's minutes do not compare)
    rows = family.load_rows(budget)
    assert family.budget_share_curve(rows["s"]) == [(50.0, 80.0), (100.0, 81.0)]
    assert family.budget_share_curve(rows["s2"]) == [(33.3, 79.0), (100.0, 82.0)]
    assert (tmp_path / "family-seeds.png").stat().st_size > 0
