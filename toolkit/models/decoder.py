"""Decoder-only transformers used as embedders, over packed tokens: Llama, Mistral, Qwen2, Qwen3.

Pre-RMSNorm blocks with rotary positions, grouped-query attention and a SwiGLU MLP. Attention is
causal unless the checkpoint's config says `is_causal: false` (gte-Qwen2 is trained bidirectional).
Shapes: T packed tokens, D hidden, Hq/Hkv query/key-value heads, d head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.attention import packed_attention
from toolkit.models.base import SINGLE_TOKEN_MODES
from toolkit.models.layers import (
    LayerStack,
    RMSNorm,
    SplitLayer,
    apply_rotary,
    rotary_tables,
    uninitialized_embedding,
)
from toolkit.models.packed_batch import PackedBatch


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    causal: bool

    @property
    def max_input_tokens(self) -> int:
        return self.max_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        model_type = hf["model_type"]
        n_heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ModelLoadError(f"rope scaling {rope_type!r} is not implemented")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 32768),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            causal=bool(hf.get("is_causal", True)),
        )


class DecoderLayer(SplitLayer):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_out = nn.Linear(q_size, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, rows: torch.Tensor | None
    ) -> torch.Tensor:
        return packed_attention(q, k, v, batch, causal=self.cfg.causal, query_rows=rows)

    # The two halves around attention are pure tensor code: `compile_blocks` fuses each with
    # torch.compile, which removes most of the elementwise memory traffic (norms, RoPE, SwiGLU).
    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, t = self.cfg, x.shape[0]
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, cfg.n_heads, cfg.head_dim)
        k = k.view(t, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.n_kv_heads, cfg.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attention_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out(attn.reshape(x.shape[0], -1))
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(LayerStack):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = uninitialized_embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    @property
    def row_pooling_modes(self) -> frozenset[str]:
        """Pooling modes for which `forward` can compute the pooled tokens alone (`rows`).
        Causal attention: only the last token, the one that sees its whole sequence."""
        return SINGLE_TOKEN_MODES if not self.cfg.causal else frozenset({"lasttoken"})

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D]; with `rows` (one token per sequence), [B, D] of those tokens only."""
        x = self.tok_embeddings(batch.input_ids.long())
        rope = rotary_tables(batch.position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # Only the last layer can skip tokens: every token is a key in all earlier ones.
            x = layer(x, batch, rope, rows if index == last else None)
        return self.norm(x)


def decoder_state_dict(hf: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers checkpoint (prefix already stripped) to this module's names."""
    out = {"tok_embeddings.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "qkv.weight"] = torch.cat([hf[f"{attn}{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[dst + "qkv.bias"] = torch.cat([hf[f"{attn}{p}_proj.bias"] for p in "qkv"])
        if cfg.qk_norm:
            out[dst + "q_norm.weight"] = hf[attn + "q_norm.weight"]
            out[dst + "k_norm.weight"] = hf[attn + "k_norm.weight"]
        out[dst + "attn_out.weight"] = hf[attn + "o_proj.weight"]
        mlp = src + "mlp."
        out[dst + "gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        out[dst + "down.weight"] = hf[mlp + "down_proj.weight"]
    return out
