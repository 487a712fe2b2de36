"""Bidirectional encoders over packed tokens: BERT, XLM-RoBERTa and MPNet.

One post-LayerNorm transformer covers the three; they differ only in position ids (RoBERTa-style
models count positions from padding_idx + 1), token-type embeddings (BERT only) and MPNet's
relative-position attention bias. Shapes: T packed tokens, D hidden, H heads, d head size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models import cpu_fusion
from toolkit.models.attention import packed_attention
from toolkit.models.base import SINGLE_TOKEN_MODES
from toolkit.models.layers import LayerStack, gelu_, uninitialized_embedding
from toolkit.models.packed_batch import PackedBatch


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    activation: str
    position_offset: int  # added to 0-based positions (padding_idx + 1 for RoBERTa and MPNet)
    type_vocab_size: int  # 0 when the model has no token-type embeddings
    relative_buckets: int  # MPNet's relative attention buckets, 0 for none

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_input_tokens(self) -> int:
        return self.max_positions - self.position_offset

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> EncoderConfig:
        model_type = hf["model_type"]
        offset = 0 if model_type == "bert" else int(hf.get("pad_token_id", 1)) + 1
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            activation=hf.get("hidden_act", "gelu"),
            position_offset=offset,
            type_vocab_size=hf.get("type_vocab_size", 0) if model_type != "mpnet" else 0,
            relative_buckets=hf.get("relative_attention_num_buckets", 32) if model_type == "mpnet" else 0,
        )


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual): the post-LayerNorm step after attention and after the MLP."""
    return F.layer_norm(x + residual, weight.shape, weight, bias, eps)


@functools.cache
def compiled_add_layer_norm() -> Callable[..., torch.Tensor]:
    """`add_layer_norm` fused by torch.compile; one compiled function for every layer (all its
    arguments are tensors, so no layer needs a graph of its own)."""
    compiled: Callable[..., torch.Tensor] = torch.compile(add_layer_norm, dynamic=True)
    return compiled


# In place: the MLP's first product returns a fresh tensor that nothing else reads, and writing
# the activation over it spares a second [T, intermediate] buffer, which lies past the caches.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_,
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": lambda x: torch.relu_(x),
    "silu": lambda x: F.silu(x, inplace=True),
}


# GELUs that cuBLASLt can apply inside the first MLP product on a GPU, in its tanh form. For the
# exact (erf) GELU that is an approximation: used in half precision only, where the two differ far
# less than the rounding (docs/performance.md, "GELU inside the product"); --exact-gelu turns it off.
_EPILOGUE_GELUS = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh"})
_HALF = (torch.bfloat16, torch.float16)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.attn_out = nn.Linear(cfg.dim, cfg.dim)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_in = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.act = _ACTIVATIONS[cfg.activation]
        self.gelu_in_product = cfg.activation in _EPILOGUE_GELUS

    def forward(
        self,
        x: torch.Tensor,
        batch: PackedBatch,
        bias: torch.Tensor | None,
        rows: torch.Tensor | None = None,  # keep only these tokens' outputs
    ) -> torch.Tensor:
        t, h, d = x.shape[0], self.cfg.n_heads, self.cfg.head_dim
        q, k, v = cpu_fusion.linear(x, self.qkv).view(t, 3, h, d).unbind(1)  # each [T, H, d]
        attn = packed_attention(q, k, v, batch, causal=False, bias=bias, query_rows=rows)
        return self.attention_output_and_mlp(x if rows is None else x[rows], attn)

    def attention_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if x.is_cpu:
            return self._fused_output_and_mlp(x, attn)
        attn_norm, ffn_norm, eps = self.attn_norm, self.ffn_norm, self.cfg.norm_eps
        x = self.add_norm(
            x, self.attn_out(attn.reshape(x.shape[0], -1)), attn_norm.weight, attn_norm.bias, eps
        )
        return self.add_norm(x, self.ffn_out(self.mlp_hidden(x)), ffn_norm.weight, ffn_norm.bias, eps)

    def mlp_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """activation(ffn_in(x)) on a GPU: in half precision with a GELU, inside the product."""
        ffn_in = self.ffn_in
        plain = type(ffn_in) is nn.Linear and ffn_in.bias is not None  # not FP8's
        if self.gelu_in_product and plain and x.dtype in _HALF:
            return torch._addmm_activation(ffn_in.bias, x, ffn_in.weight.t(), use_gelu=True)
        return self.act(ffn_in(x))

    def _fused_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The same on a CPU, with the residual adds inside the products (and in bfloat16 the
        biases and GELU too)."""
        attn_norm, ffn_norm, eps = self.attn_norm, self.ffn_norm, self.cfg.norm_eps
        x = cpu_fusion.linear_residual(attn.reshape(x.shape[0], -1), self.attn_out, x)
        x = F.layer_norm(x, attn_norm.weight.shape, attn_norm.weight, attn_norm.bias, eps)
        hidden = cpu_fusion.linear_activation(x, self.ffn_in, self.cfg.activation, self.act)
        x = cpu_fusion.linear_residual(hidden, self.ffn_out, x)
        return F.layer_norm(x, ffn_norm.weight.shape, ffn_norm.weight, ffn_norm.bias, eps)

    add_norm = staticmethod(add_layer_norm)

    def compile_blocks(self) -> None:
        # Only each residual add with its LayerNorm: one fused pass instead of two. Compiling the
        # whole block made its GELU slower than eager's, and the products are cuBLAS's either
        # way (docs/performance.md, "torch.compile").
        self.add_norm = compiled_add_layer_norm()  # type: ignore[method-assign]


class Encoder(LayerStack):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = uninitialized_embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = uninitialized_embedding(cfg.max_positions, cfg.dim)
        self.type_embeddings = (
            uninitialized_embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size else None
        )
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.relative_bias = (
            uninitialized_embedding(cfg.relative_buckets, cfg.n_heads) if cfg.relative_buckets else None
        )

    # Pooling modes for which `forward` can compute the pooled tokens alone (`rows`).
    row_pooling_modes = SINGLE_TOKEN_MODES

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D]; with `rows` (one token per sequence), [B, D] of those tokens only."""
        positions = batch.position_ids.long() + self.cfg.position_offset
        x = self.tok_embeddings(batch.input_ids.long()) + self.pos_embeddings(positions)
        if self.type_embeddings is not None and batch.token_types is not None:
            x = x + self.type_embeddings(batch.token_types.long())
        elif self.type_embeddings is not None:  # single texts: token type 0 throughout
            x = x + self.type_embeddings.weight[0]
        x = self.emb_norm(x)
        bias = self._relative_bias(batch.max_seqlen, x.device)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # Only the last layer can skip tokens: every token is a key in all earlier ones.
            x = layer(x, batch, bias, rows if index == last else None)
        return x

    def _relative_bias(self, length: int, device: torch.device) -> torch.Tensor | None:
        """MPNet: a learned bias per head for each bucket of relative distance. [H, L, L]"""
        if self.relative_bias is None:
            return None
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # key minus query
        buckets = _relative_position_bucket(relative, self.cfg.relative_buckets)
        return self.relative_bias(buckets).permute(2, 0, 1)


def _relative_position_bucket(
    relative: torch.Tensor, num_buckets: int, max_distance: int = 128
) -> torch.Tensor:
    """Bidirectional log-spaced buckets: exact for small distances, logarithmic beyond."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    is_small = distance < exact
    log_ratio = torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).long()
    large = large.clamp_max(half - 1)
    return bucket + torch.where(is_small, distance, large)


def encoder_state_dict(hf: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers checkpoint (prefix already stripped) to this module's names."""
    mpnet = cfg.relative_buckets > 0
    out = {
        "tok_embeddings.weight": hf["embeddings.word_embeddings.weight"],
        "pos_embeddings.weight": hf["embeddings.position_embeddings.weight"],
        "emb_norm.weight": hf["embeddings.LayerNorm.weight"],
        "emb_norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    if cfg.type_vocab_size:
        out["type_embeddings.weight"] = hf["embeddings.token_type_embeddings.weight"]
    if mpnet:
        out["relative_bias.weight"] = hf["encoder.relative_attention_bias.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        if mpnet:
            attn = src + "attention.attn."
            names = {"q": attn + "q", "k": attn + "k", "v": attn + "v"}
            attn_out, attn_norm = attn + "o", src + "attention.LayerNorm"
        else:
            attn = src + "attention.self."
            names = {"q": attn + "query", "k": attn + "key", "v": attn + "value"}
            attn_out = src + "attention.output.dense"
            attn_norm = src + "attention.output.LayerNorm"
        for kind in ("weight", "bias"):
            out[dst + "qkv." + kind] = torch.cat([hf[f"{names[p]}.{kind}"] for p in "qkv"])
            out[f"{dst}attn_out.{kind}"] = hf[f"{attn_out}.{kind}"]
            out[f"{dst}attn_norm.{kind}"] = hf[f"{attn_norm}.{kind}"]
            out[f"{dst}ffn_in.{kind}"] = hf[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}ffn_out.{kind}"] = hf[f"{src}output.dense.{kind}"]
            out[f"{dst}ffn_norm.{kind}"] = hf[f"{src}output.LayerNorm.{kind}"]
    return out


def keep_gelu_exact(module: nn.Module) -> int:
    """--exact-gelu: every encoder layer in `module` runs its GELU as a kernel of its own, exact;
    returns how many layers had taken it inside the product."""
    layers = [m for m in module.modules() if isinstance(m, EncoderLayer) and m.gelu_in_product]
    for layer in layers:
        layer.gelu_in_product = False
    return len(layers)
