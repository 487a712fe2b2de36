"""ModernBERT (gte-modernbert, modernbert-embed, Alibaba's and Nomic's embedders) over packed tokens.

A pre-LayerNorm bidirectional encoder without position embeddings: rotary positions with one theta
for global layers and another for local ones, local layers attending within a window (every third
layer global by default), a GeGLU MLP, no biases by default, a final norm. Layer 0 has no
attention norm (the embeddings' norm precedes it). Shapes: T packed tokens, D hidden, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.attention import packed_attention
from toolkit.models.base import SINGLE_TOKEN_MODES
from toolkit.models.layers import (
    LayerStack,
    SplitLayer,
    apply_rotary,
    gelu_,
    run_windowed_layers,
    uninitialized_embedding,
)
from toolkit.models.packed_batch import PackedBatch


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    global_layers: tuple[bool, ...]
    window: int  # a local layer's largest distance between a query and its keys
    global_theta: float
    local_theta: float

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_input_tokens(self) -> int:
        return self.max_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModernBertConfig:
        layers = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if not types:  # the configs on the Hub: a global layer every n
            every = int(hf.get("global_attn_every_n_layers", 3))
            types = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(layers)]
        if hf.get("hidden_activation", "gelu") != "gelu":
            raise ModelLoadError(f"ModernBERT with activation {hf['hidden_activation']!r} is not implemented")
        rope = hf.get("rope_parameters") or {}
        if any((rope.get(kind) or {}).get("rope_type", "default") != "default" for kind in rope):
            raise ModelLoadError("ModernBERT with rope scaling is not implemented")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=layers,
            n_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 8192),
            norm_eps=hf.get("norm_eps", 1e-5),
            norm_bias=bool(hf.get("norm_bias", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            global_layers=tuple(kind == "full_attention" for kind in types),
            window=int(hf.get("local_attention", 128)) // 2,
            global_theta=float(
                (rope.get("full_attention") or {}).get("rope_theta", hf.get("global_rope_theta", 160000.0))
            ),
            local_theta=float(
                (rope.get("sliding_attention") or {}).get("rope_theta", hf.get("local_rope_theta", 10000.0))
            ),
        )


class ModernBertLayer(SplitLayer):
    def __init__(self, cfg: ModernBertConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = None if cfg.global_layers[index] else cfg.window
        norm = {"eps": cfg.norm_eps, "bias": cfg.norm_bias}
        self.attn_norm = nn.LayerNorm(cfg.dim, **norm) if index else None
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.attention_bias)
        self.attn_out = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)
        self.mlp_norm = nn.LayerNorm(cfg.dim, **norm)
        self.ffn_in = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, rows: torch.Tensor | None
    ) -> torch.Tensor:
        return packed_attention(q, k, v, batch, causal=False, window=self.window, query_rows=rows)

    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, t = self.cfg, x.shape[0]
        h = x if self.attn_norm is None else self.attn_norm(x)
        q, k, v = self.qkv(h).view(t, 3, cfg.n_heads, cfg.head_dim).unbind(1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attention_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out(attn.reshape(attn.shape[0], -1))
        gated, gate = self.ffn_in(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.ffn_out(gelu_(gated.contiguous()) * gate)


class ModernBert(LayerStack):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = uninitialized_embedding(cfg.vocab_size, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)

    @property
    def row_pooling_modes(self) -> frozenset[str]:
        """CLS or last token alone, where the last layer is global (a local one computes all)."""
        return SINGLE_TOKEN_MODES if self.cfg.global_layers[-1] else frozenset()

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D]; with `rows` (one token per sequence), [B, D] of those tokens only."""
        x = self.emb_norm(self.tok_embeddings(batch.input_ids.long()))
        thetas = (self.cfg.global_theta, self.cfg.local_theta)
        x = run_windowed_layers(x, batch, self.layers, self.cfg.head_dim, thetas, rows)  # type: ignore[arg-type]
        return self.final_norm(x)


def modernbert_state_dict(hf: dict[str, torch.Tensor], cfg: ModernBertConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers checkpoint (prefix already stripped) to this module's names."""
    names = {
        "tok_embeddings.weight": "embeddings.tok_embeddings.weight",
        "emb_norm.weight": "embeddings.norm.weight",
        "final_norm.weight": "final_norm.weight",
    }
    for i in range(cfg.n_layers):
        layer = {"qkv": "attn.Wqkv", "attn_out": "attn.Wo", "mlp_norm": "mlp_norm", "ffn_in": "mlp.Wi"}
        layer |= {"ffn_out": "mlp.Wo"} | ({"attn_norm": "attn_norm"} if i else {})
        names |= {
            f"layers.{i}.{ours}.weight": f"layers.{i}.{theirs}.weight" for ours, theirs in layer.items()
        }
    names |= {
        ours.replace(".weight", ".bias"): theirs.replace(".weight", ".bias")
        for ours, theirs in names.items()
        if "embeddings" not in ours
    }
    return {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf}
