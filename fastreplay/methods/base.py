"""The method interface: a name, the library it needs, how it scores, what it leaves out."""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..exceptions import ConfigError

PEERS_EXTRA = "pip install 'fastreplay[peers]'"


@dataclass
class PeerContext:
    """What a method may read of a finished run: the network with its final weights as a plain
    module in eval mode (BatchNorm on its running statistics), the data as the measurements see
    it (normalised, unaugmented), the stored checkpoints and learning rates, the per-example
    training loss and the measurement the scores differentiate."""
    recipe: object
    store: object
    kind: str
    _final: nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        from ..core.train import load_final
        final = load_final(self.recipe, self.store)
        self._final = self.module_at(final.theta, final.buffers)

    def module(self) -> nn.Module:
        """A fresh copy of the final network for one method: libraries wrap or hook the
        modules they are given (kronfluence's prepare_model does), which the next one must
        not see."""
        return copy.deepcopy(self._final)

    def module_at(self, theta: torch.Tensor, buffers: torch.Tensor) -> nn.Module:
        """A copy of the network holding (theta, buffers), in eval mode, its fastreplay layer
        subclasses turned back into the stock ones they equal (peer libraries match layers by
        exact type: kronfluence fails on subclasses)."""
        from ..core.models import Conv2d, Linear
        flat = self.recipe.model
        module = copy.deepcopy(flat.module)
        named = dict(module.named_parameters())
        named.update(dict(module.named_buffers()))
        with torch.no_grad():
            for slots, values in ((flat.param_slots, theta), (flat.buffer_slots, buffers)):
                for s in slots:
                    named[s.name].copy_(values[s.offset:s.offset + s.numel].view(s.shape))
        for layer in module.modules():
            if type(layer) is Linear and layer.compute_dtype is None:
                layer.__class__ = nn.Linear
            elif type(layer) is Conv2d and layer.compute_dtype is None:
                layer.__class__ = nn.Conv2d
        return module.eval()

    @property
    def device(self) -> torch.device:
        return self.recipe.device

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(self.recipe.num_train, device=self.device)
        return self.recipe.data.plain_train_batch(ids), self.recipe.data.train_y

    def test_data(self, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(targets, device=self.device)
        return self.recipe.data.test_batch(ids), self.recipe.data.test_y[ids]

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task's per-example training loss."""
        return self.recipe.loss_fn(outputs, y)

    def measurement(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-example measurement the scores differentiate (measure.kind)."""
        return self.recipe.measurement(self.kind)(outputs, y)

    def classification(self) -> bool:
        """Class labels (N,) under the built-in cross-entropy: what TRAK's classification
        output function and the libraries' classification tasks assume."""
        y = self.recipe.data.train_y
        return self.recipe.task.loss is None and y.dim() == 1 and not y.is_floating_point()

    def checkpoints(self) -> list[tuple[int, dict, float]]:
        """(step, the module's state_dict there, that step's learning rate) for every stored
        checkpoint in the attribution window, and the final state."""
        from ..core.train import load_final
        recipe, store = self.recipe, self.store
        lrs = recipe.optimizer.lrs[:, 0]
        out = []
        for slot, step in enumerate(store.checkpoint_steps()):
            if step < max(0, recipe.plan.start_step):
                continue
            state = recipe.stored_state(store.read_checkpoint(slot))
            out.append((int(step), self.module_at(state.theta, state.buffers).state_dict(),
                        float(lrs[min(int(step), len(lrs) - 1)])))
        final = load_final(recipe, store)
        out.append((recipe.num_steps, self.module_at(final.theta, final.buffers).state_dict(),
                    float(lrs[-1])))
        return out


Scorer = Callable[[PeerContext, list], np.ndarray]


@dataclass(frozen=True)
class Method:
    """One attribution method. ``score(context, targets)`` returns its scores already in
    fastreplay's convention; ``library`` is the package it needs (None: none beyond
    fastreplay); ``notes`` what a reader of the table must know (layers it ignores, the traps
    fixed, the defaults kept)."""
    name: str
    label: str
    score: Scorer
    library: Optional[str] = None
    notes: str = ""

    def available(self) -> Optional[str]:
        """None when it can run here, else the one line saying what to install."""
        if self.library is None:
            return None
        try:
            importlib.import_module(self.library)
        except ImportError:
            return f"{self.name}: needs the {self.library} package ({PEERS_EXTRA})"
        return None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    from . import native, peers  # noqa: F401  (they register themselves)
    return list(METHODS)


def resolve_methods(spec: str) -> list[Method]:
    """``--methods magic,trak,...`` -> the methods, in the order given; unknown names are a
    one-line ConfigError."""
    names = method_names()
    chosen = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ConfigError(f"--methods {spec!r}: unknown {', '.join(unknown) or 'empty list'}; "
                          f"choose from {', '.join(names)}")
    return [METHODS[m] for m in dict.fromkeys(chosen)]
