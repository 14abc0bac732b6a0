"""Fine-tune a Hugging Face GPT-2 and attribute the whole fine-tuning run, exactly: full
fine-tuning and LoRA, offline, end to end (needs ``pip install 'fastreplay[hf]'``).

What it shows: the models people fine-tune, through the own-task API. A small GPT-2
(transformers' ``GPT2LMHeadModel``) is pretrained once on the top-level modules of this
interpreter's standard library, with a byte-level BPE tokenizer trained on the same text, and
saved with ``save_pretrained`` (cached under ~/.cache/fastreplay/hf_finetune/, keyed by its
settings). The fine-tuning domain is different: the stdlib's packages (asyncio, email, json,
xml, ...). Fine-tuning uses AdamW, warm-up + cosine, global gradient-norm clipping and dropout
(deterministic masks), over the whole fine-tuning run; a score says how much up-weighting one
fine-tuning sequence changes a held-out sequence's loss, exactly.

On a CPU (``make_task``: full fine-tune of a 2-layer, width-64 model; ``make_lora_task``: a
rank-8 LoRA adapter on its attention projections):

    python -m fastreplay magic --preset test --config examples/hf_finetune.toml \
        --task examples/hf_finetune.py:make_task --targets 0:4 --run-dir runs/hf
    python -m fastreplay lds --run-dir runs/hf --task examples/hf_finetune.py:make_task \
        --models 16 --keep 0.99

On a GPU (``make_full_task``: 6 layers of width 384, vocabulary 4,096, 13.8M parameters;
10,240 fine-tuning sequences of 32 tokens), the same commands with ``--task
examples/hf_finetune.py:make_full_task --set device=cuda --set train.batch_size=128 --set
train.epochs=1 --set replay.checkpoint_every=20 --set replay.target_batch=8`` (80 steps; the
README gives its figures).

The text ships with every Python, so nothing is downloaded; different Python versions have
different standard libraries, so the data, and the figures, are those of the Python you run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastreplay.integrations.huggingface import (
    Lora,
    causal_lm_factory,
    causal_lm_task,
    require,
    sequences_from_tokens,
)
from fastreplay.progress import log
from fastreplay.task import Task

SKIPPED_PACKAGES = {"test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo",
                    "ensurepip", "venv", "unittest", "pydoc_data", "encodings", "__phello__",
                    "distutils"}
"""Left out of the fine-tuning domain: tests, GUIs, vendored wheels, codec tables."""


@dataclass(frozen=True)
class Size:
    """A pretrained model and its fine-tuning data."""
    layers: int
    width: int
    heads: int
    vocab: int
    length: int
    """Tokens per sequence (fine-tuning and pretraining)."""
    pretrain_steps: int
    pretrain_batch: int
    num_train: int
    num_test: int
    dropout: float = 0.1
    """GPT-2's embedding and residual dropout while fine-tuning (attention dropout stays 0)."""


CPU = Size(layers=2, width=64, heads=2, vocab=512, length=32, pretrain_steps=300,
           pretrain_batch=32, num_train=256, num_test=32)
GPU = Size(layers=6, width=384, heads=6, vocab=4096, length=32, pretrain_steps=1500,
           pretrain_batch=64, num_train=10240, num_test=512)


PRETRAINING_FORMAT = 2
"""Part of the cache key: raised whenever _pretrain changes what it makes."""


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pretraining_files() -> list[Path]:
    """The standard library's top-level modules, in name order."""
    return sorted(stdlib().glob("*.py"))


def finetuning_files() -> list[Path]:
    """The standard library's packages (asyncio/, email/, json/, ...), their tests left out."""
    packages = sorted(p for p in stdlib().iterdir()
                      if p.is_dir() and (p / "__init__.py").exists() and p.name not in SKIPPED_PACKAGES)
    return [f for p in packages for f in sorted(p.rglob("*.py")) if "tests" not in f.parts
            and "test" not in f.parts]


def _text(files: list[Path]) -> str:
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def cache_root() -> Path:
    return Path(os.environ.get("FASTREPLAY_CACHE", Path.home() / ".cache" / "fastreplay")) / "hf_finetune"


def pretrained(size: Size) -> Path:
    """The directory holding the pretrained model and tokenizer of ``size`` (save_pretrained),
    made on first use: a deterministic function of the size and this Python's stdlib."""
    files = pretraining_files()
    key = hashlib.blake2b(json.dumps([PRETRAINING_FORMAT, asdict(size), [f.name for f in files],
                                      sum(f.stat().st_size for f in files)]).encode(),
                          digest_size=8).hexdigest()
    where = cache_root() / f"gpt2-{size.layers}x{size.width}-{key}"
    if (where / "done").exists():
        return where
    tmp = where.parent / f".{where.name}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        _pretrain(size, _text(files), tmp)
        (tmp / "done").write_text("ok\n")
        try:
            os.rename(tmp, where)
        except OSError:  # another process made it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return where


def _tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer trained on ``text`` (deterministic), as transformers loads it."""
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|pad|>")


def _pretrain(size: Size, text: str, out: Path) -> None:
    """Pretrain GPT-2 of ``size`` on ``text`` with plain PyTorch (AdamW, cosine), save it and
    its tokenizer. Deterministic: seeded, CPU or the device of a deterministic CUDA run."""
    transformers = require("transformers")
    tokenizer = _tokenizer(text, size.vocab)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    config = transformers.GPT2Config(
        # length + 1 positions: a window of length + 1 tokens fits whole (bergson's replay of
        # the same run feeds the window and shifts it itself, benchmarks/compare_bergson.py)
        vocab_size=len(tokenizer), n_positions=size.length + 1, n_embd=size.width,
        n_layer=size.layers, n_head=size.heads, embd_pdrop=size.dropout,
        resid_pdrop=size.dropout, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The pretraining is not attributed, so on a GPU it may take bf16 autocast (fast); the
    # fine-tuning that is attributed runs in the run's own dtype.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=size.pretrain_steps)
    rng = np.random.default_rng(0)
    for _ in range(size.pretrain_steps):
        starts = rng.integers(0, len(tokens) - size.length - 1, size.pretrain_batch)
        batch = torch.as_tensor(np.stack([tokens[s:s + size.length + 1] for s in starts]),
                                device=device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("pretrained GPT-2 %dx%d (%d steps) in %.1fs, saved in %s", size.layers, size.width,
             size.pretrain_steps, time.perf_counter() - t0, out)


def finetuning_data(size: Size, tokenizer) -> tuple[tuple, tuple]:
    """(train, test) (ids, labels): evenly spaced windows of the packages' text, every tenth
    file held out for the test sequences."""
    files = finetuning_files()
    test_files, train_files = files[::10], [f for i, f in enumerate(files) if i % 10]
    encode = lambda fs: np.asarray(tokenizer.encode(_text(fs)), dtype=np.int64)  # noqa: E731
    return (sequences_from_tokens(encode(train_files), size.num_train, size.length),
            sequences_from_tokens(encode(test_files), size.num_test, size.length))


def make_task(size: Size = CPU, lora: Lora | None = None) -> Task:
    """Fine-tune the pretrained model of ``size`` on the packages' text: all its weights, or
    the ``lora`` adapter only."""
    transformers = require("transformers")
    where = pretrained(size)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(where)
    train, test = finetuning_data(size, tokenizer)
    model = causal_lm_factory(where, lora=lora)
    return causal_lm_task(model, train, test)


def make_lora_task() -> Task:
    """The CPU size with a rank-8 LoRA adapter on the attention projections (c_attn)."""
    return make_task(CPU, Lora(r=8, alpha=16, target_modules=("c_attn",), dropout=0.1))


def make_full_task() -> Task:
    """The GPU size: 13.8M parameters, 10,240 fine-tuning sequences of 32 tokens."""
    return make_task(GPU)


def make_full_lora_task() -> Task:
    return make_task(GPU, Lora(r=16, alpha=32, target_modules=("c_attn",), dropout=0.1))
