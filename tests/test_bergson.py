"""fastreplay's scores against EleutherAI bergson's independent MAGIC on the same fine-tuning run
(benchmarks/compare_bergson.py: the CPU size of examples/hf_finetune.py, float64). bergson is an
optional dependency (`pip install 'fastreplay[bergson]'`, which also brings torchopt and
datasets): without it this test skips. Measured 2026-12-03 on 2 CPU cores: Pearson 0.99999999999993
on each of 4 targets, relative L2 4.8e-7."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bergson")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_bergson_agrees_with_fastreplay_on_the_same_run(tmp_path, monkeypatch):
    import compare_bergson as compare
    monkeypatch.setenv("FASTREPLAY_CACHE", str(tmp_path / "cache"))
    fr = compare.fastreplay_scores([11, 30], "float64", tmp_path / "run")
    bg = compare.bergson_scores(fr, [11, 30], "float64")
    assert compare._rel_diff(fr["final"], bg["final"]) < 1e-6  # the same trajectory
    for ours, theirs in zip(fr["scores"], bg["scores"]):
        assert np.corrcoef(ours, theirs)[0, 1] >= 0.9999
    assert np.linalg.norm(fr["scores"] - bg["scores"]) <= 1e-4 * np.linalg.norm(fr["scores"])
