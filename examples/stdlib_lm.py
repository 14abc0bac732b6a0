"""Whole-run data attribution for a small causal transformer trained with AdamW on Python source.

What it shows: a language model written the usual way (token and position embeddings, pre-norm
blocks of ``nn.LayerNorm``, causal self-attention computed with plain matrix products, a GELU
MLP; no dropout, no fused attention kernel) trained with AdamW through the own-task API. A
training example is a sequence of bytes of Python source; a measurement is the loss of one
held-out test sequence; a score says how much up-weighting one training sequence changes that
loss, exactly, over the whole training run.

The text ships with every Python: the source of the standard library of the interpreter that
runs this (``sysconfig.get_paths()["stdlib"]``, its top-level modules in name order). Every
tenth module is held out for the test sequences; the others give the training sequences.
Different Python versions have different standard libraries, so the data, and the figures, are
those of the Python you run.

On a CPU (``make_task``: 512 training sequences of 32 bytes, a 2-layer model of width 32):

    python -m fastreplay magic --preset test --config examples/stdlib_lm.toml \
        --task examples/stdlib_lm.py:make_task --targets 0:4 --run-dir runs/lm
    python -m fastreplay lds --run-dir runs/lm --task examples/stdlib_lm.py:make_task \
        --models 16 --keep 0.99

On a GPU (``make_full_task``: 8,192 sequences of 64 bytes, width 128), the same commands with
``--task examples/stdlib_lm.py:make_full_task --set device=cuda --set train.batch_size=128
--set train.eps_root=1e-6`` (with the CPU's eps_root of 1e-8 this size is chaotic over its whole
run). Measured on one NVIDIA H200 (benchmarks/RESULTS.md): 37.6% next-byte accuracy, training
5.2 s, replay 2.0 s per target, LDS 0.78 at keep 0.99 (50 targets, 100 models): short of 0.95.
With ``--set train.batch_size=512 --set train.epochs=8`` instead (36.3% accuracy), the GPU recipe,
the whole run predicts retraining: LDS 0.998 [0.998, 0.999] at keep 0.99 (50 test sequences
drawn at random, 100 models; one H200, 2026-12-03).
"""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastreplay.task import ArrayData, Task

VOCAB = 256
"""Byte-level tokens: no tokenizer to install, every file reads the same everywhere."""


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the preceding positions, as plain matrix products and a
    softmax (the "math" attention path: forward-mode and second derivatives exist for it)."""

    def __init__(self, width: int, heads: int, length: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, length: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, length)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Byte ids (B, T) -> next-byte logits (B, T, 256)."""

    def __init__(self, width: int, layers: int, heads: int, length: int):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, length) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of each sequence: (B, T, V), (B, T) -> (B,). The training
    loss of an example and the measurement of a test sequence alike."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def stdlib_files() -> list[Path]:
    """The top-level modules of this interpreter's standard library, in name order."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def sequences(files: list[Path], count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length + 1`` bytes, evenly spaced over the files' concatenated
    text (deterministic: no random draw)."""
    text = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8)
    starts = np.linspace(0, len(text) - length - 1, count).astype(np.int64)
    return np.stack([text[s:s + length + 1] for s in starts]).astype(np.int64)


def load_arrays(num_train: int, num_test: int, length: int) -> ArrayData:
    """Inputs are a window's first ``length`` bytes, targets the same window shifted by one."""
    files = stdlib_files()
    test_files, train_files = files[::10], [f for i, f in enumerate(files) if i % 10]
    train, test = sequences(train_files, num_train, length), sequences(test_files, num_test, length)
    return ArrayData(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:])


def make_task(num_train: int = 512, num_test: int = 64, length: int = 32, width: int = 32,
              layers: int = 2, heads: int = 2) -> Task:
    """The CPU-sized language model and its data."""
    def build_model() -> nn.Module:
        return TinyGPT(width, layers, heads, length)
    return Task(model=build_model, data=load_arrays(num_train, num_test, length),
                loss=sequence_loss, measurements={"loss": sequence_loss})


def make_full_task() -> Task:
    """The GPU-sized one: 8,192 training sequences of 64 bytes, width 128, 2 layers, 4 heads."""
    return make_task(8192, 512, 64, 128, 2, 4)
