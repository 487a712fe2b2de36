"""toolkit: a Jupyter-first toolkit around a self-hosted, OpenAI-compatible embedding server.

The notebook helpers live in `toolkit.utils`; the server is `python -m toolkit.launch_server`.
Importing this package imports neither torch nor the server.
"""

from __future__ import annotations

__version__ = "0.1.0"
