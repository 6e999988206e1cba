"""A GPT decoder as nanoGPT's ``model.py`` builds it: token and position embeddings, pre-norm blocks
of causal self-attention and a 4x GELU MLP, a final LayerNorm and a head tied to the token embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int
    block_size: int  # the longest context the position embedding covers
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool  # biases in the Linear layers and LayerNorms (nanoGPT's train.py defaults to none)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_head, self.dropout = shape.n_head, shape.dropout
        self.c_attn = nn.Linear(shape.n_embd, 3 * shape.n_embd, bias=shape.bias)
        self.c_proj = nn.Linear(shape.n_embd, shape.n_embd, bias=shape.bias)
        self.resid_dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Attention in float32 under a CPU autocast: the CPU's bf16 flash-attention backward
            # takes about nine times its float32 one at these shapes (3 ms against 0.33 ms a layer
            # for 6 windows of 64, 4 heads of 32), more than bf16 matmuls save in the whole step.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(batch, time, channels)))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.c_fc = nn.Linear(shape.n_embd, 4 * shape.n_embd, bias=shape.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * shape.n_embd, shape.n_embd, bias=shape.bias)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd, bias=shape.bias)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.n_embd, bias=shape.bias)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """``forward(ids)`` -> logits over the vocabulary at every position, shape (batch, time, vocab)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd {shape.n_embd} is not a multiple of n_head {shape.n_head}")
        self.shape = shape
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(shape.vocab_size, shape.n_embd),
                "wpe": nn.Embedding(shape.block_size, shape.n_embd),
                "drop": nn.Dropout(shape.dropout),
                "h": nn.ModuleList(Block(shape) for _ in range(shape.n_layer)),
                "ln_f": nn.LayerNorm(shape.n_embd, bias=shape.bias),
            }
        )
        self.lm_head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        # Weight tying: one Parameter serves as input embedding and output projection (fewer
        # parameters, and it helps a small model); state_dict lists it under both names.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        # GPT-2's scaled init of the projections into the residual stream, so its variance does
        # not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.shape[1]
        if time > self.shape.block_size:
            raise ValueError(f"a context of {time} exceeds the block size {self.shape.block_size}")
        positions = torch.arange(time, device=ids.device)
        x = self.transformer.drop(self.transformer.wte(ids) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's two AdamW groups: weight decay on the matrices and embeddings (2-D), none on
    biases and LayerNorm weights."""
    params = list(model.parameters())  # a tied Parameter is listed once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@torch.no_grad()
def sample(
    model: GPT, ids: list[int], tokens: int, generator: torch.Generator, temperature: float, top_k: int | None
) -> list[int]:
    """``tokens`` more ids after ``ids``, each drawn from the model's distribution over the last
    ``block_size`` ids (scaled by ``temperature``, cut to the ``top_k`` likeliest)."""
    model.eval()
    out = torch.tensor([ids], dtype=torch.int64)
    for _ in range(tokens):
        logits = model(out[:, -model.shape.block_size :])[:, -1, :] / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        following = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        out = torch.cat([out, following], dim=1)
    return out[0, len(ids) :].tolist()
