"""The README's own-task example, run exactly as written (extracted from README.md)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- own-model-example:"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_readme_own_model_example_runs_as_written(tmp_path):
    code = readme_example()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "(3, 64)"
    lds = float(lines[-1].split()[1])
    assert lds > 0.5, proc.stdout  # the example's run is smooth: its scores predict retraining
    assert (tmp_path / "runs" / "own-task" / "run.zarr").is_dir()
