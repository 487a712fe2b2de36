"""JSON responses rendered by orjson, with numpy support."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response


class JSONResponse(Response):
    """float32 vectors serialize as their shortest exact decimal form, straight from numpy."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
