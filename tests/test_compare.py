"""train/compare.py end to end on a tiny backbone: runs train once, are evaluated on the dev split only, finished
runs are reused, and the table, results file and learning-curve plot come out; a run hits its time budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tests.conftest import load_script
from tests.test_eval import write_toy_data
from tests.test_train import toy_pairs

REPO = Path(__file__).resolve().parents[1]


def load_compare():
    return load_script("train/compare.py", "compare")


def write_spec(tmp_path: Path, backbone: Path, budget: float = 60) -> Path:
    recipe = {"backbone": str(backbone), "data": [str(toy_pairs(tmp_path / "pairs.jsonl"))], "num_tokens": 4,
              "batch_size": 8, "lr": 3e-2, "warmup_steps": 0, "logging_steps": 1, "seed": 3, "max_length": 64}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    common = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "eval_pairs": 0}
    spec = {
        "budget_minutes": budget, "output": str(tmp_path / "runs"), "results": str(tmp_path / "results" / "cmp"),
        "eval_tasks": ["STSBenchmark"], "eval_splits": ["validation"], "eval_dtype": "float32",
        "runs": [{"name": "a", "config": str(tmp_path / "recipe.yaml"), "overrides": common},
                 {"name": "b", "config": str(tmp_path / "recipe.yaml"), "overrides": {**common, "lr": 1e-2}}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_trains_evaluates_dev_and_reports(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    compare = load_compare()
    spec = write_spec(tmp_path, backbones["llama"])
    assert compare.main([str(spec)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results" / "cmp.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["a", "b"]
    for row in rows:
        assert row["steps"] == 4 and row["stopped_by_budget"] is False
        assert [step for step, _, _ in row["dev_curve"]] == [2, 4]
        assert all(minutes >= 0 for _, minutes, _ in row["dev_curve"])
        assert set(row["scores"]) == {"STSBenchmark"}
        assert row["trained_params"] == 4 * 32  # K soft tokens x hidden size of the tiny backbone
        assert row["peak_rss_gb"] > 0 and row["encode_texts_per_s"] > 0
        result = json.loads((tmp_path / "runs" / f"{row['name']}.eval-validation" / "STSBenchmark.json").read_text())
        assert set(result["scores"]) == {"validation"}  # selection sweeps never touch test
    assert (tmp_path / "results" / "cmp.png").stat().st_size > 0
    assert "| a | 4 |" in (tmp_path / "results" / "cmp.md").read_text()
    log = (tmp_path / "runs" / "a" / "train_log.jsonl").read_text()
    assert compare.main([str(spec)]) == 0  # finished runs are reused, not trained again
    assert (tmp_path / "runs" / "a" / "train_log.jsonl").read_text() == log


def test_train_only_leaves_the_evaluation_to_a_later_run(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    compare = load_compare()
    spec = write_spec(tmp_path, backbones["llama"])
    assert compare.main([str(spec), "--only", "a", "--train-only"]) == 0
    row = json.loads((tmp_path / "results" / "cmp.jsonl").read_text().splitlines()[0])
    assert [step for step, _, _ in row["dev_curve"]] == [2, 4] and row["scores"] == {} and row["average"] is None
    assert not (tmp_path / "runs" / "a.eval-validation").exists()
    assert compare.main([str(spec), "--only", "a"]) == 0  # the same run, now evaluated without training again
    row = json.loads((tmp_path / "results" / "cmp.jsonl").read_text().splitlines()[0])
    assert set(row["scores"]) == {"STSBenchmark"}


def test_budget_stops_a_run(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    compare = load_compare()
    spec = write_spec(tmp_path, backbones["llama"], budget=1e-9)
    assert compare.main([str(spec), "--only", "a"]) == 0
    budget = json.loads((tmp_path / "runs" / "a" / "budget.json").read_text())
    assert budget["stopped_by_budget"] is True
    row = json.loads((tmp_path / "results" / "cmp.jsonl").read_text().splitlines()[0])
    assert row["steps"] == 1


def test_stop_at_step_keeps_the_schedule_of_max_steps(tmp_path, backbones, monkeypatch):
    """stop_at_step ends a run early (a budget carried from another machine as steps) with the learning rate still
    laid out over max_steps; the row says so and records this machine's CPU."""
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    compare = load_compare()
    spec_path = write_spec(tmp_path, backbones["llama"])
    spec = yaml.safe_load(spec_path.read_text())
    spec["runs"][0]["stop_at_step"] = 2
    spec_path.write_text(yaml.safe_dump(spec))
    assert compare.main([str(spec_path), "--only", "a"]) == 0
    budget = json.loads((tmp_path / "runs" / "a" / "budget.json").read_text())
    assert budget["stopped_at_step"] == 2 and budget["stopped_by_budget"] is False
    row = json.loads((tmp_path / "results" / "cmp.jsonl").read_text().splitlines()[0])
    assert row["steps"] == 2 and row["stopped_at_step"] == 2 and row["cpu"]
    lrs = [r["learning_rate"] for r in map(json.loads, (tmp_path / "runs" / "a" / "train_log.jsonl").read_text()
                                            .splitlines()) if "learning_rate" in r]
    assert lrs[-1] > 0.4 * 3e-2  # linear decay over 4 steps, not over 2 (which would end near 0)
    assert "| a | 2 (stop_at_step) |" in (tmp_path / "results" / "cmp.md").read_text()


def test_a_bad_stop_at_step_is_refused_before_training(tmp_path, backbones, capsys):
    import pytest

    compare = load_compare()
    spec_path = write_spec(tmp_path, backbones["llama"])
    spec = yaml.safe_load(spec_path.read_text())
    spec["runs"][1]["stop_at_step"] = "159"
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit):
        compare.main([str(spec_path)])
    assert "run b: stop_at_step must be a whole number of steps >= 1, got '159'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_report_keeps_recorded_rows_of_runs_not_on_this_machine(tmp_path, backbones, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    compare = load_compare()
    spec = write_spec(tmp_path, backbones["llama"])
    assert compare.main([str(spec), "--only", "a"]) == 0
    first = (tmp_path / "results" / "cmp.jsonl").read_text()
    shutil.rmtree(tmp_path / "runs" / "a")  # a new machine: the run's folder is gone, its row is the record
    assert compare.main([str(spec), "--only", "b"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results" / "cmp.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["a", "b"]
    assert json.dumps(rows[0]) + "\n" == first
    spec_data = yaml.safe_load(spec.read_text())
    spec_data["runs"][0]["cpu"] = "a CPU named in the spec"  # a recorded row from before rows recorded their CPU
    spec.write_text(yaml.safe_dump(spec_data))
    first_row = {**json.loads(first), "cpu": None}
    (tmp_path / "results" / "cmp.jsonl").write_text(json.dumps(first_row) + "\n" + json.dumps(rows[1]) + "\n")
    assert compare.main([str(spec), "--report"]) == 0
    assert "| a CPU named in the spec |" in (tmp_path / "results" / "cmp.md").read_text().splitlines()[2]
    assert "| a | 4 |" in (tmp_path / "results" / "cmp.md").read_text()


def test_every_shipped_comparison_spec_builds_valid_training_configs():
    """Each run of each spec under train/configs (a YAML with `runs:`) gives a TrainConfig: a misspelt key, method
    or value fails here rather than after an hour of the runs before it; names are unique; selection is on dev."""
    import spt_embed

    specs = [p for p in sorted((REPO / "train" / "configs").glob("*.yaml")) if "runs" in yaml.safe_load(p.read_text())]
    assert {"sweep-spt.yaml", "sweep-lora.yaml", "sweep-family.yaml"} <= {p.name for p in specs}
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        names = [run["name"] for run in spec["runs"]]
        assert len(names) == len(set(names)), path
        if spec.get("eval_splits") != ["validation"]:
            assert spec.get("eval_splits") == ["test"], f"{path}: a spec evaluates on dev or, once selected, on test"
        for run in spec["runs"]:
            config = spt_embed.TrainConfig.from_sources(REPO / run["config"], output="unused", **run.get("overrides", {}))
            assert config.max_steps >= 1 and config.eval_pairs == 0, (path.name, run["name"])  # all 1,500 dev pairs


def test_budget_counts_the_seconds_mining_took(tmp_path):
    """--mine-negatives encodes a corpus before the first step: that time is part of the run's budget, once, read
    from the train_config.json the run writes before training (so a resumed run counts it as well)."""
    from types import SimpleNamespace

    compare = load_compare()
    run = tmp_path / "run"
    run.mkdir()
    assert compare.mining_seconds(run) == 0.0  # no train_config.json yet
    (run / "train_config.json").write_text(json.dumps({"mined_negatives": {
        "scifact-train": {"rows": 605, "seconds": 50.0, "reused": False},
        "medquad-qa": {"rows": 100, "seconds": 25.5, "reused": True}}}))
    assert compare.mining_seconds(run) == 75.5
    control = SimpleNamespace(should_training_stop=False, should_evaluate=False, should_save=False)
    budget = compare.Budget(1.0, seconds_before=10.0, run_dir=run)  # 60 s: mining and the earlier steps fill 85.5
    budget.on_train_begin(None, None, control)
    assert budget.mining_seconds == 75.5 and budget.seconds == 85.5
    budget.on_step_begin(None, None, control)
    budget.on_step_end(None, SimpleNamespace(global_step=1), control)
    assert control.should_training_stop and budget.hit  # stopped after one step: the budget was already spent
    quiet = compare.Budget(1.0, run_dir=tmp_path / "elsewhere")  # a run folder without mining: nothing added
    quiet.on_train_begin(None, None, control)
    assert quiet.seconds == 0.0


def test_lora_runs_are_dashed_by_their_method_not_their_name(tmp_path, backbones):
    """The learning-curve plot tells LoRA from prompt runs by the method the run's recipe resolves to: a LoRA run
    named without "lora" is dashed, a prompt run named "lora-..." is not, and a row whose config is gone is solid."""
    compare = load_compare()
    spec = yaml.safe_load(write_spec(tmp_path, backbones["llama"]).read_text())
    run = spec["runs"][0]
    assert compare.line_style({**run, "name": "baseline"}) == "-"
    assert compare.line_style({**run, "name": "lora-like-name"}) == "-"
    assert compare.line_style({**run, "name": "baseline", "overrides": {**run["overrides"], "method": "lora"}}) == "--"
    assert compare.line_style({**run, "config": str(tmp_path / "gone.yaml")}) == "-"
