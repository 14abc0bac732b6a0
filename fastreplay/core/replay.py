"""REPLAY: the exact reverse pass of docs/design.md §3-§7, for K measurements at once.

States theta_t are rebuilt segment by segment (last segment first) from the stored checkpoints by
re-running the deterministic forward steps; each rebuilt segment must land bit for bit on the
next stored state (params, momentum and BatchNorm statistics), otherwise the run is not
reproducible and exact scores are impossible.

Per reverse step t (adjoints carried for all K measurements):
  1. optimizer adjoint (elementwise, fused when built): g_bar, m_bar, theta_bar += wd * g_bar
  2. at theta_t, for Q_k = <grad L_t, g_bar_k> + <b_{t+1}(theta), b_bar_k>: d/dtheta gives
     H g_bar + rho J^T b_bar, d/dw the score increments of the batch; computed by a
     double backward (replay.hvp = reverse) or forward-over-reverse (replay.hvp = forward,
     optionally vmapped over the K measurements and torch.compiled). Where torch cannot
     vmap or forward-differentiate the model, replay.hvp = auto falls back down the chain
     forward-vmap -> forward -> reverse (same values up to rounding).
  3. b_bar *= (1 - rho), elementwise: each statistic with its own layer's rho
     (FlatModel.buffer_decay; stock BatchNorm layers keep their own momenta)
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..exceptions import ReplayError
from ..progress import log, progress_bar
from ..store import Prefetcher
from .func_limits import first_line, forward_ad_unsupported, names_forward_ad, vmap_unsupported
from .measure import group_measurement_grads, measurement_grads
from .optimizers import StepValues
from .recipe import Recipe, TrainState
from .runtime import threads_of
from .train import run_steps


@dataclass
class ReplayResult:
    scores: np.ndarray  # (K, N) float64
    values: np.ndarray  # (K,) measurement values at theta_T
    seconds: float


# replay.hvp=auto's fallback chain: when torch cannot run a mode for this model (or it runs out
# of memory), the next one computes the same quantity. Double backward needs neither vmap nor
# forward-mode AD, so it ends the chain.
_FALLBACK = {"forward-vmap": "forward", "forward": "reverse"}
_JVP_MODES = ("forward-vmap", "forward")


def hvp_mode(recipe: Recipe, k: int) -> str:
    """replay.hvp resolved for a pass of k measurements. auto: on CUDA forward-over-reverse,
    vmapped over the k measurements when k > 1 (1.7x faster at k = 10 in fp32 on the H100);
    on the CPU double backward (faster there), or forward with replay.compile; then down the
    fallback chain past every mode this process found torch cannot run here."""
    hvp = recipe.cfg.replay.hvp
    if hvp != "auto":
        return hvp
    if not _on_cuda(recipe):
        mode = "forward" if recipe.cfg.replay.compile else "reverse"
    else:
        mode = "forward-vmap" if k > 1 else "forward"
    ruled_out = _ruled_out(recipe)
    while mode in ruled_out:
        mode = _FALLBACK[mode]
    return mode


def _on_cuda(recipe: Recipe) -> bool:
    return recipe.device.type == "cuda"


def step_vjp(recipe: Recipe, theta_t: torch.Tensor, buffers_t: torch.Tensor, step: int,
             g_bar: torch.Tensor, b_bar: torch.Tensor):
    """(H g_bar + rho J^T b_bar) (K, P) and d<grad L_t, g_bar>/dw for the batch (K, B).

    A mode that torch cannot run for this model hands the same step to the next mode of the
    fallback chain (replay.hvp=auto) or stops with a ReplayError naming the mode to use (an
    explicit replay.hvp); the modes are pure functions of their inputs, so the retry is exact.
    """
    x, y = recipe.batch_inputs(step)
    ids = recipe.batch_ids(step)
    theta = theta_t.detach()
    while True:
        mode = hvp_mode(recipe, g_bar.shape[0])
        try:
            hvp, wgrads = None, []
            # A step's gradient is the sum of its micro-batches' (train.micro_batch), each
            # divided by the whole batch's size: so are its second derivatives.
            for part in recipe.micro_batches(x.shape[0]):
                with recipe.randomness(step, ids[part]):
                    h, wg = _HVP_STEPS[mode](recipe, theta, buffers_t, x[part], y[part], g_bar,
                                             b_bar, x.shape[0])
                hvp = h if hvp is None else hvp + h
                wgrads.append(wg)
            return hvp, torch.cat(wgrads, dim=1)
        except (RuntimeError, NotImplementedError) as exc:  # OutOfMemoryError is a RuntimeError
            if not _rule_out(recipe, mode, exc, g_bar.shape[0]):
                raise
        torch.cuda.empty_cache()  # what the failed attempt held (a no-op without CUDA)


def _unit_weights(recipe: Recipe, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=recipe.dtype, device=recipe.device)


def _vmapped_tangents(recipe, theta, buffers, x, y, g_bar, b_bar, size):
    """forward-vmap: one primal pass, the K tangents vmapped through it."""
    return _tangent_fn(recipe, True)(theta, buffers, x, y, _unit_weights(recipe, x), g_bar, b_bar,
                                     size)


def _tangents_one_by_one(recipe, theta, buffers, x, y, g_bar, b_bar, size):
    """forward: one jvp per measurement."""
    fn = _tangent_fn(recipe, False)
    w = _unit_weights(recipe, x)
    outs = [fn(theta, buffers, x, y, w, g_bar[k], b_bar[k], size) for k in range(g_bar.shape[0])]
    return torch.stack([h for h, _ in outs]), torch.stack([d for _, d in outs])


def _double_backward(recipe, theta, buffers, x, y, g_bar, b_bar, size):
    """reverse: one graph of the gradient, differentiated once per measurement. ``size``: the
    whole batch's, which the weighted loss is divided by (x may be one micro-batch of it)."""
    theta = theta.detach().requires_grad_(True)
    w = _unit_weights(recipe, x).requires_grad_(True)
    losses, new_buffers = recipe.losses(theta, buffers, x, y)
    loss = (w * losses).sum() / size
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    hvps, wgrads = [], []
    k_total = g_bar.shape[0]
    for k in range(k_total):
        q = (grad * g_bar[k]).sum()
        if new_buffers.numel():
            q = q + (new_buffers * b_bar[k]).sum()
        h, wg = torch.autograd.grad(q, (theta, w), retain_graph=k + 1 < k_total,
                                    materialize_grads=True)
        hvps.append(h)
        wgrads.append(wg)
    return torch.stack(hvps), torch.stack(wgrads)


_HVP_STEPS = {"forward-vmap": _vmapped_tangents, "forward": _tangents_one_by_one,
              "reverse": _double_backward}


@dataclass(frozen=True)
class _Limitation:
    """Why torch cannot run an hvp mode here: not a bug, a reason to use another mode."""
    modes: tuple  # the modes it rules out
    what: str  # "<mode> <what>" reads as a sentence
    fix: str  # the setting that avoids it, for an explicit replay.hvp
    hint: str = ""  # for the replay.hvp=auto warning


def _limitation(mode: str, exc: BaseException, k: int) -> "_Limitation | None":
    """The limitation ``exc`` (raised by ``mode``) shows, or None when it is something else."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        if mode != "forward-vmap":
            return None
        return _Limitation(("forward-vmap",),
                           f"ran out of GPU memory with {k} measurements per pass",
                           "lower --set replay.target_batch or use --set replay.hvp=forward",
                           " (lower replay.target_batch to keep the faster vmapped pass)")
    if mode == "forward-vmap" and vmap_unsupported(exc) and not names_forward_ad(exc):
        why = f"is not supported for this model by torch.func.vmap ({first_line(exc)})"
        return _Limitation(("forward-vmap",), why, "use --set replay.hvp=forward")
    if mode in _JVP_MODES and forward_ad_unsupported(exc):
        why = f"is not supported for this model by forward-mode AD ({first_line(exc)})"
        return _Limitation(_JVP_MODES, why, "use --set replay.hvp=reverse")
    return None


def _rule_out(recipe: Recipe, mode: str, exc: BaseException, k: int) -> bool:
    """Act on ``exc`` from ``mode``: False when it is not a limitation of torch (the caller
    re-raises it); with an explicit replay.hvp a one-line ReplayError; under replay.hvp=auto
    remember the modes it rules out for this recipe (one warning, no second try) and go on."""
    limit = _limitation(mode, exc, k)
    if limit is None:
        return False
    if recipe.cfg.replay.hvp != "auto":
        raise ReplayError(f"replay.hvp={mode} {limit.what}; {limit.fix}") from None
    ruled_out = _ruled_out(recipe)
    for m in limit.modes:
        ruled_out[m] = limit.what
    log.warning("replay.hvp=auto: %s %s; replaying with replay.hvp=%s from here on, which gives "
                "the same scores up to rounding%s", mode, limit.what,
                hvp_mode(recipe, k), limit.hint)
    return True


_RECIPE_STATE: "weakref.WeakKeyDictionary[Recipe, dict]" = weakref.WeakKeyDictionary()


def _state(recipe: Recipe) -> dict:
    """What the replay learns about a recipe once per process: built (compiled) step
    functions, the hvp modes that torch cannot run for it."""
    return _RECIPE_STATE.setdefault(recipe, {})


def _ruled_out(recipe: Recipe) -> dict:
    """hvp mode -> why it cannot run for this recipe (found by trying; replay.hvp=auto)."""
    return _state(recipe).setdefault("ruled_out", {})


def _tangent_fn(recipe: Recipe, batched: bool):
    """The forward-over-reverse step as a pure function of tensors, built (and compiled, with
    replay.compile) once per recipe: (theta, buffers, x, y, w, g, b, size) -> (H g + rho J^T b,
    dlosses), size being the whole batch's (x may be one of its micro-batches).

    The running-statistics term rides along for free: with G(theta, c) = grad_theta [L_t(theta)
    + <b_{t+1}(theta), c>] taken at c = 0 in direction (g, b), the tangent is exactly
    H g + rho J^T b (the second-order term in c vanishes at c = 0). The tangents of the
    per-example losses are <grad loss_i, g>, i.e. B times the weight derivative. Unbatched:
    one target per jvp, so a target's scores do not depend on which targets share its pass
    (bitwise equal under sharding); batched (replay.hvp = forward-vmap): the K tangents share one
    primal pass, and their last bits depend on K (kernels block by batch size).
    """
    key = ("tangents", batched, recipe.cfg.replay.compile)
    fns = _state(recipe)
    if key in fns:
        return fns[key]

    def tangents(theta, buffers, x, y, w, g, b, size):
        def objective(th, c):
            losses, new_buffers = recipe.losses(th, buffers, x, y)
            return (w * losses).sum() / size + (new_buffers * c).sum(), losses

        c0 = torch.zeros_like(buffers)
        _, (h, dlosses) = torch.func.jvp(torch.func.grad(objective, has_aux=True), (theta, c0),
                                         (g, b))
        return h, dlosses / size

    fn = torch.func.vmap(tangents, in_dims=(None,) * 5 + (0, 0, None)) if batched else tangents
    if recipe.cfg.replay.compile:
        log.info("replay.compile: the first reverse step compiles the %s step (about a minute "
                 "on a GPU; once per process and pass size)", "vmapped" if batched else "jvp")
        fn = torch.compile(fn, dynamic=False)
    fns[key] = fn
    return fn


def reverse_states(recipe: Recipe, state: TrainState, end: int, arity: int, ones: torch.Tensor,
                   stop: int, expect_end: dict | None = None, keep_state: bool = False):
    """Yield (t, theta_t, buffers_t, opt_state_t) for t = end-1 down to ``stop``, rebuilt from
    ``state``; opt_state_t is None unless ``keep_state`` (Adam's adjoint reads it).

    arity 0 keeps every state of the segment (one forward pass, end - begin states in memory);
    arity k >= 2 is REPLAY's lazy k-ary tree: keep k states, recurse into the sub-segments
    last first (O(k log_k L) states, O(log_k L) forward passes). The arithmetic per step is the
    same either way, so scores are bitwise identical across schedules. ``expect_end``: the stored
    state at ``end`` (see _stored_parts); the rebuilt one must equal it bit for bit.
    """
    begin = state.step
    n = end - begin
    leaf = arity == 0 or n <= arity
    size = 1 if leaf else -(-n // arity)
    kept: list = []

    def keep(st: TrainState) -> None:
        if st.step >= stop or not leaf:
            if (st.step - begin) % size == 0:
                if not leaf:
                    kept.append(st.clone())
                else:
                    kept.append((st.step, st.theta.clone(), st.buffers,
                                 st.opt_state.clone() if keep_state else None))

    run_steps(recipe, state, ones, end, on_step=keep, description="rebuild")
    if expect_end is not None:
        _check_reproduced(state, expect_end, begin)
    if leaf:
        yield from reversed(kept)
        return
    while kept:
        sub = kept.pop()
        sub_end = min(sub.step + size, end)
        if sub_end > stop:
            yield from reverse_states(recipe, sub, sub_end, arity, ones, stop,
                                      keep_state=keep_state)


def _stored_parts(params: torch.Tensor, buffers: torch.Tensor,
                 momentum: torch.Tensor | None = None) -> dict:
    """A stored state as the parts a rebuild must reproduce. Checkpoints hold params, momentum
    and BatchNorm buffers; the final state holds no momentum (nothing reads it), so a segment
    that ends there is checked on params and buffers only."""
    parts = {"params": params, "momentum": momentum, "buffers": buffers}
    return {name: t for name, t in parts.items() if t is not None}


def _check_reproduced(rebuilt: TrainState, stored: dict, begin: int) -> None:
    """Every stored part of the state at ``rebuilt.step`` bit for bit, not only the params: a
    momentum that differs in its last bits may not reach theta within the segment, and the
    running statistics never feed back into a training step at all, yet either makes it
    another run than the one the scores would claim to differentiate."""
    have = {"params": rebuilt.theta, "momentum": rebuilt.opt_state, "buffers": rebuilt.buffers}
    differ = [name for name, t in stored.items() if not torch.equal(have[name], t)]
    if differ:
        which = (", ".join(differ[:-1]) + " and " if len(differ) > 1 else "") + differ[-1]
        raise ReplayError(
            f"recomputing steps {begin}..{rebuilt.step} did not reproduce the stored state bit "
            f"for bit ({which} differ): the run is not deterministic here (same "
            "device, torch and kernels as training are required)")


def _segments(checkpoint_steps: list[int], num_steps: int, start_step: int):
    """(begin, end, slot) for each checkpoint segment overlapping [start_step, num_steps), last first."""
    bounds = checkpoint_steps + [num_steps]
    segs = [(bounds[j], bounds[j + 1], j) for j in range(len(checkpoint_steps))]
    return [s for s in reversed(segs) if s[1] > start_step]


def replay(recipe: Recipe, store, targets: list[int], kind: str,
           group: bool = False) -> ReplayResult:
    """Exact scores d phi_k / d w_i for the targets, from the run held by ``store``; with
    ``group``, one row for phi = the mean measurement over the targets (measure.reduce=mean).
    Runs with the run's recorded CPU thread count, which the rebuilt steps need to land on the
    stored ones bit for bit (runtime.threads_of)."""
    with threads_of(store, recipe.device):
        return _replay(recipe, store, targets, kind, group)


def _replay(recipe: Recipe, store, targets: list[int], kind: str, group: bool) -> ReplayResult:
    stored_backend = store.get_attr("step_backend")
    step_backend = recipe.runtime.step_backend
    if stored_backend and stored_backend != step_backend:
        raise ReplayError(f"the run was trained with the {stored_backend} step kernels but this "
                          f"process has {step_backend}; replay where it was trained or retrain with --force")
    slots_steps = [int(s) for s in store.checkpoint_steps()]
    if any(s < 0 for s in slots_steps):
        raise ReplayError(f"run store {store.path} has uncommitted checkpoints; finish training first")
    final_params, final_buffers = map(recipe.tensor, store.read_final())
    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    grads = group_measurement_grads if group else measurement_grads
    values, theta_bar, b_bar = grads(recipe, final_params, final_buffers, targets, kind)
    opt = recipe.optimizer
    # the optimizer state's adjoint (SGD: momentum's; Adam: both moments')
    state_bar = theta_bar.new_zeros(theta_bar.shape[0], opt.state_size(theta_bar.shape[1]))
    g_bar = torch.empty_like(theta_bar)
    pending_hvp = None
    # b_{t+1} = (1 - rho_l) b_t + rho_l s_t(theta_t) per layer l: b_bar_t = (1 - rho_l) b_bar_{t+1}
    # elementwise (the rho_l J^T b_bar term is in step_vjp, through b_{t+1}'s own graph).
    decay = recipe.model.buffer_decay
    scores = torch.zeros(theta_bar.shape[0], recipe.num_train, dtype=torch.float64,
                         device=recipe.device)
    start = recipe.plan.start_step
    batches = recipe.plan.indices
    keep_state = opt.needs_step_values  # Adam's adjoint reads each step's moments
    ones = recipe.ones()
    segments = _segments(slots_steps, recipe.num_steps, start)
    total = sum(end - max(begin, start) for begin, end, _ in segments)
    next_state = _stored_parts(final_params, final_buffers)
    arity = recipe.cfg.replay.tree_arity if recipe.cfg.replay.schedule == "tree" else 0
    every = recipe.cfg.replay.schedule == "every"
    # Checkpoints are read (and verified) ahead on a background thread while the current
    # segment is rebuilt and replayed: disk time hides behind GPU time.
    what = f"the mean of {len(targets)} target(s)" if group else f"{len(targets)} target(s)"
    with progress_bar(f"replay {what}", total) as advance:
        checkpoints = Prefetcher(store, [slot for _, _, slot in segments], depth=1)
        for (begin, end, _), (_, checkpoint) in zip(segments, checkpoints):
            state = recipe.stored_state(checkpoint)
            # copies: the rebuild advances state in place
            stored = _stored_parts(state.theta.clone(), state.buffers.clone(),
                                  state.opt_state.clone())
            if every:  # the stored state is theta_t itself: nothing to rebuild
                states = [(state.step, state.theta, state.buffers, state.opt_state)]
            else:
                states = reverse_states(recipe, state, end, arity, ones, stop=max(begin, start),
                                        expect_end=next_state, keep_state=keep_state)
            for t, theta_t, buffers_t, opt_state_t in states:
                forward = None
                if keep_state:
                    forward = StepValues(recipe.gradient(theta_t, buffers_t, t), theta_t,
                                         opt_state_t)
                opt.adjoint_(theta_bar, state_bar, g_bar, pending_hvp, t, forward)
                pending_hvp, wgrad = step_vjp(recipe, theta_t, buffers_t, t, g_bar, b_bar)
                b_bar.mul_(decay)
                scores[:, batches[t]] += wgrad.to(torch.float64)
                advance()
            next_state = stored
    del ones
    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    log.debug("replayed %d targets in %.2fs", len(targets), seconds)
    scores = scores.cpu().numpy()
    _check_finite_scores(scores, [f"the mean of {len(targets)} target(s)"] if group
                         else [f"test {t}" for t in targets])
    return ReplayResult(scores, values.cpu().numpy(), seconds)


def _check_finite_scores(scores: np.ndarray, names: list[str]) -> None:
    """A ReplayError at the first score row (``names[k]`` for row k) holding NaN or inf, before
    any caller stores it: a finite measurement whose reverse pass met a non-finite derivative
    along the way (a second derivative that blows up, e.g. sqrt or a log near 0)."""
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    k, i = (int(a[0]) for a in np.nonzero(bad))
    raise ReplayError(f"the scores of {names[k]} are not finite ({scores[k, i]} for training "
                      f"example {i}): the reverse pass met a non-finite derivative of the "
                      "training loss; use a model and loss with finite second derivatives (no "
                      "sqrt, log or division near 0) or a smaller train.lr (no scores were "
                      "stored)")
