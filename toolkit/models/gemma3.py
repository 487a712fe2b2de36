"""Gemma3 text models (EmbeddingGemma) over packed tokens.

Pre- and post-norms around both attention and the MLP (four RMSNorms per layer, each scaling by
1 + weight), embeddings scaled by sqrt(hidden size), query and key norms, scores scaled by
`query_pre_attn_scalar`, a tanh-GELU gated MLP, and rotary positions with one theta for global
layers and another for sliding-window ones. Attention is causal unless the config says
`use_bidirectional_attention` (EmbeddingGemma). Shapes: T packed tokens, D hidden.
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
    run_windowed_layers,
    uninitialized_embedding,
)
from toolkit.models.packed_batch import PackedBatch


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    attention_bias: bool
    global_layers: tuple[bool, ...]
    window: int  # a sliding layer's largest distance between a query and its keys
    global_theta: float
    local_theta: float
    scale: float
    causal: bool

    @property
    def max_input_tokens(self) -> int:
        return self.max_positions

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma3Config:
        layers = hf["num_hidden_layers"]
        types = hf.get("layer_types") or [
            "full_attention"
            if (i + 1) % int(hf.get("sliding_window_pattern", 6)) == 0
            else "sliding_attention"
            for i in range(layers)
        ]
        if hf.get("attn_logit_softcapping") is not None:
            raise ModelLoadError("Gemma3 with attention logit soft-capping is not implemented")
        causal = not hf.get("use_bidirectional_attention", False)
        # A causal sliding layer sees the `sliding_window` - 1 tokens before; a bidirectional
        # one as far on each side as transformers' config makes it: half the saved window.
        sliding = int(hf.get("sliding_window", 512))
        if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ModelLoadError(f"Gemma3 with activation {hf['hidden_activation']!r} is not implemented")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=layers,
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=bool(hf.get("attention_bias", False)),
            global_layers=tuple(kind == "full_attention" for kind in types),
            window=sliding - 1 if causal else sliding // 2,
            global_theta=_theta(hf, "full_attention", "rope_theta", 1_000_000.0),
            local_theta=_theta(hf, "sliding_attention", "rope_local_base_freq", 10_000.0),
            scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
            causal=causal,
        )


def _theta(hf: dict[str, Any], kind: str, legacy: str, default: float) -> float:
    """A layer kind's rope theta: transformers 5's `rope_parameters`, else the older keys."""
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ModelLoadError("Gemma3 with rope scaling is not implemented")
    return float(params.get("rope_theta", hf.get(legacy, default)))


class Gemma3Layer(SplitLayer):
    def __init__(self, cfg: Gemma3Config, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = None if cfg.global_layers[index] else cfg.window
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, unit_offset=True)
        self.qkv = nn.Linear(cfg.dim, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, unit_offset=True)
        self.attn_out = nn.Linear(q_size, cfg.dim, bias=cfg.attention_bias)
        self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, unit_offset=True)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, unit_offset=True)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, unit_offset=True)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, rows: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.cfg
        return packed_attention(
            q, k, v, batch, causal=cfg.causal, window=self.window, scale=cfg.scale, query_rows=rows
        )

    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, t = self.cfg, x.shape[0]
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.view(t, cfg.n_heads, cfg.head_dim))
        k = self.k_norm(k.view(t, cfg.n_kv_heads, cfg.head_dim))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.view(t, cfg.n_kv_heads, cfg.head_dim)

    def attention_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn_out(attn.reshape(attn.shape[0], -1)))
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.post_ffn_norm(self.down(F.gelu(gate, approximate="tanh") * up))


class Gemma3(LayerStack):
    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = uninitialized_embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Gemma3Layer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, unit_offset=True)

    @property
    def row_pooling_modes(self) -> frozenset[str]:
        """Where the last layer is global: CLS or last token alone when bidirectional, the last
        token when causal; a sliding last layer computes every token."""
        if not self.cfg.global_layers[-1]:
            return frozenset()
        return frozenset({"lasttoken"}) if self.cfg.causal else SINGLE_TOKEN_MODES

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D]; with `rows` (one token per sequence), [B, D] of those tokens only."""
        x = self.tok_embeddings(batch.input_ids.long())
        # Scaled by sqrt(D) rounded to the weights' dtype, as transformers scales them.
        x = x * torch.tensor(self.cfg.dim**0.5).to(x.dtype)
        thetas = (self.cfg.global_theta, self.cfg.local_theta)
        x = run_windowed_layers(x, batch, self.layers, self.cfg.head_dim, thetas, rows)  # type: ignore[arg-type]
        return self.norm(x)


def gemma3_state_dict(hf: dict[str, torch.Tensor], cfg: Gemma3Config) -> dict[str, torch.Tensor]:
    """Rename a transformers checkpoint (prefix already stripped) to this module's names."""
    out = {"tok_embeddings.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    norms = {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffn_norm": "post_feedforward_layernorm",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
    }
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out |= {f"{dst}{ours}.weight": hf[f"{src}{theirs}.weight"] for ours, theirs in norms.items()}
        out[dst + "qkv.weight"] = torch.cat([hf[f"{attn}{p}_proj.weight"] for p in "qkv"])
        if cfg.attention_bias:
            out[dst + "qkv.bias"] = torch.cat([hf[f"{attn}{p}_proj.bias"] for p in "qkv"])
            out[dst + "attn_out.bias"] = hf[attn + "o_proj.bias"]
        out[dst + "attn_out.weight"] = hf[attn + "o_proj.weight"]
        out[dst + "gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        out[dst + "down.weight"] = hf[mlp + "down_proj.weight"]
    return out
