"""Replays a stored run's scores again with other replay options and compares them to the stored ones.

    python benchmarks/compare_replays.py --run-dir runs/full --variants forward-vmap+compile

For each variant (hvp mode, "+compile" for replay.compile) prints one JSON line: the replay's
seconds (compilation included: a fresh process), the largest deviation from the stored scores
relative to each target's largest score, the relative l2 distance, and the smallest per-target
Spearman correlation. Exactness options change rounding only; this says how much, on a real run.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import spearmanr

from fastreplay.core.replay import replay
from fastreplay.interface.api import open_trained
from fastreplay.workflows.bench import replay_variant
from fastreplay.workflows.lds import stored_scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--variants", nargs="+", default=["forward-vmap+compile"])
    a = ap.parse_args()
    recipe, store = open_trained(a.run_dir)
    cfg = recipe.cfg
    stored, targets = stored_scores(recipe, store)
    for variant in a.variants:
        recipe.cfg = replay_variant(cfg, variant)
        res = replay(recipe, store, targets, cfg.measure.kind)
        diff = res.scores - stored
        scale = np.abs(stored).max(axis=1)
        print(json.dumps({
            "variant": variant, "targets": len(targets), "replay_s": res.seconds,
            "max_rel_dev": float((np.abs(diff).max(axis=1) / scale).max()),
            "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(stored)),
            "min_spearman": float(min(spearmanr(s, r).statistic
                                      for s, r in zip(res.scores, stored))),
        }), flush=True)
    store.close()


if __name__ == "__main__":
    main()
