"""Shared fixtures: small float64 configs and an in-process CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fastreplay.interface.cli import app


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# float64 synthetic run: BatchNorm, momentum 0.9, weight decay, one-cycle, augmentation, a
# no-decay group with its own lr, and a checkpoint interval that does not divide T.
SMALL = ["seed=3", "data.name=synthetic", "data.num_train=48", "data.num_test=8",
         "data.image_size=8", "data.augment=true", "train.epochs=3", "train.batch_size=12",
         "train.lr=0.2", "train.momentum=0.9", "train.weight_decay=5e-3",
         "train.schedule=onecycle", "train.bias_lr_scale=2.0", "train.dtype=float64",
         "replay.checkpoint_every=5"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fastreplay_json(*args: str) -> dict:
    """``python -m fastreplay ARGS --json`` in a subprocess from the repository root, as a user
    runs the examples -> its JSON. One intra-op thread: the examples' operations are tiny, and
    two OpenMP threads on a busy 2-core machine spin-wait for each other (10x slower)."""
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastreplay", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, f"fastreplay {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def set_args(overrides):
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


class Cli:
    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, expect: int = 0):
        res = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == expect, f"exit {res.exit_code}: {res.output}"
        return res

    def json(self, *args):
        res = self(*args, "--json")
        return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli():
    return Cli()


def run_module(*args, cwd=None, env=None, check=True):
    """Run `python -m fastreplay.interface.cli ...` in a subprocess (real exit codes and stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "fastreplay.interface.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=e)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
