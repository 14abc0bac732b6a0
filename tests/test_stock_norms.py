"""User modules built from stock torch layers (Recipe(model_factory=...)), held to the same
exactness standard as the built-in models: float64 finite differences of real retrainings
(tests/test_exactness.py's helpers and tolerance), in every HVP mode and adjoint backend.

- stock nn.BatchNorm2d/1d are swapped for fastreplay's functional twin, carrying each layer's
  momentum, eps and affine setting and its initial tensors; different momenta per layer are
  exact because the replay decays each statistic's adjoint by its own layer's 1 - rho
  (FlatModel.buffer_decay), which test_a_single_rho_would_miss_the_finite_differences shows
  matters;
- nn.LayerNorm and nn.GroupNorm hold no state and just work;
- what cannot be replayed exactly (dropout, tracked InstanceNorm statistics, BatchNorm without
  running statistics or with a cumulative momentum, buffers changed in place) is refused with
  a one-line error naming the module;
- the built-in models are untouched: the same slots, initial state and step as the code before
  model factories existed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import SMALL
from test_exactness import (
    TARGETS,
    TOL,
    assert_matches_finite_differences,
    central_differences,
    one_thread,
)
from torch.func import functional_call

from fastreplay.config import load_config
from fastreplay.core import kernels
from fastreplay.core.models import BatchNorm, FlatModel, build_module, prepare_module
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import replay
from fastreplay.core.train import train_into_store
from fastreplay.exceptions import ConfigError, ReplayError
from fastreplay.interface.api import counterfactual
from fastreplay.store import RunStore, versions

# SMALL (float64, 48 synthetic 8x8 images, 12 steps, momentum, decay, one-cycle, augmentation)
# with plain momentum and a margin measurement.
OVERRIDES = SMALL + ["train.nesterov=false", "measure.kind=margin"]
C = 10  # data.num_classes
D = 3 * 8 * 8


def bn_cnn() -> nn.Module:
    """Stock BatchNorm2d, affine with momentum 0.2, then one without affine parameters, with its
    own eps and momentum 0.6."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=0.2), nn.GELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3, momentum=0.6, affine=False),
        nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C))


def bn_mlp() -> nn.Module:
    """Two stock BatchNorm1d of different momenta on (N, C) inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.BatchNorm1d(16, momentum=0.1),
                         nn.GELU(), nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=0.5),
                         nn.GELU(), nn.Linear(16, C))


def ln_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.LayerNorm(16), nn.GELU(),
                         nn.Linear(16, C))


def gn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, C))


def frozen_first_layer() -> nn.Module:
    """A frozen (requires_grad=False) random first layer: a constant of the run, not trained."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.GELU(), nn.Linear(16, 16),
                        nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, C))
    net[1].requires_grad_(False)
    return net


FACTORIES = {"batchnorm2d-cnn": bn_cnn, "batchnorm1d-two-momenta": bn_mlp,
             "layernorm-mlp": ln_mlp, "groupnorm-cnn": gn_cnn,
             "frozen-first-layer": frozen_first_layer}


def train_store(recipe: Recipe, path) -> RunStore:
    """The run trained into a store as open_or_train does, reusing the recipe whose
    retrainings gave the finite differences (no second data load, no run-directory lock)."""
    cfg = recipe.cfg
    store = RunStore.create(str(path), cfg.to_dict(), cfg.fingerprint(), versions(),
                            attrs={"step_backend": recipe.runtime.step_backend})
    train_into_store(recipe, store)
    return store


@dataclass
class ScoredRun:
    factory: object
    examples: np.ndarray
    fd: np.ndarray
    store: RunStore


@pytest.fixture(scope="module", params=list(FACTORIES))
def scored_run(request, tmp_path_factory):
    """Finite differences once per model (10 retrainings), and the run in a store."""
    factory = FACTORIES[request.param]
    cfg = load_config("test", overrides=OVERRIDES)
    recipe = Recipe(cfg, model_factory=factory)
    with one_thread():
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train)
        store = train_store(recipe, tmp_path_factory.mktemp(request.param) / "run.zarr")
    yield ScoredRun(factory, examples, fd, store)
    store.close()


def replay_scores(run: ScoredRun, backend: str = "reference", hvp: str = "reverse"):
    cfg = load_config("test", overrides=OVERRIDES + [f"replay.backend={backend}",
                                                     f"replay.hvp={hvp}"])
    with one_thread():
        return replay(Recipe(cfg, model_factory=run.factory), run.store, TARGETS,
                      cfg.measure.kind).scores


@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_scores_match_finite_differences(scored_run, backend, hvp):
    if backend == "fused" and not kernels.extension_loaded():
        pytest.skip(f"compiled extension not loaded: {kernels.extension_error()}")
    assert_matches_finite_differences(replay_scores(scored_run, backend, hvp),
                                      scored_run.examples, scored_run.fd)


def test_a_single_rho_would_miss_the_finite_differences(scored_run, monkeypatch):
    """The guard on per-layer momenta: decaying every statistic's adjoint by one 1 - rho (the
    first layer's, what the replay did before per-layer momenta) moves the scores of the
    two-momenta MLP far outside the tolerance."""
    if scored_run.factory is not bn_mlp:
        pytest.skip("the two-momenta model only")
    init = FlatModel.__init__

    def one_rho(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.buffer_decay = torch.full_like(self.buffer_decay, 1 - self.bn_layers[0].momentum)

    monkeypatch.setattr(FlatModel, "__init__", one_rho)
    scores = replay_scores(scored_run)
    got = scores[:, scored_run.examples]
    rel = np.linalg.norm(got - scored_run.fd) / np.linalg.norm(scored_run.fd)
    assert rel > 100 * TOL


# --- The swap -------------------------------------------------------------------------------

def flat(factory, dtype=torch.float64) -> FlatModel:
    return FlatModel(load_config("test", overrides=OVERRIDES), torch.device("cpu"), dtype,
                     factory)


def test_the_twins_carry_each_layers_settings_and_momentum():
    model = flat(bn_cnn)
    first, second = model.module[1], model.module[5]
    assert type(first) is BatchNorm and type(second) is BatchNorm
    assert (first.momentum, first.eps, first.weight is not None) == (0.2, 1e-5, True)
    assert (second.momentum, second.eps, second.weight, second.bias) == (0.6, 1e-3, None, None)
    assert [s.name for s in model.buffer_slots] == ["1.running_mean", "1.running_var",
                                                    "5.running_mean", "5.running_var"]
    expected = torch.tensor([0.8] * 8 + [0.4] * 8, dtype=torch.float64)
    assert torch.equal(model.buffer_decay, expected)
    assert "num_batches_tracked" not in dict(model.module.named_buffers())
    assert model.num_buffers == 16 and model.constants == []


def test_initial_weights_and_statistics_survive_the_swap():
    """Parameter names, order and values are the stock module's, drawn from the seed; the
    stock layer's (non-default) initial weights and running statistics are kept."""
    def factory():
        net = bn_mlp()
        with torch.no_grad():
            net[2].weight.uniform_(0.5, 1.5)
            net[2].bias.normal_()
            net[2].running_mean.normal_()
            net[2].running_var.uniform_(0.5, 2.0)
        return net

    torch.manual_seed(3)  # cfg.seed: the factory runs under it
    stock = factory().double()
    model = flat(factory)
    named = dict(stock.named_parameters())
    assert [s.name for s in model.param_slots] == (
        [n for n, p in named.items() if p.dim() >= 2] + [n for n, p in named.items() if p.dim() < 2])
    assert torch.equal(model.theta0, torch.cat([named[s.name].reshape(-1)
                                                for s in model.param_slots]))
    stats = [stock[2].running_mean, stock[2].running_var, stock[5].running_mean,
             stock[5].running_var]
    assert torch.equal(model.buffers0, torch.cat(stats))


@pytest.mark.parametrize("factory, shape", [
    (lambda: nn.BatchNorm1d(3, momentum=0.3), (6, 3)),
    (lambda: nn.BatchNorm1d(3, momentum=0.3), (6, 3, 5)),
    (lambda: nn.BatchNorm2d(3, momentum=0.3, eps=1e-3), (6, 3, 4, 5)),
    (lambda: nn.BatchNorm3d(3, momentum=0.3, affine=False), (6, 3, 2, 3, 4)),
    (lambda: nn.SyncBatchNorm(3, momentum=0.3), (6, 3, 4, 4)),
    (lambda: type("MyNorm", (nn.modules.batchnorm._BatchNorm,),
                  {"_check_input_dim": lambda self, x: None})(3, momentum=0.3), (6, 3, 4)),
])
def test_the_twin_computes_what_the_stock_layer_does(factory, shape):
    """Same outputs in both modes and the same updated statistics as the stock layer (the root
    module itself swapped, as prepare_module does when a model is a single layer)."""
    torch.manual_seed(0)
    stock = factory().double()
    with torch.no_grad():
        stock.running_mean.normal_()
        stock.running_var.uniform_(0.5, 2.0)
        if stock.affine:
            stock.weight.normal_()
            stock.bias.normal_()
    twin = prepare_module(copy.deepcopy(stock))
    assert type(twin) is BatchNorm
    x = torch.randn(shape, dtype=torch.float64)
    if isinstance(stock, nn.SyncBatchNorm):  # a single-process SyncBatchNorm is BatchNorm
        reference = nn.BatchNorm2d(3, momentum=0.3).double()
        reference.load_state_dict(stock.state_dict())
        stock = reference
    out = twin.train()(x)
    new = dict(zip(("running_mean", "running_var"), twin.updated))
    stock.train()
    assert torch.allclose(out, stock(x), rtol=0, atol=1e-12)
    for name, value in new.items():
        assert torch.allclose(value, getattr(stock, name), rtol=0, atol=1e-14)
    out = functional_call(twin.eval(), new, (x,))
    stock.eval()
    assert torch.allclose(out, stock(x), rtol=0, atol=1e-12)


def test_the_twin_checks_input_ranks_as_the_stock_layer_does():
    model = flat(lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="expected 4D input"):
        model.forward(model.theta0, model.buffers0, torch.randn(4, 3, dtype=torch.float64), True)


# --- Built-in models unchanged --------------------------------------------------------------

def legacy_flat(cfg, dtype):
    """FlatModel as it was built before model factories: every named buffer in the flat
    vector, in named_buffers() order, and the parameters grouped by dimension."""
    torch.manual_seed(cfg.seed)
    module = build_module(cfg).to(dtype)
    named = dict(module.named_parameters())
    order = ([n for n, p in named.items() if p.dim() >= 2]
             + [n for n, p in named.items() if p.dim() < 2])
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in order])
    buffers = dict(module.named_buffers())
    buffers0 = (torch.cat([b.reshape(-1) for b in buffers.values()]) if buffers
                else torch.zeros(0, dtype=dtype))
    return module, order, list(buffers), theta0, buffers0


@pytest.mark.parametrize("name", ["tiny-cnn", "mlp", "resnet9"])
def test_built_in_models_are_unchanged(name):
    """The swap is a no-op on them: same slots, the same initial state bit for bit, and a
    training forward (logits, updated statistics, gradient) bitwise that of the old layout."""
    cfg = load_config("test", overrides=OVERRIDES + [f"model.name={name}", "model.width=0.125",
                                                     "model.bn_momentum=0.3"])
    model = FlatModel(cfg, torch.device("cpu"), torch.float64)
    module, order, buffer_names, theta0, buffers0 = legacy_flat(cfg, torch.float64)
    assert [s.name for s in model.param_slots] == order
    assert [s.name for s in model.buffer_slots] == buffer_names
    assert torch.equal(model.theta0, theta0) and torch.equal(model.buffers0, buffers0)
    assert torch.equal(model.buffer_decay, torch.full_like(buffers0, 1 - 0.3))
    assert model.constants == []
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta = theta0.clone().requires_grad_(True)
    logits, new = model.forward(theta, buffers0, x, train=True)
    (grad,) = torch.autograd.grad(logits.square().sum(), theta)
    # the old forward: functional_call with every parameter and buffer
    theta_old = theta0.clone().requires_grad_(True)
    module.train(True)
    tensors = FlatModel._views(theta_old, model.param_slots)
    tensors.update(FlatModel._views(buffers0, model.buffer_slots))
    logits_old = functional_call(module, tensors, (x,))
    bns = [m for m in module.modules() if isinstance(m, BatchNorm)]
    new_old = (torch.cat([u.reshape(-1) for m in bns for u in m.updated]) if bns
               else buffers0.new_zeros(0))
    (grad_old,) = torch.autograd.grad(logits_old.square().sum(), theta_old)
    assert torch.equal(logits, logits_old) and torch.equal(new, new_old)
    assert torch.equal(grad, grad_old)


def test_recipe_without_a_factory_is_the_built_in_model():
    cfg = load_config("test", overrides=OVERRIDES + ["model.name=tiny-cnn"])
    a, b = Recipe(cfg), Recipe(cfg, model_factory=lambda: build_module(cfg))
    assert torch.equal(a.model.theta0, b.model.theta0)
    assert torch.equal(a.model.buffers0, b.model.buffers0)


# --- What cannot be replayed exactly --------------------------------------------------------

class CountingBuffer(nn.Module):
    """Updates a floating buffer in place in every forward pass: state fastreplay cannot know."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(1)
        return x


class Scaled(nn.Module):
    """A constant buffer (a fixed input scale) that forward only reads: allowed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((3, 1, 1), 0.5))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return x * self.scale


def mlp_with(*layers) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 8), *layers, nn.Linear(8, C))


@pytest.mark.parametrize("factory, message", [
    (lambda: mlp_with(nn.AlphaDropout(0.2)),
     r"model module '2' \(AlphaDropout\) draws random numbers in train mode, which the replay "
     r"cannot reproduce; set p=0, or use nn.Dropout \(fastreplay makes its masks reproducible\)"),
    (lambda: nn.Sequential(nn.Sequential(nn.Dropout2d(0.5)), mlp_with()),
     r"'0.0' \(Dropout2d\) .*set p=0"),
    (lambda: nn.Sequential(nn.MultiheadAttention(4, 1, dropout=0.1), mlp_with()),
     r"'0' \(MultiheadAttention\) draws random numbers in train mode, .*; set dropout=0"),
    (lambda: mlp_with(nn.RReLU()), r"'2' \(RReLU\) draws random .*; use nn.LeakyReLU"),
    (lambda: nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True), mlp_with()),
     r"model module '0' \(InstanceNorm2d\) tracks running statistics, which fastreplay replays "
     r"only for BatchNorm; set track_running_stats=False"),
    (lambda: mlp_with(nn.BatchNorm1d(8, track_running_stats=False)),
     r"'2' \(BatchNorm1d\) has track_running_stats=False, so its eval-mode output depends on "
     r"the other examples"),
    (lambda: mlp_with(nn.BatchNorm1d(8, momentum=None)),
     r"'2' \(BatchNorm1d\) has momentum=None \(a cumulative average"),
    (lambda: mlp_with(type("MyNorm", (nn.BatchNorm1d,), {"forward": lambda self, x: x})(8)),
     r"'2' \(MyNorm\) overrides BatchNorm's forward"),
    (lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(C)), r"'1' \(LazyLinear\) has "
     r"uninitialised \(lazy\) parameters"),
    (lambda: "resnet", r"the model factory returned a str, not a torch.nn.Module"),
    (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(D, affine=False)),
     r"the model has no parameters to train"),
])
def test_unreplayable_modules_are_refused_by_name(factory, message):
    cfg = load_config("test", overrides=OVERRIDES)
    with pytest.raises(ConfigError, match=message) as err:
        Recipe(cfg, model_factory=factory)
    assert "\n" not in str(err.value)


def test_zero_dropout_and_untracked_instance_norm_are_allowed():
    model = flat(lambda: nn.Sequential(nn.InstanceNorm2d(3, affine=True), mlp_with(nn.Dropout(0.0))))
    assert model.num_buffers == 0
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    logits, new = model.forward(model.theta0, model.buffers0, x, train=True)
    assert logits.shape == (4, C) and new.numel() == 0


def test_other_buffers_are_constants():
    """Not in the flat buffers (nor in checkpoints); read as they are, in the run's dtype."""
    model = flat(lambda: nn.Sequential(Scaled(), mlp_with()))
    assert model.num_buffers == 0 and len(model.constants) == 2
    x = torch.ones(4, 3, 8, 8, dtype=torch.float64)
    logits, _ = model.forward(model.theta0, model.buffers0, x, train=True)
    params = {s.name[2:]: v for s, v in zip(model.param_slots,
                                             FlatModel._views(model.theta0, model.param_slots).values())}
    expected = functional_call(model.module[1], params, (x * 0.5,))
    assert model.module[0].scale.dtype == torch.float64 and torch.equal(logits, expected)


@pytest.mark.parametrize("factory, message", [
    (lambda: nn.Sequential(CountingBuffer(), mlp_with()),
     r"model module '0' \(CountingBuffer\) changed its buffer 'seen' in a forward pass"),
    (lambda: _twice(),
     r"BatchNorm layer '2' ran twice in one forward pass"),
    (lambda: _Unused(), r"BatchNorm layer 'unused' did not update its running statistics"),
])
def test_unreplayable_forward_passes_are_refused_by_name(factory, message, monkeypatch):
    """What only a forward pass shows: raised before any training, by the Recipe's trial of
    the model (core/admission.py), and by training's first step where a Recipe skipped it."""
    cfg = load_config("test", overrides=OVERRIDES)
    with pytest.raises(ReplayError, match=message) as err:
        Recipe(cfg, model_factory=factory)
    assert "\n" not in str(err.value)
    monkeypatch.setattr("fastreplay.core.admission.admit", lambda recipe: None)
    recipe = Recipe(cfg, model_factory=factory)
    with pytest.raises(ReplayError, match=message):
        recipe.step(recipe.init_state(), recipe.ones())


def _twice() -> nn.Module:
    """One BatchNorm layer called twice per forward pass (torch would chain two updates)."""
    bn = nn.BatchNorm1d(8)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 8), bn, bn, nn.Linear(8, C))


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp_with()
        self.unused = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.body(x)


def test_the_workflows_take_a_user_module_and_its_store_refuses_the_built_in(tmp_path):
    """run_magic, open_trained and run_lds with a model factory: the user's module is trained,
    scored and retrained (LDS); reopening its store without the factory (the built-in tiny CNN
    of the same config) is refused by the model fingerprint, not silently scored."""
    from fastreplay.exceptions import StoreError
    from fastreplay.interface.api import open_trained, run_magic
    from fastreplay.workflows.lds import run_lds

    cfg = load_config("test", overrides=OVERRIDES)
    res = run_magic(cfg, [0, 1], tmp_path, plots=False, model_factory=bn_cnn)
    assert res.scores.shape == (2, 48) and np.isfinite(res.scores).all()
    recipe, store = open_trained(tmp_path, model_factory=bn_cnn)
    try:
        assert sum(p.numel() for p in bn_cnn().parameters()) == recipe.model.theta0.numel()
        lds, predicted, measured = run_lds(recipe, store, models=4, keep=0.9, targets=None)
        assert predicted.shape == measured.shape == (4, 2) and np.isfinite(measured).all()
    finally:
        store.close()
    with pytest.raises(StoreError, match="different model"):
        open_trained(tmp_path)


def test_frozen_parameters_stay_out_of_theta_and_are_not_trained():
    recipe = Recipe(load_config("test", overrides=OVERRIDES), model_factory=frozen_first_layer)
    model = recipe.model
    assert set(model.frozen) == {"1.weight", "1.bias"}
    assert all(not s.name.startswith("1.") for s in model.param_slots)
    before = {n: p.clone() for n, p in model.frozen.items()}
    state = recipe.init_state()
    for _ in range(3):
        recipe.step(state, recipe.ones())
    assert not torch.equal(state.theta, model.theta0)
    assert all(torch.equal(model.module[1].get_parameter(n[2:]), before[n]) for n in before)


def test_bf16_reaches_the_stock_conv_and_linear_layers_of_a_user_model():
    """train.bf16 computes a user module's stock Conv2d and Linear layers in bfloat16, as it
    does the built-in models' (they become the package's behaviour-identical subclasses)."""
    overrides = OVERRIDES + ["train.dtype=float32"]
    plain = Recipe(load_config("test", overrides=overrides), model_factory=bn_cnn).model
    bf16 = Recipe(load_config("test", overrides=overrides + ["train.bf16=true"]),
                  model_factory=bn_cnn).model
    layers = [m for m in bf16.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3 and all(m.compute_dtype == torch.bfloat16 for m in layers)
    x = torch.randn(4, 3, 8, 8)
    a, _ = plain.forward(plain.theta0, plain.buffers0, x, train=False)
    b, _ = bf16.forward(bf16.theta0, bf16.buffers0, x, train=False)
    assert a.dtype == b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05  # bf16 rounding, nothing else
