"""Cross-encoders: an encoder read at its first token, then a classification head. BERT's pooler
with its classifier and RoBERTa's classification head are the same steps (a dense layer, tanh, a
projection to the labels), so one module serves both."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.encoder import Encoder
from toolkit.models.packed_batch import PackedBatch


class PairClassifier(nn.Module):
    """Logits [B, labels] of each sequence, from its first token's final state."""

    row_pooling_modes = frozenset({"cls"})

    def __init__(self, encoder: Encoder, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.dense = nn.Linear(encoder.cfg.dim, encoder.cfg.dim)
        self.out = nn.Linear(encoder.cfg.dim, labels)

    def compile_blocks(self) -> None:
        self.encoder.compile_blocks()

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            raise ValueError("a cross-encoder reads each sequence's first token: pass its rows")
        return self.out(torch.tanh(self.dense(self.encoder(batch, rows))))


def head_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors, named as transformers' BERT (pooler, classifier) or RoBERTa
    (classifier.dense, classifier.out_proj) checkpoints name them."""
    names = {
        ("dense", "pooler.dense"): ("out", "classifier"),
        ("dense", "classifier.dense"): ("out", "classifier.out_proj"),
    }
    for (dense, dense_name), (out, out_name) in names.items():
        found = {_ending(weights, f"{dense_name}.{kind}") for kind in ("weight", "bias")}
        if None in found:
            continue
        state = {}
        for kind in ("weight", "bias"):
            state[f"{dense}.{kind}"] = weights[_ending(weights, f"{dense_name}.{kind}") or ""]
            key = _ending(weights, f"{out_name}.{kind}")
            if key is None:
                raise ModelLoadError(f"the classifier checkpoint has no '{out_name}.{kind}'")
            state[f"{out}.{kind}"] = weights[key]
        return state
    raise ModelLoadError("no classification head (pooler and classifier) in this checkpoint")


def _ending(weights: dict[str, torch.Tensor], name: str) -> str | None:
    """The checkpoint's key for `name`, under whatever prefix ("bert.", "roberta.", none)."""
    return next((key for key in weights if key == name or key.endswith("." + name)), None)
