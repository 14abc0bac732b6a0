"""`fastreplay compare`: the peers through their libraries (the peers extra) against the same
stored LDS retrainings as MAGIC, on the digits example (CPU, under a minute); the sign of each
method's scores; a method that is missing or fails is a row saying so, not a crash."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import fastreplay_json as fastreplay

from fastreplay.methods import METHODS, Method, method_names

TASK = "examples/digits_mlp.py:make_task"
CONFIG = "examples/digits_mlp.toml"
PEERS = ("trak", "kronfluence", "dattri")
if os.environ.get("FASTREPLAY_REQUIRE_HF") != "1":  # CI installs the test extra: peers included
    for name in PEERS:
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits example scored for 8 targets, with a 16-model LDS experiment at keep 0.99."""
    run_dir = str(tmp_path_factory.mktemp("compare") / "digits")
    fastreplay("magic", "--preset", "test", "--config", CONFIG, "--task", TASK, "--targets",
               "0:8", "--run-dir", run_dir, "--no-plots")
    fastreplay("lds", "--run-dir", run_dir, "--task", TASK, "--models", "16", "--keep", "0.99",
               "--no-plots")
    return run_dir


def test_compare_holds_every_method_against_the_same_retrainings(digits_run):
    out = fastreplay("compare", "--run-dir", digits_run, "--task", TASK)
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["magic", "gradsim", "trak", "ekfac", "kfac", "if", "tracin"]
    assert out["group"] == "lds/weight_keep0.99" and out["models"] == 16
    assert out["targets"] == list(range(8))
    assert not [r for r in rows.values() if r["skipped"]], rows
    assert rows["magic"]["lds"] >= 0.9  # README: 0.99 on these 8 targets with 32 models
    assert all(rows[m]["seconds_per_target"] > 0 for m in list(rows)[1:])
    files = [f"{digits_run}/compare/weight_keep0.99.{ext}" for ext in ("csv", "json", "png")]
    assert all(os.path.isfile(f) for f in files)
    assert json.load(open(files[1]))["rows"][0]["method"] == "magic"


def test_the_table_says_which_methods_were_compared(digits_run):
    """Without --json: the table on stdout, one line per method, MAGIC first."""
    import subprocess
    import sys

    from conftest import ROOT
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastreplay", "compare", "--run-dir", digits_run,
                           "--task", TASK, "--methods", "magic,gradsim", "--no-plots",
                           "--log-level", "WARNING"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["method", "LDS", "95%"]
    assert lines[1].startswith("MAGIC (fastreplay, exact)") and lines[2].startswith("gradient")


def test_a_negated_method_gets_the_negated_statistic_and_a_missing_one_a_row(digits_run,
                                                                             monkeypatch):
    """A planted method whose scores are exactly MAGIC's negated: per target, its LDS is
    MAGIC's negated (Spearman is odd in its scores), so the comparison itself keeps signs. A
    method whose library is absent is a row naming the install."""
    from fastreplay.interface.api import run_compare_command
    method_names()
    magic = METHODS["magic"]
    monkeypatch.setitem(METHODS, "negated", Method("negated", "MAGIC negated",
                                                   lambda ctx, t: -magic.score(ctx, t)))
    monkeypatch.setitem(METHODS, "absent", Method("absent", "needs a package", magic.score,
                                                  library="no_such_package_here"))
    from fastreplay.task import load_task
    res = run_compare_command(digits_run, "magic,negated,absent", 0.99, "weight", plots=False,
                              task=load_task(TASK))
    by = {r.method: r for r in res.rows}
    np.testing.assert_allclose(by["negated"].per_target, -np.asarray(by["magic"].per_target),
                               rtol=0, atol=1e-12)
    assert by["absent"].skipped == ("absent: needs the no_such_package_here package (pip "
                                    "install 'fastreplay[peers]')")


def test_a_peer_that_fails_costs_its_row_not_the_table(digits_run, monkeypatch):
    """A peer library raising its own error (here a RuntimeError, as dattri's vmap did on a
    Hugging Face model) becomes a row saying so; the methods after it are still compared."""
    from fastreplay.interface.api import run_compare_command
    from fastreplay.task import load_task

    def breaks(ctx, targets):
        raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor\nmore")
    method_names()
    monkeypatch.setitem(METHODS, "broken", Method("broken", "a failing peer", breaks,
                                                  library="numpy"))
    res = run_compare_command(digits_run, "broken,magic", 0.99, "weight", plots=False,
                              task=load_task(TASK))
    by = {r.method: r for r in res.rows}
    assert by["broken"].skipped == ("failed in numpy: RuntimeError: vmap: It looks like you're "
                                    "calling .item() on a Tensor")
    assert by["broken"].lds is None and by["magic"].lds >= 0.9


def test_dattri_tracin_at_the_final_state_is_gradient_similarity(digits_run):
    """The peers' sign on a case whose truth is known: TracIn over the final state alone, with
    weight 1 and exact dot products, is -(fastreplay's gradient similarity) before conversion,
    so after it the two must agree."""
    from fastreplay.interface.api import open_trained
    from fastreplay.methods import PeerContext
    from fastreplay.methods.native import gradient_similarity
    from fastreplay.methods.peers import tracin
    from fastreplay.task import load_task
    recipe, store = open_trained(digits_run, task=load_task(TASK))
    try:
        ctx = PeerContext(recipe, store, "loss")
        final = ctx.checkpoints()[-1]
        ctx.checkpoints = lambda: [(final[0], final[1], 1.0)]
        got, want = tracin(ctx, [0, 3]), gradient_similarity(ctx, [0, 3])
    finally:
        store.close()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_every_peer_scores_in_fastreplays_sign(digits_run):
    """Each peer's scores correlate positively with the exact scores (mean over the targets):
    a peer left in its library's own orientation ("positive = helpful") would correlate
    negatively."""
    from fastreplay.interface.api import open_trained
    from fastreplay.methods import resolve_methods
    from fastreplay.task import load_task
    from fastreplay.workflows.compare import run_compare
    recipe, store = open_trained(digits_run, task=load_task(TASK))
    try:
        _, scores = run_compare(recipe, store, resolve_methods(
            "magic,gradsim,ekfac,kfac,if,tracin"), 0.99, "weight")
        # TRAK at its default projection (2048 > the 1,347 training examples) is noise here,
        # which says nothing of its sign: held at a projection that works instead
        from fastreplay.methods import PeerContext
        from fastreplay.methods.peers import trak
        scores["trak"] = trak(PeerContext(recipe, store, "loss"), list(range(8)), proj_dim=512)
    finally:
        store.close()
    magic = scores.pop("magic")
    for name, s in scores.items():
        corr = [np.corrcoef(s[k], magic[k])[0, 1] for k in range(len(magic))]
        assert np.mean(corr) > 0.2, (name, np.round(corr, 3))
