"""Whether a server is ready: it lists a model and embeds with it, or ranks with it for a
cross-encoder (behind `wait_for_server`).
Standard library and requests only, like the notebook helpers."""

from __future__ import annotations

import requests

_CONNECT_TIMEOUT_S = 2.0
# A held port queues connections before the server accepts any, so the cheap GET can block while
# the model loads; re-checking the process every few seconds keeps a crash from going unnoticed.
_MODELS_READ_TIMEOUT_S = 5.0


def probe(session: requests.Session, base_url: str, remaining: float | None, has_key: bool) -> str | None:
    """None when the server embeds; otherwise why not yet. Raises on a refused api key."""

    def timeout(read_s: float | None) -> tuple[float, float | None]:
        if remaining is None:
            return _CONNECT_TIMEOUT_S, read_s
        bound = max(remaining, 0.01)
        return min(_CONNECT_TIMEOUT_S, bound), bound if read_s is None else min(read_s, bound)

    try:
        with session.get(f"{base_url}/v1/models", timeout=timeout(_MODELS_READ_TIMEOUT_S)) as r:
            _refuse_bad_key(r, base_url, has_key)
            if r.status_code != 200:
                return f"GET /v1/models answered {r.status_code}"
            model, task = _first_model(r)
        if model is None:
            return "GET /v1/models listed no model"
        path, body = "/v1/embeddings", {"model": model, "input": "warm up"}
        if task == "rerank":
            path, body = "/v1/rerank", {"model": model, "query": "warm up", "documents": ["warm up"]}
        with session.post(base_url + path, json=body, timeout=timeout(None)) as r:
            _refuse_bad_key(r, base_url, has_key)
            if r.status_code != 200:
                return f"POST {path} answered {r.status_code}"
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _refuse_bad_key(response: requests.Response, base_url: str, has_key: bool) -> None:
    if response.status_code not in (401, 403):
        return
    if has_key:
        raise RuntimeError(
            f"Server at {base_url} rejected the api key ({response.status_code}); "
            "pass the key the server was started with (--api-key)."
        )
    raise RuntimeError(
        f"Server at {base_url} needs an api key ({response.status_code}); "
        "pass wait_for_server(..., api_key=...)."
    )


def _first_model(response: requests.Response) -> tuple[str | None, str | None]:
    """The first listed model's id and task ("embed", "rerank"; None before it has loaded)."""
    try:
        card = response.json()["data"][0]
        model, task = card["id"], card.get("task")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None
    return (model if isinstance(model, str) else None), (task if isinstance(task, str) else None)
