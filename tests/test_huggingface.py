"""Hugging Face causal LMs through the Task API (fastreplay.integrations.huggingface): a tiny
transformers GPT-2, fully fine-tuned and with a peft LoRA adapter, with what fine-tuning recipes
use (AdamW, warm-up + cosine, clipping active on some steps, micro-batches, dropout), against
float64 finite differences of real retrainings (1e-6 relative) and the unrolled oracle.

Needs the hf extra; scripts/test.sh sets FASTREPLAY_REQUIRE_HF=1 so that CI fails, rather than
skips, when it is missing.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from test_exactness import assert_matches_finite_differences, central_differences, one_thread

from fastreplay.config import load_config
from fastreplay.core.recipe import Recipe
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import replay
from fastreplay.exceptions import ConfigError
from fastreplay.integrations.huggingface import (
    IGNORE,
    Lora,
    causal_lm_factory,
    causal_lm_task,
    prompt_answer_examples,
    token_loss,
)
from fastreplay.interface.api import counterfactual, open_or_train

if os.environ.get("FASTREPLAY_REQUIRE_HF") == "1":
    import peft  # noqa: F401  (an ImportError fails the run)
    import transformers
else:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")

TARGETS = [0, 3]
VOCAB, LENGTH = 40, 8
RECIPE = ["train.dtype=float64", "train.optimizer=adamw", "train.lr=0.01", "train.beta2=0.99",
          "train.eps=0", "train.eps_root=1e-6", "train.weight_decay=0.01",
          "train.schedule=cosine", "train.peak_at=0.2", "train.start_factor=0",
          "train.batch_size=6", "train.micro_batch=3", "train.epochs=2",
          "replay.checkpoint_every=3"]
"""A fine-tuning recipe: AdamW with warm-up + cosine, micro-batches of 3 (and, per test, a clip
threshold inside the run's range of gradient norms), float64 for finite differences."""


def gpt2_config(**changes):
    settings = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                    embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.0, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
    settings.update(changes)
    return transformers.GPT2Config(**settings)


def token_data(n: int, seed: int):
    windows = np.random.default_rng(seed).integers(2, VOCAB, (n, LENGTH + 1))
    return windows[:, :-1], windows[:, 1:]


def tiny_task(lora: Lora | None = None):
    return causal_lm_task(causal_lm_factory(gpt2_config(), lora=lora), token_data(24, 0),
                          token_data(4, 1))


def _clip_inside_the_run(overrides, task) -> float:
    """A clip threshold between the run's smallest and largest gradient norms."""
    from fastreplay.core.train import run_steps
    recipe = Recipe(load_config("test", overrides=overrides), task=task)
    norms = []
    run_steps(recipe, recipe.init_state(), recipe.ones(), recipe.num_steps,
              on_step=lambda s: norms.append(float(recipe.gradient(s.theta, s.buffers, s.step)
                                                   .norm())))
    return float(np.median(norms))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_hf_fine_tunes_match_finite_differences(kind, tmp_path):
    lora = Lora(r=2, alpha=4, target_modules=("c_attn",), dropout=0.1) if kind == "lora" else None
    clip = _clip_inside_the_run(RECIPE, tiny_task(lora))
    overrides = RECIPE + [f"train.clip_norm={clip!r}"]
    cfg = load_config("test", overrides=overrides)
    task = tiny_task(lora)
    recipe, store = open_or_train(cfg, tmp_path / "run", task=task)
    with one_thread():
        scores = replay(recipe, store, TARGETS, "loss").scores
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train, eps=1e-5)
        oracle = unrolled_scores(recipe, TARGETS, "loss").detach().numpy()
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert_matches_finite_differences(scores, examples, fd)
    # what is theta: the adapter's weights for LoRA (the base frozen, in the fingerprint), all
    # of the model's for a full fine-tune; the checkpoints hold theta and the optimizer state
    lm = recipe.model.module.lm
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert recipe.model.num_params == trainable
    _, params, state, _ = store.read_checkpoint(1)
    assert params.shape == (trainable,) and state.shape == (2 * trainable,)
    if kind == "lora":
        assert all("lora_" in s.name for s in recipe.model.param_slots)
        assert trainable < 0.1 * sum(p.numel() for p in lm.parameters())
        assert any("base_layer" in name for name in recipe.model.frozen)
    store.close()


def test_per_example_gradients_vmap_over_an_unpadded_model():
    """Peers take per-example gradients with torch.func.vmap over the examples (dattri's
    TracIn); transformers' padding check reads token values (.item()), which vmap refuses, so
    an unpadded CausalLM skips it: vmapped gradients equal the one-by-one ones."""
    model = causal_lm_factory(gpt2_config(embd_pdrop=0.0, resid_pdrop=0.0))().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = (torch.as_tensor(a) for a in token_data(3, 2))

    def loss(p, xi, yi):
        logits = torch.func.functional_call(model, p, (xi[None],))
        return token_loss(logits, yi[None]).sum()

    vmapped = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        one = torch.func.grad(loss)(params, x[i], y[i])
        for k in params:
            torch.testing.assert_close(vmapped[k][i], one[k], rtol=1e-10, atol=1e-12)


def test_the_base_weights_are_fingerprinted(tmp_path):
    """A LoRA run's store refuses another base model: the frozen weights are in the model's
    fingerprint (and checkpoints hold only the adapter)."""
    from fastreplay.exceptions import StoreError
    lora = Lora(r=2, alpha=4)
    cfg = load_config("test", overrides=RECIPE)
    _, store = open_or_train(cfg, tmp_path / "run", task=tiny_task(lora))
    store.close()
    other = causal_lm_task(causal_lm_factory(gpt2_config(n_embd=16, initializer_range=0.05),
                                             lora=lora), token_data(24, 0), token_data(4, 1))
    with pytest.raises(StoreError, match="trained with a different model"):
        open_or_train(cfg, tmp_path / "run", task=other)


def test_attention_without_second_derivatives_is_refused():
    """sdpa (the transformers default) has fused kernels without second derivatives: refused in
    one line before anything runs; so is dropout drawn inside the attention function."""
    config = gpt2_config()
    config._attn_implementation = "sdpa"
    sdpa = causal_lm_task(lambda: _wrap(transformers.GPT2LMHeadModel(config)), token_data(24, 0),
                          token_data(4, 1))
    with pytest.raises(ConfigError, match=r"the model uses attn_implementation='sdpa', which has "
                                          r"no second derivatives .*load it with "
                                          r"attn_implementation='eager'"):
        Recipe(load_config("test", overrides=RECIPE), task=sdpa)
    dropping = causal_lm_task(causal_lm_factory(gpt2_config(attn_pdrop=0.1)), token_data(24, 0),
                              token_data(4, 1))
    with pytest.raises(ConfigError, match=r"has attn_pdrop=0.1: dropout inside the attention "
                                          r"function draws from torch's global generator"):
        Recipe(load_config("test", overrides=RECIPE), task=dropping)


def _wrap(model):
    from fastreplay.integrations.huggingface import CausalLM
    return CausalLM(model)


def test_prompt_answer_examples_take_the_loss_on_the_answer_only():
    class Chars:  # a tokenizer of single characters
        def encode(self, text, add_special_tokens=False):
            return [ord(c) - 90 for c in text]

    ids, labels = prompt_answer_examples(Chars(), [("ab", "cde"), ("abcd", "e")], length=6,
                                         pad_id=1)
    a, b, c, d, e = (ord(ch) - 90 for ch in "abcde")
    assert ids.tolist() == [[a, b, c, d, 1, 1], [a, b, c, d, 1, 1]]
    assert labels.tolist() == [[IGNORE, c, d, e, IGNORE, IGNORE], [IGNORE] * 3 + [e] + [IGNORE] * 2]
    logits = torch.randn(2, 6, 20, dtype=torch.float64)
    got = token_loss(logits, torch.as_tensor(labels))
    want = [torch.nn.functional.cross_entropy(logits[0, 1:4], torch.tensor([c, d, e])),
            torch.nn.functional.cross_entropy(logits[1, 3:4], torch.tensor([e]))]
    torch.testing.assert_close(got, torch.stack(want))


def test_without_the_extra_the_hf_path_names_it(monkeypatch):
    from fastreplay.integrations import huggingface
    monkeypatch.setitem(sys.modules, "peft", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r"^Hugging Face models need the peft package, which is "
                                          r"not installed; install the extra: pip install "
                                          r"'fastreplay\[hf\]'$"):
        huggingface.Lora().apply(torch.nn.Linear(2, 2))
