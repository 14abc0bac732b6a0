"""fastreplay against EleutherAI bergson's MAGIC on the same fine-tuning run (the CPU size of
examples/hf_finetune.py), scores and wall time.

    python benchmarks/compare_bergson.py [--targets 11,16,18,30] [--dtype float64]

bergson (PyPI `bergson`, with torchopt, datasets; an optional dependency that this script alone
imports) replays a run by double backward through torchopt's differentiable AdamW. The two runs
are made the same run:

* the pretrained GPT-2 of the example (untied embeddings: bergson unties tied ones), eager
  attention, dropout 0 (bergson replays dropout by restoring torch's generator, fastreplay draws
  hashed masks: other masks, so other runs), float64 by default;
* the fine-tuning sequences in fastreplay's batch order (bergson takes consecutive rows), one
  data weight per row: an example's score is the sum over its rows (one per epoch);
* AdamW with the same betas, eps and eps_root (the example's 1e-8; at 0 bergson's double
  backward gives NaN where a second moment is 0, and its default 1e-17 is another optimizer),
  decoupled weight decay on every parameter (torchopt 0.7.3's masked decay fails), the same
  warm-up + cosine learning rates and clipping at the same global norm;
* sequences of equal length, every position labelled: bergson's "mean" loss
  sum_i w_i sum_t l_it / (B T) is then fastreplay's (1/B) sum_i w_i mean_t l_it;
* one measurement per target: its mean token loss at the end (bergson: one backward each).

torchopt computes Adam's bias correction in float32, so the two trajectories differ in their
last digits (~1e-7 relative): the scores are compared by Pearson correlation and relative L2
error, not bit for bit. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXTRA: list = []  # config overrides of both runs (--set)
sys.path.insert(0, str(ROOT / "examples"))


def fastreplay_scores(targets, dtype: str, run_dir: Path):
    import hf_finetune as example

    from fastreplay.config import load_config
    from fastreplay.integrations.huggingface import causal_lm_factory, causal_lm_task
    from fastreplay.interface.api import open_or_train, run_magic
    from fastreplay.store import RunStore
    transformers = __import__("transformers")
    where = example.pretrained(example.CPU)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(where)
    train, test = example.finetuning_data(example.CPU, tokenizer)
    # every parameter decayed: torchopt's masked weight decay fails on its MaskedNode (0.7.3)
    task = dataclasses.replace(causal_lm_task(causal_lm_factory(where, dropout=0.0), train, test),
                               decays=lambda name, param: True)
    cfg = load_config("test", ROOT / "examples" / "hf_finetune.toml",
                      [f"train.dtype={dtype}", *EXTRA])
    t0 = time.perf_counter()
    res = run_magic(cfg, targets, run_dir, plots=False, task=task)
    seconds = time.perf_counter() - t0
    recipe, store = open_or_train(cfg, run_dir, task=task)
    store.close()
    store = RunStore.open(Path(run_dir) / "run.zarr", "r")
    flat = store.read_final()[0]
    store.close()
    final = {slot.name.removeprefix("lm."): flat[slot.offset:slot.offset + slot.numel]
             for slot in recipe.model.param_slots}
    return {"scores": res.scores, "seconds": seconds, "train_seconds": res.train_seconds,
            "replay_seconds": res.replay_seconds, "recipe": recipe, "where": where,
            "train": train, "test": test, "final": final}


def bergson_scores(fr: dict, targets, dtype: str):
    import torchopt
    from bergson.magic import BackwardState, DataStream, Trainer
    from bergson.magic.data_stream import mask_padded_rows
    from bergson.magic.grad_accum import accumulate_grads
    from bergson.utils import weighted_causal_lm_ce
    from datasets import Dataset
    from torchopt.pytree import tree_iter
    transformers = __import__("transformers")
    recipe, cfg = fr["recipe"], fr["recipe"].cfg
    t = cfg.train
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    order = recipe.plan.indices_np.reshape(-1)  # fastreplay's batches, one after another
    ids, labels = fr["train"]
    windows = np.concatenate([ids, labels[:, -1:]], axis=1)  # the T + 1 tokens of each window
    rows = windows[order].tolist()
    lrs = recipe.optimizer.lrs[:, 0]  # one parameter group's schedule (both groups share it)

    def build():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            fr["where"], attn_implementation="eager", dtype=torch_dtype)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        model.config.use_cache = False
        model.loss_function = partial(weighted_causal_lm_ce, reduction="mean")
        return model.train()

    def optimizer():
        return torchopt.adamw(lambda count: float(lrs[int(count)]), betas=(t.beta1, t.beta2),
                              eps=t.eps, eps_root=t.eps_root, weight_decay=t.weight_decay)

    t0 = time.perf_counter()
    model = build()
    trainer, state = Trainer.initialize(model, optimizer())
    stream = DataStream(Dataset.from_dict({"input_ids": rows}), t.batch_size, device="cpu")
    stream.weights = torch.nn.Parameter(torch.ones(len(rows), dtype=torch_dtype))
    ck = tempfile.mkdtemp(prefix="bergson-ck-")
    state = trainer.train(state, stream, save_dir=ck, save_mode="all",
                          max_grad_norm=t.clip_norm or None)
    train_seconds = time.perf_counter() - t0
    final = {k: v.detach().double().reshape(-1).numpy().copy() for k, v in state.params.items()}
    test_windows = np.concatenate([fr["test"][0], fr["test"][1][:, -1:]], axis=1)
    queries = []  # every target's gradient at the final state, before any backward pass
    for target in targets:
        query = DataStream(Dataset.from_dict({"input_ids": [test_windows[target].tolist()]}), 1,
                           device="cpu")
        with state.activate(model) as params:
            batch, _ = mask_padded_rows(query[0])
            qgrads, _ = accumulate_grads(model, params, batch, 1, create_graph=False)
        queries.append({k: v.detach() for k, v in qgrads.items()})
    out = []
    stream.requires_grad = True
    for qgrads in queries:  # one backward each; inplace=False leaves the final state as it is
        opt_grads = [torch.zeros_like(b) for b in tree_iter(state.opt_state)
                     if isinstance(b, torch.Tensor) and b.is_floating_point()]
        bwd = trainer.backward(ck, stream, BackwardState(qgrads, opt_grads,
                                                         torch.zeros_like(stream.weights)),
                               state, cleanup=False, inplace=False, save_mode="all",
                               max_grad_norm=t.clip_norm or None)
        per_row = bwd.weight_grads.detach().double().numpy()
        out.append(np.bincount(order, weights=per_row, minlength=recipe.num_train))
    seconds = time.perf_counter() - t0
    shutil.rmtree(ck, ignore_errors=True)
    return {"scores": np.stack(out), "seconds": seconds, "train_seconds": train_seconds,
            "final": final}


def _rel_diff(ours: dict, theirs: dict) -> float:
    """||ours - theirs|| / ||ours|| over the parameters, matched by name."""
    a = np.concatenate([ours[k] for k in sorted(ours)])
    b = np.concatenate([theirs[k] for k in sorted(ours)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="11,16,18,30")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--set", action="append", default=[], help="config override, both runs")
    args = parser.parse_args()
    EXTRA.extend(args.set)
    targets = [int(t) for t in args.targets.split(",")]
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        fr = fastreplay_scores(targets, args.dtype, Path(tmp) / "run")
        bg = bergson_scores(fr, targets, args.dtype)
    a, b = fr["scores"], bg["scores"]
    pearson = [float(np.corrcoef(a[k], b[k])[0, 1]) for k in range(len(targets))]
    out = {"targets": targets, "dtype": args.dtype,
           "pearson_per_target": pearson, "pearson_min": min(pearson),
           "pearson_all": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
           "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
           "final_params_rel_diff": _rel_diff(fr["final"], bg["final"]),
           "fastreplay_seconds": fr["seconds"], "fastreplay_train_seconds": fr["train_seconds"],
           "fastreplay_replay_seconds": fr["replay_seconds"],
           "bergson_seconds": bg["seconds"], "bergson_train_seconds": bg["train_seconds"],
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
