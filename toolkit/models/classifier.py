"""Cross-encoders: an encoder read at its first token, then a classification head. BERT's pooler
with its classifier and RoBERTa's classification head are the same steps (a dense layer, tanh, a
projection to the labels), so one module serves both. Decoder rerankers: a causal LM read at its
last token, through the rows of its LM head for the tokens it scores."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.encoder import Encoder
from toolkit.models.packed_batch import PackedBatch

# The attribute under which a head holds the model it reads (its tensors' prefix).
BODY = "body"


class PairClassifier(nn.Module):
    """Logits [B, labels] of each sequence, from its first token's final state."""

    row_pooling_modes = frozenset({"cls"})

    def __init__(self, body: Encoder, labels: int) -> None:
        super().__init__()
        self.body = body
        self.dense = nn.Linear(body.cfg.dim, body.cfg.dim)
        self.out = nn.Linear(body.cfg.dim, labels)

    def compile_blocks(self) -> None:
        self.body.compile_blocks()

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            raise ValueError("a cross-encoder reads each sequence's first token: pass its rows")
        return self.out(torch.tanh(self.dense(self.body(batch, rows))))


class TokenScorer(nn.Module):
    """[B, 1]: logit(true) - logit(false) at each sequence's last token, or logit(true) alone,
    as sentence-transformers' LogitScore reads a causal LM."""

    row_pooling_modes = frozenset({"lasttoken"})

    def __init__(self, body: nn.Module, tokens: int) -> None:
        super().__init__()
        self.body = body
        self.rows = nn.Linear(body.cfg.dim, tokens, bias=False)  # the LM head's rows of those tokens

    def compile_blocks(self) -> None:
        self.body.compile_blocks()

    def forward(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            raise ValueError("a decoder reranker reads each sequence's last token: pass its rows")
        logits = self.rows(self.body(batch, rows))
        return logits[:, :1] - logits[:, 1:] if logits.shape[1] == 2 else logits


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
