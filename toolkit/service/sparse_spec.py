"""What a sentence-transformers SparseEncoder folder asks for: SPLADE (a fill-mask Transformer, then
SpladePooling), or an inference-free model whose `Router` sends queries to a SparseStaticEmbedding
(one weight per vocabulary entry) and documents to SPLADE.

Torch-free, like the rest of the spec: the request side runs the static query route itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ModelLoadError
from toolkit.service.model_json import class_name, json_dict, saved_model_max_length

SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")
ROUTES = ("query", "document")


@dataclass(frozen=True)
class SparseSpec:
    """`pooling` and `activation` are SpladePooling's; `query_dir` holds the SparseStaticEmbedding
    of an inference-free model's query route (None: every input runs SPLADE), which truncates at
    `query_max_length`; `default_route` serves inputs that name no route."""

    pooling: str = "max"
    activation: str = "relu"
    query_dir: Path | None = None
    query_max_length: int | None = None
    default_route: str = "document"
    max_active_dims: int | None = None


def read_sparse_spec(
    model_dir: Path, modules: list[dict[str, Any]], st_cfg: dict[str, Any]
) -> tuple[Path, SparseSpec]:
    """The SPLADE Transformer's folder and the sparse spec of a SparseEncoder folder."""
    kinds = [class_name(module.get("type", "")) for module in modules]
    max_active_dims = st_cfg.get("max_active_dims")
    if not (isinstance(max_active_dims, int) and max_active_dims > 0):
        max_active_dims = None
    if kinds == ["Router"]:
        return _routed(model_dir / str(modules[0].get("path", "")), max_active_dims)
    transformer, pooling = _splade_chain(
        model_dir, [(kind, str(m.get("path", ""))) for kind, m in zip(kinds, modules, strict=True)]
    )
    return transformer, _splade(pooling, max_active_dims=max_active_dims)


def _splade_chain(root: Path, chain: list[tuple[str, str]]) -> tuple[Path, Path]:
    """The Transformer and SpladePooling folders of a chain that is exactly those two."""
    if [kind for kind, _ in chain] not in (
        ["Transformer", "SpladePooling"],
        ["MLMTransformer", "SpladePooling"],
    ):
        raise ModelLoadError(
            f"unsupported sparse modules in {root}: {[kind for kind, _ in chain]}; served: a "
            "fill-mask Transformer then SpladePooling, or a Router to SparseStaticEmbedding and SPLADE"
        )
    return root / chain[0][1], root / chain[1][1]


def _splade(pooling_dir: Path, **fields: Any) -> SparseSpec:
    cfg = json_dict(pooling_dir / "config.json", required=True)
    pooling = cfg.get("pooling_strategy", "max")
    activation = cfg.get("activation_function", "relu")
    if pooling not in SPLADE_POOLING or activation not in SPLADE_ACTIVATIONS:
        raise ModelLoadError(
            f"unsupported SpladePooling in {pooling_dir}: pooling {pooling!r}, activation "
            f"{activation!r}; known: {SPLADE_POOLING}, {SPLADE_ACTIVATIONS}"
        )
    return SparseSpec(pooling=pooling, activation=activation, **fields)


def _routed(router_dir: Path, max_active_dims: int | None) -> tuple[Path, SparseSpec]:
    """An inference-free model: queries through SparseStaticEmbedding, documents through SPLADE."""
    cfg = json_dict(router_dir / "router_config.json", required=True)
    types, structure = cfg.get("types") or {}, cfg.get("structure") or {}
    routes = {
        route: [(class_name(types.get(name, "")), name) for name in names]
        for route, names in structure.items()
    }
    if sorted(routes) != sorted(ROUTES) or [kind for kind, _ in routes["query"]] != ["SparseStaticEmbedding"]:
        shown = {route: [kind for kind, _ in chain] for route, chain in routes.items()}
        raise ModelLoadError(
            f"unsupported Router in {router_dir}: {shown}; served: a query route of one "
            "SparseStaticEmbedding and a document route of a fill-mask Transformer and SpladePooling"
        )
    transformer, pooling = _splade_chain(router_dir, routes["document"])
    query_dir = router_dir / routes["query"][0][1]
    default_route = (cfg.get("parameters") or {}).get("default_route") or "document"
    if default_route not in ROUTES:
        raise ModelLoadError(f"unknown default_route {default_route!r} in {router_dir}")
    return transformer, _splade(
        pooling,
        query_dir=query_dir,
        query_max_length=saved_model_max_length(query_dir, required=True),
        default_route=default_route,
        max_active_dims=max_active_dims,
    )
