"""Server configuration: one dataclass, built once from the command line and the environment.

Every flag has an environment variable, `TOOLKIT_` and its name in capitals (`--max-batch-tokens`:
`TOOLKIT_MAX_BATCH_TOKENS`); a flag on the command line wins over its variable. `--help` shows
each flag's default and variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.environment import LISTEN_FD_ENV
from toolkit.service.model_files import ModelFiles, read_model_files
from toolkit.service.model_spec import POOLING_MODES, EmbeddingSpec
from toolkit.service.validation import RequestLimits
from toolkit.version import __version__


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = None
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    is_embedding: bool = True
    dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    log_level: str = "info"
    max_batch_tokens: int | None = None
    max_queued_tokens: int = 1_048_576
    max_queued_inputs: int = 65_536
    max_inputs_per_request: int = 2048
    max_tokens_per_request: int = 300_000
    request_timeout: float | None = None
    max_request_bytes: int = 128 * 1024 * 1024
    max_connections: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    drain_timeout: float = 30.0
    cors_allow_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    pooling: str | None = None
    normalize: bool | None = None
    default_prompt_name: str | None = None
    truncate: bool = False
    truncation_side: str = "right"
    warmup: bool = True
    compile: bool | None = None
    cuda_graphs: bool = True
    http_workers: int = 0
    cpu_workers: int | None = None
    listen_fd: int | None = None

    @property
    def model_name(self) -> str:
        """The id clients must send as `model` (and that /v1/models lists)."""
        return self.served_model_name or self.model_path or DEFAULT_MODEL_NAME

    @classmethod
    def from_cli(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerArgs:
        """Parse the command line; `environ` (default os.environ) is the only environment read."""
        environ = os.environ if environ is None else environ
        namespace = build_parser(environ).parse_args(argv)
        values = vars(namespace)
        fd = environ.get(LISTEN_FD_ENV)
        values["listen_fd"] = int(fd) if fd and fd.isdigit() else None
        if values["api_key_file"] is not None:
            values["api_key"] = _read_key(values["api_key"], values["api_key_file"])
        return cls(**values)

    def model_files(self) -> ModelFiles:
        """Find the model and read its spec and tokenizer, with this server's overrides."""
        return read_model_files(self.model_path, self.tokenizer_path, self.pooling, self.normalize)

    def request_limits(self, spec: EmbeddingSpec, context_length: int, vocab_size: int) -> RequestLimits:
        """What the service enforces per request, for a model of `context_length` positions and
        `vocab_size` token ids."""
        return RequestLimits(
            context_length=context_length,
            vocab_size=vocab_size,
            max_inputs_per_request=self.max_inputs_per_request,
            truncate=self.truncate,
            truncation_side=self.truncation_side,
            default_prompt_name=self.default_prompt_name or spec.default_prompt_name,
            max_tokens_per_request=self.max_tokens_per_request,
            request_timeout=self.request_timeout,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def banner(self) -> str:
        """The start-up line: what is served where, and the settings changed from the defaults."""
        changed = [
            f"{field.name}={'***' if field.name == 'api_key' else getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name not in ("model_path", "host", "port", "listen_fd")
            and getattr(self, field.name) != field.default
        ]
        settings = f"; settings: {', '.join(changed)}" if changed else ""
        return f"toolkit {__version__} starting: {self.model_name} at {self.url}{settings}"

    def describe(self) -> str:
        """`ServerArgs(...)` with the api key masked, for the one start-up log line."""
        shown = dataclasses.replace(self, api_key="***" if self.api_key else None)
        return repr(shown)


DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _read_key(given: str | None, path: str) -> str:
    if given is not None:
        raise SystemExit("error: pass the api key with --api-key or --api-key-file, not both")
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read --api-key-file {path}: {exc.strerror}") from None
    if not key:
        raise SystemExit(f"error: --api-key-file {path} is empty")
    return key


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
        help="accepted for compatibility with SGLang: this server only serves embeddings",
    )
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations; auto: bfloat16 on CUDA, float32 (exact) on a CPU",
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
        help="token budget of a batch (32768 on CUDA, 8192 on a CPU unless set)",
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
        "--cpu-workers",
        type=_positive_int,
        default=None,
        help="on a CPU, run N batches at once, each on its share of the cores (default: 2 on a "
        "2-core machine, else 1: more serve more at load, but a lone input that cannot be split "
        "runs on one worker's share); ignored on CUDA",
    )
