"""toolkit: a Jupyter-first toolkit around a self-hosted, OpenAI-compatible embedding server.

- `toolkit.Engine`: embed in-process, without a server (`Engine(model_path).encode(texts)`).
- `toolkit.utils`: the notebook helpers that start, wait for and stop a server.
- `python -m toolkit.launch_server`: the server.

Importing this package imports neither torch nor the server; `toolkit.Engine` imports them on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.process.embedded import Engine

from toolkit.version import __version__

__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from toolkit.process.embedded import Engine  # on first use only: it imports torch

        return Engine
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
