"""The server's command line: every flag, with its help, its default and its environment variable
(`TOOLKIT_` and its name in capitals), which a flag on the command line overrides."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from toolkit.service.model_spec import POOLING_MODES
from toolkit.version import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text}") from None


def _origins(text: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in text.split(",") if origin.strip())


ENV_PREFIX = "TOOLKIT_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.launch_server",
        description="Serve an embedding model over an OpenAI-compatible HTTP API. Every flag can "
        "also be set by its environment variable; the command line wins.",
    )
    parser.add_argument("--version", action="version", version=f"toolkit {__version__}")
    add = _FlagAdder(parser, os.environ if environ is None else environ)
    _model_flags(add)
    _http_flags(add)
    _limit_flags(add)
    _connection_flags(add)
    _parallel_flags(add)
    _performance_flags(add)
    return parser


class _FlagAdder:
    """Adds a flag whose help ends with its default and environment variable, and whose default
    is that variable's value when it is set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def __call__(self, *names: str, **options: Any) -> None:
        dest = options.get("dest") or names[0].lstrip("-").replace("-", "_")
        variable = ENV_PREFIX + dest.upper()
        if variable in self.environ:
            options["default"] = self._from_environment(variable, self.environ[variable], options)
        default = options.get("default")
        shown = "" if default in (None, False, ()) else f" [default: {_shown(default)}]"
        options["help"] = f"{options.get('help', '')}{shown} [env: {variable}]".strip()
        self.parser.add_argument(*names, **options)

    def _from_environment(self, variable: str, text: str, options: dict[str, Any]) -> Any:
        action = options.get("action")
        if action in ("store_true", "store_false", argparse.BooleanOptionalAction):
            if text.lower() not in _TRUE | _FALSE:
                self.parser.error(f"{variable}={text!r}: expected one of {sorted(_TRUE | _FALSE)}")
            return text.lower() in _TRUE
        try:
            value = options.get("type", str)(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            self.parser.error(f"{variable}={text!r}: {exc}")
        if "choices" in options and value not in options["choices"]:
            self.parser.error(f"{variable}={text!r}: expected one of {list(options['choices'])}")
        return value


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _model_flags(add: _FlagAdder) -> None:
    add("--model-path", help="local directory or Hugging Face id; default: bundled all-MiniLM-L6-v2")
    add("--tokenizer-path", help="tokenizer directory when it differs from the model's")
    add("--served-model-name", help="the `model` id clients send (default: --model-path)")
    add(
        "--is-embedding",
        action="store_true",
        default=True,
        help="accepted for compatibility with SGLang: the model's files say whether it embeds or reranks",
    )
    add(
        "--is-reranker",
        action="store_true",
        default=False,
        help="refuse to start unless the model is a cross-encoder (a *ForSequenceClassification config)",
    )
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations; auto: bfloat16 on CUDA, float32 (exact) on a CPU",
    )
    add(
        "--quantization",
        default="none",
        choices=["none", "fp8"],
        help="fp8: float8 weights and activations in the layers' products (Hopper or Ada GPUs only)",
    )
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees it")
    add("--context-length", type=_positive_int, help="max tokens per input (default: the model's)")
    add("--pooling", choices=POOLING_MODES, help="override the model's pooling")
    add(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override whether embeddings are scaled to unit length (default: as the model says)",
    )
    add("--default-prompt-name", help="a key of the model's prompts applied when none is asked")
    add(
        "--truncate",
        action="store_true",
        help="truncate over-long inputs instead of rejecting them (per request: `truncate`)",
    )
    add(
        "--truncation-side",
        default="right",
        choices=["left", "right"],
        help="which end of an over-long input truncation cuts (per request: `truncation_side`)",
    )


def _http_flags(add: _FlagAdder) -> None:
    add("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for every interface")
    add("--port", type=int, default=30000, help="TCP port to listen on")
    add(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every route but /health (visible in the "
        "process list: prefer --api-key-file or the variable)",
    )
    add("--api-key-file", help="read the api key from this file (its first line, UTF-8)")
    add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug adds each batch and the readiness polls",
    )
    add(
        "--drain-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds that SIGTERM waits for admitted requests to finish before exiting",
    )
    add(
        "--cors-allow-origins",
        type=_origins,
        default=(),
        help="comma-separated origins that browsers may call from ('*' for any); default: CORS off",
    )
    add(
        "--allowed-hosts",
        type=_origins,
        default=(),
        help="comma-separated host names clients may address the server by, beyond the loopback "
        "names and --host ('*' for any; on 0.0.0.0 any is allowed)",
    )
    add(
        "--http-workers",
        type=_non_negative_int,
        default=0,
        help="serve HTTP from N processes of their own that send token ids to this one (for small "
        "models on fast GPUs, where one process's HTTP work limits throughput); default 0: "
        "HTTP in this process",
    )


def _limit_flags(add: _FlagAdder) -> None:
    add(
        "--max-batch-tokens",
        type=_positive_int,
        help="token budget of a batch (32768 on CUDA; on a CPU 2048 for workers of one core, else 8192)",
    )
    add(
        "--max-queued-tokens",
        type=_positive_int,
        default=1_048_576,
        help="tokens waiting at most; beyond it requests get 429",
    )
    add(
        "--max-queued-inputs",
        type=_positive_int,
        default=65_536,
        help="inputs waiting at most; beyond it requests get 429",
    )
    add(
        "--max-inputs-per-request",
        type=_positive_int,
        default=2048,
        help="texts or token-id lists in one request; beyond it 400",
    )
    add(
        "--max-tokens-per-request",
        type=_positive_int,
        default=300_000,
        help="tokens of all inputs of one request together, as OpenAI caps them; beyond it 400",
    )
    add(
        "--max-request-bytes",
        type=_positive_int,
        default=128 * 1024 * 1024,
        help="request bodies larger than this get 413",
    )


def _connection_flags(add: _FlagAdder) -> None:
    add(
        "--request-timeout",
        type=_positive_float,
        help="seconds a request may take from its body to its answer; then 504, and its queued "
        "work is withdrawn (default: none)",
    )
    add(
        "--header-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds a connection has to send a request's headers (from connecting or its last "
        "answer) before it is closed",
    )
    add(
        "--body-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds a request's body may take to arrive after its headers before the connection is closed",
    )
    add(
        "--max-connections",
        type=_positive_int,
        help="open connections at most; more are closed at once (unless set: the descriptor limit, "
        "raised to its hard limit, less 256)",
    )


def _parallel_flags(add: _FlagAdder) -> None:
    add(
        "--dp-size",
        type=_positive_int,
        default=1,
        help="data parallel: N engine processes, one per GPU (on a CPU, sharing the cores), behind "
        "the HTTP front ends; each request goes to the engine with the fewest tokens waiting",
    )
    add(
        "--device-ids",
        type=_ids,
        default=(),
        help="comma-separated GPU ids for the --dp-size engines (default: 0..N-1)",
    )


def _performance_flags(add: _FlagAdder) -> None:
    add("--no-warmup", dest="warmup", action="store_false", help="skip the start-up warm-up")
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse the model's elementwise work with torch.compile "
        "(default: on for CUDA; encoders only with CUDA graphs)",
    )
    add(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay CUDA graphs of recurring batch shapes, padded to buckets (CUDA only)",
    )
    add(
        "--exact-gelu",
        action="store_true",
        help="on a GPU in bfloat16 or float16, run an encoder's exact GELU as a kernel of its own "
        "(by default cuBLASLt applies GELU inside the first MLP product, in its tanh form: 3-11 %% "
        "more tokens/s for BERT-base at 128 clients on an H100, the same fidelity to float32)",
    )
    add(
        "--cpu-workers",
        type=_positive_int,
        default=None,
        help="on a CPU, run N batches at once, each on its share of the cores (default: 2 on a "
        "2-core machine, else 1: more serve more at load, but a lone input that cannot be split "
        "runs on one worker's share); ignored on CUDA",
    )
