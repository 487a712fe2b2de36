"""SPLADE: an encoder's masked-language-model head scores every vocabulary entry at every token, and
sentence-transformers' SpladePooling keeps, per sequence and entry, the max (or sum) of
log(1 + relu(score)) (twice log1p for "log1p_relu"). The [tokens, vocab] scores are made a block of
rows at a time, so memory holds one block, never the whole batch's."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.encoder import Encoder
from toolkit.models.layers import gelu_
from toolkit.models.packed_batch import PackedBatch

# Rows of the head's scores made at once: one block's [rows, vocabulary] scores are held, never a batch's.
SCORE_BLOCK_ROWS = 1024


class MaskedLMHead(nn.Module):
    """BERT's prediction head and RoBERTa's lm_head: dense, GELU, LayerNorm, then the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(gelu_(self.dense(hidden))))


class SpladeEncoder(nn.Module):
    """[B, vocab] float32 sparse vectors of a packed batch: the model pools them itself."""

    row_pooling_modes: frozenset[str] = frozenset()

    def __init__(self, body: Encoder, pooling: str, activation: str) -> None:
        super().__init__()
        self.body = body
        cfg = body.cfg
        self.head = MaskedLMHead(cfg.dim, cfg.vocab_size, cfg.norm_eps)
        self.pooling, self.activation = pooling, activation

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.body.tok_embeddings

    def compile_blocks(self) -> None:
        self.body.compile_blocks()

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.body(batch)
        # Every transformed score is ≥ 0 and padding adds none, so zeros start both max and sum.
        out = torch.zeros(batch.num_seqs, self.body.cfg.vocab_size, device=hidden.device)
        for start in range(0, hidden.shape[0], SCORE_BLOCK_ROWS):
            scores = self.head(hidden[start : start + SCORE_BLOCK_ROWS]).float().relu_().log1p_()
            if self.activation == "log1p_relu":
                scores = scores.log1p_()
            seqs = batch.seq_index[start : start + SCORE_BLOCK_ROWS].long()
            if self.pooling == "max":
                out.scatter_reduce_(0, seqs[:, None].expand_as(scores), scores, reduce="amax")
            else:
                out.index_add_(0, seqs, scores)
        return out


def mlm_head_state_dict(weights: dict[str, torch.Tensor], tied: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's tensors as BERT (cls.predictions.*) or RoBERTa/MPNet (lm_head.*) checkpoints
    name them; the decoder's weight is `tied` (the word embeddings) where the checkpoint omits it."""
    for dense, norm, decoder, bias in (
        (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder",
            "cls.predictions.bias",
        ),
        ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
    ):
        if f"{dense}.weight" not in weights:
            continue
        found = {f"{decoder}.weight": tied} | weights
        if bias not in found:
            bias = f"{decoder}.bias"
        names = {"dense": dense, "norm": norm}
        state = {
            f"head.{ours}.{kind}": f"{theirs}.{kind}"
            for ours, theirs in names.items()
            for kind in ("weight", "bias")
        }
        state |= {"head.decoder.weight": f"{decoder}.weight", "head.decoder.bias": bias}
        missing = [name for name in state.values() if name not in found]
        if missing:
            raise ModelLoadError(f"the masked-language-model head lacks {missing}")
        return {ours: found[theirs] for ours, theirs in state.items()}
    raise ModelLoadError("no masked-language-model head (cls.predictions or lm_head) in this checkpoint")
