"""training_minutes: wall-clock between log lines, less dev evaluations, resumed segments added up."""

from __future__ import annotations

import pytest

from spt_embed.training.run_log import training_minutes


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # one segment: 60 s to step 5, then 60 s more of which a 30 s dev evaluation
        ([{"step": 0, "event": "train_begin", "time": 100.0}, {"step": 5, "loss": 1.0, "time": 160.0},
          {"step": 10, "eval_runtime": 30.0, "time": 220.0}], [(5, 1.0), (10, 1.5)]),
        # killed after step 5, resumed 1000 s later: the gap is not training
        ([{"step": 0, "event": "train_begin", "time": 0.0}, {"step": 5, "loss": 1.0, "time": 120.0},
          {"step": 5, "event": "train_begin", "time": 1120.0}, {"step": 10, "loss": 0.5, "time": 1180.0}],
         [(5, 2.0), (10, 3.0)]),
        # a log written before lines carried a time gives no points
        ([{"step": 5, "loss": 1.0}], []),
    ],
)
def test_training_minutes(records, expected):
    points = training_minutes(records)
    assert [step for step, _ in points] == [step for step, _ in expected]
    assert [minutes for _, minutes in points] == pytest.approx([minutes for _, minutes in expected])
