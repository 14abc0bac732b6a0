"""examples/stdlib_lm.py run as a user would: `magic` then `lds` through the CLI, in a
subprocess, from the repository root. A causal transformer trained with AdamW on the source of
this Python's standard library; its whole run is smooth enough that the exact scores predict
retraining: LDS >= 0.9 at keep 0.99 (weight removal)."""
from __future__ import annotations

import math

from conftest import fastreplay_json as fastreplay

TASK = "examples/stdlib_lm.py:make_task"
CONFIG = "examples/stdlib_lm.toml"
MODELS = 12


def test_language_model_example_scores_predict_retraining(tmp_path):
    run_dir = tmp_path / "lm"
    magic = fastreplay("magic", "--preset", "test", "--config", CONFIG, "--task", TASK,
                       "--targets", "0:3", "--run-dir", str(run_dir))
    assert magic["targets"] == [0, 1, 2]
    assert magic["test_accuracy"] > 0.2, magic  # next-byte accuracy: 256 byte values
    assert magic["plots"] == []  # token ids are not images and the task draws none
    lds = fastreplay("lds", "--run-dir", str(run_dir), "--task", TASK, "--models", str(MODELS),
                     "--keep", "0.99", "--no-plots")
    assert lds["models"] == MODELS and lds["removal"] == "weight"
    # Measured on 2 CPU cores with 16 models, test 0..3: 0.993 [0.991, 1.006].
    assert lds["lds_mean"] >= 0.9 and not math.isnan(lds["lds_mean"]), lds
