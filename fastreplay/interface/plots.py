"""Figures people would rather look at than read: a target's most helpful and harmful examples."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _show(ax, image: np.ndarray, title: str, color: str = "black") -> None:
    """An image (H, W, 3) or (H, W) (grey)."""
    ax.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def _label(label, class_names) -> str:
    """A class label by name where there are names; other targets as short text."""
    label = np.asarray(label)
    if label.ndim == 0 and np.issubdtype(label.dtype, np.integer):
        return class_names[int(label)] if class_names else f"class {int(label)}"
    return np.array2string(label, precision=3, threshold=4)


def _png(fig) -> bytes:
    """The figure as PNG bytes: the caller writes them into the run directory (store/rundir.py
    decides whether it may, and never through a link)."""
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out.getvalue()


def helpful_order(scores: np.ndarray, kind: str) -> np.ndarray:
    """Indices from most helpful to most harmful. Upweighting a helpful example lowers the
    target's loss (negative score) or raises its margin (positive score)."""
    return np.argsort(scores if kind == "loss" else -scores, kind="stable")


def influence_figure(target: int, target_image: np.ndarray, target_label,
                     scores: np.ndarray, train_image, train_labels: np.ndarray,
                     class_names, kind: str, value: float, k: int = 8) -> bytes:
    """PNG: the target, then its k most helpful (top row) and k most harmful (bottom row).
    ``train_image(i)`` draws training example i (an image array); a training example whose
    label is the target's is titled green, others red."""
    order = helpful_order(scores, kind)
    rows = {"helpful": order[:k], "harmful": order[::-1][:k]}
    fig, axes = plt.subplots(2, k + 1, figsize=(1.3 * (k + 1), 3.2))
    _show(axes[0, 0], target_image,
          f"test {target}\n{_label(target_label, class_names)}\n{kind}={value:.3g}")
    axes[1, 0].axis("off")
    for r, (name, idx) in enumerate(rows.items()):
        for c, i in enumerate(idx, start=1):
            same = np.array_equal(train_labels[i], target_label)
            _show(axes[r, c], train_image(i),
                  f"#{i} {_label(train_labels[i], class_names)}\n{scores[i]:+.2e}",
                  "green" if same else "red")
        axes[r, 1].set_ylabel(name, fontsize=8)
        axes[r, 1].yaxis.set_visible(True)
    fig.suptitle(f"Most helpful (top) and harmful (bottom) training examples, d{kind}/dw",
                 fontsize=8)
    return _png(fig)


def debug_figure(group: str, harms: np.ndarray, train_image, train_labels: np.ndarray,
                 class_names, flipped=None, k: int = 8) -> bytes:
    """PNG: the k training examples that most harm the group's mean measurement (top row) and
    the k that most help it (bottom row), each with its label and harm; with planted label
    noise, a flipped example is titled red."""
    order = np.argsort(-harms, kind="stable")
    rows = {"harmful": order[:k], "helpful": order[::-1][:k]}
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.2), squeeze=False)
    flipped = set() if flipped is None else set(int(i) for i in flipped)
    for r, (name, idx) in enumerate(rows.items()):
        for c, i in enumerate(idx):
            _show(axes[r, c], train_image(i),
                  f"#{i} {_label(train_labels[i], class_names)}\n{harms[i]:+.2e}",
                  "red" if int(i) in flipped else "black")
        axes[r, 0].set_ylabel(name, fontsize=8)
        axes[r, 0].yaxis.set_visible(True)
    fig.suptitle(f"Most harmful (top) and helpful (bottom) training examples for group {group}"
                 + (" (red: flipped label)" if flipped else ""), fontsize=8)
    return _png(fig)


def lds_figure(result, predicted: np.ndarray, measured: np.ndarray, show: int = 4) -> bytes:
    """Predicted vs measured for the best few measurements, and the histogram of per-target LDS."""
    lds = np.asarray(result.per_target["lds"], dtype=np.float64)
    cols = list(np.argsort(-np.nan_to_num(lds, nan=-2))[:show])
    fig, axes = plt.subplots(1, len(cols) + 1, figsize=(3 * (len(cols) + 1), 3))
    for ax, c in zip(axes, cols):
        ax.scatter(predicted[:, c], measured[:, c], s=8)
        ax.set_title(f"test {result.per_target['index'][c]}: LDS {lds[c]:.2f}", fontsize=8)
        ax.set_xlabel("predicted (sum of scores)", fontsize=7)
        ax.set_ylabel("measured", fontsize=7)
    axes[-1].hist(lds[np.isfinite(lds)], bins=20, range=(-1, 1))
    axes[-1].set_title(f"LDS mean {result.lds_mean:.3f}, 95% CI [{result.lds_ci[0]:.3f}, "
                       f"{result.lds_ci[1]:.3f}]", fontsize=8)
    axes[-1].set_xlabel("per-target LDS", fontsize=7)
    fig.suptitle(f"{result.removal} removal, keep {result.keep:g}, {result.models} models, "
                 f"{len(lds)} targets; CI: {result.ci_method}", fontsize=8)
    return _png(fig)


def compare_figure(result) -> bytes:
    """Each method's LDS with its interval (bars), and its wall time per target: one look says
    which method predicts retraining and what it costs."""
    rows = [r for r in result.rows if not r.skipped]
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.6),
                                   gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    y = np.arange(len(rows))[::-1]
    lds = np.array([r.lds for r in rows])
    err = np.array([[r.lds - r.lds_ci[0], r.lds_ci[1] - r.lds] for r in rows]).T.clip(0)
    ax.barh(y, lds, xerr=err, color=["tab:green" if r.method == "magic" else "tab:gray"
                                     for r in rows], capsize=3)
    ax.set_yticks(y, [r.label for r in rows], fontsize=7)
    ax.set_xlim(min(0.0, float(lds.min()) - 0.05), 1.0)
    ax.set_xlabel("LDS (Spearman, mean over targets)", fontsize=8)
    ax.axvline(0, color="black", lw=0.5)
    times = [r.seconds_per_target or 0.0 for r in rows]
    cost.barh(y, times, color="tab:blue")
    cost.set_xlabel("seconds per target", fontsize=8)
    fig.suptitle(f"{result.group}: {len(result.targets)} targets, {result.models} models; CI: "
                 f"{result.ci_method}", fontsize=8)
    return _png(fig)


def window_figure(report) -> bytes:
    """Metasmoothness S against the window's length, the --min-s line and the recommendation."""
    rows = report.rows
    x = [r.epochs for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, [r.metasmoothness for r in rows], "o-", color="tab:blue", label="S")
    ax.axhline(report.min_s, color="gray", ls="--", lw=1, label=f"--min-s {report.min_s:g}")
    if report.recommended_epochs is not None:
        best = next(r for r in rows if r.epochs == report.recommended_epochs)
        ax.plot([best.epochs], [best.metasmoothness], "*", ms=14, color="tab:green",
                label=f"recommended: last {best.epochs:g} epochs")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{e:g}" for e in x])
    ax.set_xlabel("attribution window (last epochs of the run)")
    ax.set_ylabel("metasmoothness S")
    ax.set_ylim(min(-0.05, min(r.metasmoothness for r in rows) - 0.05), 1.05)
    ax.set_title(f"How far back the scores hold (keep {report.keep:g})", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _png(fig)
