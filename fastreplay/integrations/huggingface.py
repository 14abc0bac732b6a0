"""Hugging Face ``transformers`` causal language models, full fine-tunes and ``peft`` LoRA
adapters alike, as fastreplay tasks (``pip install 'fastreplay[hf]'``).

A causal LM becomes a Task like any other (fastreplay.task): its model factory builds the
network (from a ``save_pretrained`` directory, a hub id where the network reaches the hub, or a
config), wrapped in :class:`CausalLM` so that the flat-parameter model calls it with one tensor of
token ids and gets the logits back; examples are token-id sequences ``x`` with next-token labels
``y`` (-100 where no loss is taken: padding, a prompt); the loss of an example and the measurement
of a test sequence are its mean token loss over the labelled positions (:func:`token_loss`).

What exact replay needs of such a model, and how it is met here:

* second derivatives of attention: only the "eager" implementation (plain matrix products and a
  softmax) has them; sdpa's fused kernels (CPU and CUDA), flash and flex attention do not. Models
  are loaded with ``attn_implementation="eager"``, and any other is refused in one line;
* LoRA: the base weights are frozen (requires_grad False), so they are constants of the run,
  outside theta, and part of the model's fingerprint; theta, the checkpoints and the scores'
  parameter space are the adapter's weights only. Full fine-tuning is the same without peft;
* dropout: every ``nn.Dropout`` (GPT-2's embedding, residual and MLP dropout, peft's
  lora_dropout) becomes fastreplay's deterministic dropout (core/dropout.py: masks from seed,
  step, example id, layer, position). Dropout inside the attention function (GPT-2's
  attn_pdrop, Llama's attention_dropout) draws from torch's generator and is refused;
* the loss is computed here from the logits, per example and in the run's precision: the
  model's own ``labels=`` loss is a float32 token mean over the whole batch.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..exceptions import ConfigError
from ..task import ArrayData, Task

EXTRA = "pip install 'fastreplay[hf]'"
IGNORE = -100
"""The label of a position that takes no loss (padding, a prompt): transformers' convention."""
EAGER = "eager"
_ATTENTION_DROPOUT = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def require(module: str):
    """Import ``module`` (transformers, peft, tokenizers) or raise the one-line error naming
    the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"Hugging Face models need the {module} package, which is not "
                          f"installed; install the extra: {EXTRA}") from None


def check_attention(config, where: str = "the model") -> None:
    """Refuse an attention implementation without second derivatives, and dropout inside the
    attention function (drawn from torch's generator, which the replay cannot reproduce)."""
    impl = getattr(config, "_attn_implementation", None) or EAGER
    if impl != EAGER:
        raise ConfigError(f"{where} uses attn_implementation={impl!r}, which has no second "
                          "derivatives (fused attention kernels), so the replay cannot run; "
                          "load it with attn_implementation='eager' (fastreplay's loaders do)")
    for name in _ATTENTION_DROPOUT:
        p = getattr(config, name, 0.0) or 0.0
        if isinstance(p, (int, float)) and p > 0:
            raise ConfigError(f"{where} has {name}={p:g}: dropout inside the attention function "
                              "draws from torch's global generator, which the replay cannot "
                              f"reproduce; set {name}=0 (fastreplay makes the model's nn.Dropout "
                              "layers deterministic, not the attention's own)")


def _config_of(lm: nn.Module):
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.config


class CausalLM(nn.Module):
    """A causal LM (a transformers model, or a peft model around one) as fastreplay calls it:
    token ids (B, T) -> next-token logits (B, T, V). ``pad_id``: the padding token, masked out of
    attention (with right padding, as examples built here have, the other tokens' logits are
    bitwise those of the unpadded sequence)."""

    def __init__(self, lm: nn.Module, pad_id: Optional[int] = None):
        super().__init__()
        config = _config_of(lm)
        check_attention(config)
        config.use_cache = False
        self.lm = lm
        self.pad_id = pad_id
        if pad_id is None:
            _skip_padding_warning(lm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_attention(_config_of(self.lm))  # transformers reads it at call time
        mask = None if self.pad_id is None else (ids != self.pad_id).long()
        return self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _skip_padding_warning(lm: nn.Module) -> None:
    """Without padding there is nothing for transformers' "padding without an attention mask"
    check to warn about, and the check reads token values (``.item()``), which fails under
    torch.func.vmap over examples (per-example gradients: TracIn, gradient similarity). It only
    warns, so switching it off on each of the model's PreTrainedModels changes no number."""
    for module in lm.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = _no_warning


def _no_warning(input_ids, attention_mask) -> None:
    return None


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its labelled positions: (B, T, V),
    (B, T) -> (B,); positions labelled IGNORE take no loss (an example without any: 0)."""
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                             ignore_index=IGNORE)
    counted = (labels != IGNORE).to(tokens.dtype)
    return (tokens * counted).sum(1) / counted.sum(1).clamp_min(1.0)


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter to fine-tune instead of the whole model (peft.LoraConfig's fields)."""
    r: int = 8
    alpha: int = 16
    target_modules: Sequence[str] = ("c_attn",)
    dropout: float = 0.0

    def apply(self, model: nn.Module) -> nn.Module:
        """The peft model around ``model``: base weights frozen, the adapter trainable (its A
        drawn from torch's generator, which fastreplay has seeded with the run's seed)."""
        peft = require("peft")
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha,
                                 target_modules=list(self.target_modules),
                                 lora_dropout=self.dropout, task_type="CAUSAL_LM",
                                 fan_in_fan_out=_is_conv1d_target(model, self.target_modules))
        return peft.get_peft_model(model, config)


def _is_conv1d_target(model: nn.Module, targets: Sequence[str]) -> bool:
    """GPT-2's projections are transformers' Conv1D (weights stored (in, out)): peft needs
    fan_in_fan_out for them (and warns and sets it itself otherwise)."""
    conv1d = getattr(require("transformers.pytorch_utils"), "Conv1D", ())
    return any(isinstance(m, conv1d) for name, m in model.named_modules()
               if name.split(".")[-1] in targets)


def load_causal_lm(source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM in training mode with eager attention: from a
    ``save_pretrained`` directory, a hub id (where the network reaches the hub), or a
    transformers config (a fresh model, initialised from torch's generator)."""
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per process
    auto = transformers.AutoModelForCausalLM
    if isinstance(source, transformers.PretrainedConfig):
        model = auto.from_config(source, attn_implementation=EAGER, dtype=dtype)
    else:
        where = os.fspath(source)
        if not Path(where).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"model {where} is not a directory and HF_HUB_OFFLINE=1; give "
                              "the directory save_pretrained wrote")
        try:
            model = auto.from_pretrained(where, attn_implementation=EAGER, dtype=dtype)
        except OSError as exc:
            raise ConfigError(f"cannot load the model {where} ({str(exc).splitlines()[0][:200]}); "
                              "give a save_pretrained directory, or a hub id with the network "
                              "up") from None
    return model.train()


def causal_lm_factory(source, lora: Optional[Lora] = None, pad_id: Optional[int] = None,
                      dtype: torch.dtype = torch.float32,
                      dropout: Optional[float] = None) -> Callable[[], nn.Module]:
    """The Task.model factory of a causal LM (load_causal_lm's ``source``), full fine-tune or
    ``lora``; ``dropout``: the p of every nn.Dropout of the model (None: as saved). fastreplay
    calls it under the run's seed, so a LoRA adapter's initial weights, and a model built from a
    config, are a function of the seed."""
    def build() -> nn.Module:
        model = load_causal_lm(source, dtype)
        if dropout is not None:
            for layer in model.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = float(dropout)
        if lora is not None:
            model = lora.apply(model)
        return CausalLM(model, pad_id)
    return build


def causal_lm_task(model: Callable[[], nn.Module], train: tuple, test: tuple) -> Task:
    """A Task for a causal LM: ``model`` a zero-argument factory (causal_lm_factory), ``train``
    and ``test`` (ids, labels) pairs of int arrays (N, T) (see sequences_from_tokens and
    prompt_answer_examples). The measurement is a test sequence's mean token loss
    (measure.kind = loss)."""
    return Task(model=model, data=ArrayData(*train, *test), loss=token_loss,
                measurements={"loss": token_loss})


def sequences_from_tokens(tokens: np.ndarray, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows of ``length + 1`` tokens evenly spaced over a token stream (no random
    draw): ids are a window's first ``length`` tokens, labels the same window shifted by one,
    every position labelled."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < length + 1:
        raise ConfigError(f"the text has {len(tokens)} tokens, fewer than one sequence of "
                          f"{length + 1}; give more text or shorter sequences")
    starts = np.linspace(0, len(tokens) - length - 1, count).astype(np.int64)
    windows = np.stack([tokens[s:s + length + 1] for s in starts])
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def prompt_answer_examples(tokenizer, pairs: Sequence[tuple[str, str]], length: int,
                           pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of prompt/answer pairs, right-padded to ``length``: the loss (and the
    measurement) covers the answer's tokens only; the prompt and the padding are labelled
    IGNORE. Too long pairs are cut at ``length``."""
    ids = np.full((len(pairs), length), pad_id, dtype=np.int64)
    labels = np.full((len(pairs), length), IGNORE, dtype=np.int64)
    for row, (prompt, answer) in enumerate(pairs):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(answer, add_special_tokens=False)
        seq = (p + a)[:length + 1]
        n = len(seq) - 1
        ids[row, :n] = seq[:-1]
        target = np.asarray(seq[1:])
        answer_from = max(len(p) - 1, 0)  # label j predicts token j + 1
        keep = np.arange(n) >= answer_from
        labels[row, :n] = np.where(keep, target, IGNORE)
    return ids, labels
