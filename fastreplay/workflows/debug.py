"""`fastreplay debug`: which training examples hurt a group of test examples, from one replay.

The measurement is the group's mean test loss (or margin), measure.reduce=mean; its exact
scores rank every training example by how much up-weighting it worsens the group ("harm"). The
ranking is written as a table, drawn, optionally checked against planted label noise
(data.label_noise), and optionally proved by retraining without the top K harmful examples
against K random ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from ..config import score_name
from ..core.measure import accuracy, measure, resolve_group
from ..core.recipe import Recipe
from ..core.replay import replay
from ..core.train import load_final, train
from ..exceptions import StoreError
from ..progress import log
from ..store import RunStore
from .baselines import baseline_harms


def harm(scores: np.ndarray, kind: str) -> np.ndarray:
    """How much up-weighting each training example worsens the group: its score for a loss
    (lower is better), minus its score for a margin (higher is better)."""
    return scores if kind == "loss" else -scores


def auroc(values: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``values`` ranking the ``positives`` (bool) first: the
    Mann-Whitney U statistic over (positives x negatives)."""
    pos, neg = values[positives], values[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def precision_at(values: np.ndarray, positives: np.ndarray, k: int) -> float:
    top = np.argsort(-values, kind="stable")[:k]
    return float(positives[top].mean()) if k else float("nan")


@dataclass
class Evaluation:
    """A model judged on the group and apart from it. The harm ranking is chosen to lower the
    group's loss, so the group's own figures are in-sample; the test examples outside the group
    (held out: none when the group is the whole test set) say whether the gain carries over."""
    value: float
    """The group's mean measurement."""
    accuracy: float
    """On the whole test set."""
    held_out_value: Optional[float]
    """The mean measurement over the test examples outside the group."""
    held_out_accuracy: Optional[float]


def evaluate(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor, members: list[int],
             held_out: list[int], kind: str) -> Evaluation:
    def mean(ids):
        return float(measure(recipe, theta, buffers, ids, kind).mean())
    return Evaluation(mean(members), accuracy(recipe, theta, buffers),
                      mean(held_out) if held_out else None,
                      accuracy(recipe, theta, buffers, examples=held_out) if held_out else None)


@dataclass
class Retraining(Evaluation):
    """The model retrained without K examples, judged as the trained run was."""
    removed: str = ""
    predicted_change: float = 0.0
    """-(sum of the removed examples' scores): the first-order prediction of value - original."""


@dataclass
class DebugResult(Evaluation):
    """The trained run judged (Evaluation), its ranking and what was checked against it."""
    group: str = ""
    members: int = 0
    held_out_members: int = 0
    """Test examples outside the group (0 for the whole test set)."""
    kind: str = "loss"
    ranking: list[int] = field(default_factory=list)
    """Training ids, most harmful first."""
    scores: np.ndarray = field(default=None, repr=False)
    detection: Optional[dict] = None
    retrained: list[Retraining] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self, top: int) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "ranking")}
        out["most_harmful"] = self.ranking[:top]
        out["most_helpful"] = self.ranking[::-1][:top]
        return out


def detection(harms: dict[str, np.ndarray], flipped: np.ndarray) -> dict:
    """How well each ranking (the scores' harm and every baseline's) finds the planted flipped
    labels: AUROC and precision at the number flipped; ``best_baseline`` names the baseline with
    the highest AUROC."""
    num_train = len(next(iter(harms.values())))
    positives = np.zeros(num_train, dtype=bool)
    positives[flipped] = True
    k = int(positives.sum())
    out: dict = {"flipped": k}
    for name, values in harms.items():
        out[name] = {"auroc": auroc(values, positives),
                     f"precision_at_{k}": precision_at(values, positives, k)}
    baselines = [n for n in harms if n != "scores"]
    out["best_baseline"] = max(baselines, key=lambda n: out[n]["auroc"]) if baselines else None
    return out


def retrain_without(recipe: Recipe, members: list[int], held_out: list[int], kind: str,
                    scores: np.ndarray, removed: np.ndarray, what: str) -> Retraining:
    w = torch.ones(recipe.num_train, dtype=recipe.dtype, device=recipe.device)
    w[torch.as_tensor(removed, device=recipe.device)] = 0
    log.info("retraining without %d examples (%s)", len(removed), what)
    state = train(recipe, w)
    judged = evaluate(recipe, state.theta, state.buffers, members, held_out, kind)
    return Retraining(**asdict(judged), removed=what,
                      predicted_change=float(-scores[removed].sum()))


def score_group(recipe: Recipe, store: RunStore, name: str, members: list[int],
                kind: str) -> tuple[np.ndarray, float]:
    """Scores (N,) of the mean ``kind`` measurement over the test examples ``members`` (a
    group named ``name``) and the replay seconds: read from the store when it holds them, else
    replayed in one pass and stored as scores/<kind>_mean_<name> (one row, id 0, with the
    members in its attributes)."""
    array = score_name(recipe.cfg, group=name)
    if array in store.score_names():
        rows, attrs = store.read_scores(array)
        if attrs.get("members") == list(members):
            log.info("group %s already scored in the store", name)
            return rows[0], 0.0
        raise StoreError(f"{store.path} holds a group {name!r} with other members; name the "
                         "group differently or clean the scores (fastreplay clean --what scores)")
    if store.status == "cleaned":
        raise StoreError(f"the checkpoints of {store.path} were cleaned, so group {name!r} cannot "
                         "be replayed; rerun with --force to retrain")
    res = replay(recipe, store, members, kind, group=True)
    store.append_scores(array, res.scores, [0], kind,
                        {"start_step": recipe.cfg.replay.start_step, "group": name,
                         "members": list(members)})
    log.info("replayed the mean %s over %d test example(s) (group %s) in %.1fs", kind,
             len(members), name, res.seconds)
    return res.scores[0], res.seconds


def run_debug(recipe: Recipe, store, group: str = "all", remove: int = 0,
              seed: int = 0) -> DebugResult:
    """Score the group (or read its stored scores), rank, check the ranking and the baselines
    against planted label noise (builtin data with data.label_noise > 0), and retrain without
    the ``remove`` most harmful examples, without the top ``remove`` of the best baseline (the
    final training loss when no noise was planted) and without ``remove`` random ones."""
    from ..data import flipped_examples
    kind = recipe.cfg.measure.kind
    name, members = resolve_group(group, recipe)
    scores, _ = score_group(recipe, store, name, members, kind)
    final = load_final(recipe, store)
    inside = set(members)
    held_out = [i for i in range(recipe.data.num_test) if i not in inside]
    harms = harm(scores, kind)
    ranking = [int(i) for i in np.argsort(-harms, kind="stable")]
    judged = evaluate(recipe, final.theta, final.buffers, members, held_out, kind)
    res = DebugResult(**asdict(judged), group=name, members=len(members),
                      held_out_members=len(held_out), kind=kind, ranking=ranking, scores=scores)
    d = recipe.cfg.data
    noisy = d.label_noise > 0 and recipe.builtin_data  # the flips are known
    baseline = "training_loss"
    if noisy or remove:
        rankings = {"scores": harms,
                    **baseline_harms(recipe, final.theta, final.buffers, members, kind)}
        if noisy:
            res.detection = detection(rankings, flipped_examples(
                recipe.num_train, d.label_noise, d.label_noise_seed))
            baseline = res.detection["best_baseline"]
    if remove:
        rng = np.random.default_rng([seed, 4])
        by_baseline = np.argsort(-rankings[baseline], kind="stable")[:remove]
        res.retrained = [
            retrain_without(recipe, members, held_out, kind, scores,
                            np.asarray(ranking[:remove]), f"top {remove} harmful"),
            retrain_without(recipe, members, held_out, kind, scores, by_baseline,
                            f"top {remove} by {baseline}"),
            retrain_without(recipe, members, held_out, kind, scores,
                            rng.choice(recipe.num_train, size=remove, replace=False),
                            f"{remove} random (seed {seed})")]
    return res
