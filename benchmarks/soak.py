"""Soak test: many concurrent clients, valid and invalid requests, for a while; does the server hold?

    python benchmarks/soak.py                       # 64 clients, 60 s, bundled MiniLM on loopback
    python benchmarks/soak.py --clients 16 --seconds 10
    python benchmarks/soak.py --attackers 0.1       # a clean run, then one with 10 % attackers

Starts a real server (toolkit.utils.launch_server_cmd, 127.0.0.1 only) and drives it with
`--clients` concurrent asyncio clients (aiohttp, one keep-alive connection each) for `--seconds`.
Each request is drawn from a fixed mix of valid requests (texts, token ids, base64, dimensions,
/encode) and invalid ones (bad JSON, empty or over-long input, unknown model or route, bad types,
wrong method), each with the statuses it may get. Prints requests, answers by status, unexpected
answers (a status not allowed for that request, a 5xx, a connection error), p50/p99 latency of the
valid requests, and the server's RSS when ready, after a warm-up, and at the end, with growth
from warm-up to end: the sign of a leak. The server logs at warning level so its access log does
not flood the terminal (`--server-args "--log-level info"` to see it).

With `--attackers F`, a second run follows the clean one on the same server, in which a fraction F
of the clients attack instead: a million nulls, a million token ids, 10 MB of text, or a socket
left idle until the server closes it. Both runs' honest clients are reported side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP_S = 5.0
RSS_EVERY_S = 5.0
OK = frozenset({200, 429})  # 429: admission refused under overload, a correct answer too


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: how to build it and which statuses are correct."""

    name: str
    weight: int
    expected: frozenset[int]
    method: str = "POST"
    path: str = "/v1/embeddings"

    def body(self, rng: random.Random) -> bytes | None:
        return _BODIES[self.name](rng)


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(low, high)))


_VOCABULARY = "the quick brown fox jumps over a lazy dog while soak tests run for a minute".split()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


_BODIES: dict[str, Any] = {
    "one-text": lambda rng: _json({"input": _words(rng, 3, 40)}),
    "text-batch": lambda rng: _json({"input": [_words(rng, 3, 60) for _ in range(rng.randint(2, 16))]}),
    "token-ids": lambda rng: _json({"input": [[101, *(rng.randrange(1000, 30000) for _ in range(20)), 102]]}),
    "base64": lambda rng: _json({"input": [_words(rng, 5, 20)] * 4, "encoding_format": "base64"}),
    "dimensions": lambda rng: _json({"input": _words(rng, 5, 20), "dimensions": 128}),
    "encode": lambda rng: _json({"text": [_words(rng, 3, 30), _words(rng, 3, 30)]}),
    "bad-json": lambda rng: b'{"input": ["unterminated',
    "empty-input": lambda rng: _json({"input": ""}),
    "over-context": lambda rng: _json({"input": "word " * 600}),
    "unknown-model": lambda rng: _json({"input": "hi", "model": "not-served"}),
    "bad-type": lambda rng: _json({"input": [1.5, "x"], "dimensions": "64"}),
    "token-out-of-vocab": lambda rng: _json({"input": [101, 10**7]}),
    "unknown-route": lambda rng: _json({"input": "hi"}),
    "wrong-method": lambda rng: None,
}

MIX = [
    Kind("one-text", 30, OK),
    Kind("text-batch", 20, OK),
    Kind("token-ids", 10, OK),
    Kind("base64", 8, OK),
    Kind("dimensions", 5, OK),
    Kind("encode", 5, OK, path="/encode"),
    Kind("bad-json", 4, frozenset({400})),
    Kind("empty-input", 4, frozenset({400})),
    Kind("over-context", 4, frozenset({400})),
    Kind("unknown-model", 3, frozenset({404})),
    Kind("bad-type", 3, frozenset({400})),
    Kind("token-out-of-vocab", 2, frozenset({400})),
    Kind("unknown-route", 1, frozenset({404}), path="/v1/nothing"),
    Kind("wrong-method", 1, frozenset({405}), method="GET"),
]


_ATTACK_BODIES: dict[str, bytes] = {}


def _attack_body(name: str) -> bytes:
    """Built once: an attacker's payload costs the attacker nothing to send again."""
    if name not in _ATTACK_BODIES:
        payloads = {
            "million-nulls": {"input": [None] * 1_000_000},
            "million-ids": {"input": [[1000] * 1_000_000]},
            "ten-mb-text": {"input": "word " * (2 * 2**20)},
        }
        _ATTACK_BODIES[name] = _json(payloads[name])
    return _ATTACK_BODIES[name]


ATTACKS = ("million-nulls", "million-ids", "ten-mb-text", "idle-socket")


@dataclass
class Tally:
    statuses: Counter[int | str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    valid_latencies: list[float] = field(default_factory=list)
    all_latencies: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="--log-level warning", help="extra server flags")
    parser.add_argument(
        "--attackers", type=float, default=0.0, help="then a second run with this fraction attacking"
    )
    return parser.parse_args()


async def client(url: str, seed: int, deadline: float, tally: Tally) -> None:
    import aiohttp

    rng = random.Random(seed)
    kinds, weights = MIX, [kind.weight for kind in MIX]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as session:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                async with session.request(
                    kind.method,
                    url + kind.path,
                    data=kind.body(rng),
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    status: int | str = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - started
            tally.statuses[status] += 1
            tally.all_latencies.append(elapsed)
            if status not in kind.expected:
                tally.unexpected[f"{kind.name} -> {status}"] += 1
            elif kind.expected is OK and status == 200:
                tally.valid_latencies.append(elapsed)


async def attacker(url: str, port: int, seed: int, deadline: float, tally: Tally) -> None:
    """Send the attacks in turn; an idle socket waits until the server closes it."""
    import aiohttp

    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as session:
        while time.monotonic() < deadline:
            name = rng.choice(ATTACKS)
            try:
                if name == "idle-socket":
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    status: int | str = "closed" if await reader.read(1) == b"" else "answered"
                    writer.close()
                else:
                    async with session.post(url + "/v1/embeddings", data=_attack_body(name)) as response:
                        await response.read()
                        status = response.status
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            tally.statuses[status] += 1
            if status not in (400, "closed"):
                tally.unexpected[f"{name} -> {status}"] += 1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def soak(
    url: str, clients: int, seconds: float, seed: int, rss: Callable[[], int], attackers: int = 0
) -> tuple[Tally, float, list[int], Tally]:
    """Run the clients (the first `attackers` of them attacking); sample the server's RSS every
    RSS_EVERY_S seconds meanwhile. Returns the honest clients' tally and the attackers'."""
    tally, attacks = Tally(), Tally()
    started = time.monotonic()
    deadline = started + seconds
    port = int(url.rsplit(":", 1)[1])
    tasks = [
        asyncio.create_task(
            attacker(url, port, seed * 10_000 + i, deadline, attacks)
            if i < attackers
            else client(url, seed * 10_000 + i, deadline, tally)
        )
        for i in range(clients)
    ]
    samples = [rss()]
    while not all(task.done() for task in tasks):
        await asyncio.wait(tasks, timeout=RSS_EVERY_S)
        samples.append(rss())
    await asyncio.gather(*tasks)
    return tally, time.monotonic() - started, samples, attacks


def main() -> int:
    args = parse_args()
    import psutil

    from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

    process, port = launch_server_cmd(
        f"python3 -m toolkit.launch_server --host 127.0.0.1 {args.server_args}", host="127.0.0.1"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=600, process=process)
        server = psutil.Process(process.pid)
        rss = lambda: server.memory_info().rss  # noqa: E731
        tally, elapsed, samples, _ = asyncio.run(soak(url, args.clients, args.seconds, args.seed, rss))
        attacked = None
        if args.attackers > 0:
            count = max(1, round(args.attackers * args.clients))
            attacked = asyncio.run(soak(url, args.clients, args.seconds, args.seed + 1, rss, count))
        alive = process.poll() is None
    finally:
        terminate_process(process)
    report(args, tally, elapsed, samples, alive, process.returncode)
    if attacked is not None:
        report_attacked(tally, *attacked)
    clean = not tally.unexpected and (
        attacked is None or (not attacked[0].unexpected and not attacked[3].unexpected)
    )
    return 0 if alive and clean and process.returncode == 0 else 1


def report_attacked(clean: Tally, tally: Tally, elapsed: float, samples: list[int], attacks: Tally) -> None:
    """The attacked run beside the clean one: the honest clients' latency and errors."""

    def line(name: str, run: Tally) -> str:
        errors = sum(n for status, n in run.statuses.items() if status not in (200, 429))
        return (
            f"{name}: p50 {1000 * percentile(run.valid_latencies, 0.5):.1f} ms, "
            f"p99 {1000 * percentile(run.valid_latencies, 0.99):.1f} ms, "
            f"{sum(run.statuses.values())} requests, unexpected {sum(run.unexpected.values())}, "
            f"errors (4xx of the invalid mix included) {errors}"
        )

    print(f"attacked run: {elapsed:.1f} s; attacks answered: {dict(attacks.statuses)}")
    print(f"attacks unexpected: {dict(attacks.unexpected)}")
    print("honest clients, " + line("clean run", clean))
    print("honest clients, " + line("attacked run", tally))
    print(f"server RSS during the attacked run (MiB): {' '.join(f'{v / 2**20:.0f}' for v in samples)}")


def report(
    args: argparse.Namespace,
    tally: Tally,
    elapsed: float,
    samples: list[int],
    alive: bool,
    exit_code: int | None,
) -> None:
    total = sum(tally.statuses.values())
    mib = [value / 2**20 for value in samples]
    warm = mib[min(len(mib) - 1, round(WARMUP_S / RSS_EVERY_S))]
    growth = 100 * (mib[-1] - warm) / warm
    statuses = dict(sorted(tally.statuses.items(), key=str))
    errors = {status: n for status, n in statuses.items() if status != 200}
    print(f"soak: {args.clients} clients for {elapsed:.1f} s against the bundled model on 127.0.0.1")
    print(f"requests: {total} ({total / elapsed:.1f}/s); answers by status: {statuses}")
    print(f"errors by status: {errors}")
    print(f"unexpected: {sum(tally.unexpected.values())} {dict(tally.unexpected)}")
    print(
        f"latency of valid requests: p50 {1000 * percentile(tally.valid_latencies, 0.5):.1f} ms, "
        f"p99 {1000 * percentile(tally.valid_latencies, 0.99):.1f} ms "
        f"(all requests: p50 {1000 * statistics.median(tally.all_latencies):.1f} ms, "
        f"p99 {1000 * percentile(tally.all_latencies, 0.99):.1f} ms)"
    )
    print(
        f"server RSS: ready {mib[0]:.1f} MiB, after {WARMUP_S:g} s warm-up {warm:.1f} MiB, "
        f"end {mib[-1]:.1f} MiB; growth warm-up -> end {growth:+.1f}%"
    )
    print(f"server RSS every {RSS_EVERY_S:g} s (MiB): {' '.join(f'{value:.0f}' for value in mib)}")
    print(f"server alive at the end: {alive}; exit code after SIGTERM: {exit_code}")


if __name__ == "__main__":
    sys.exit(main())
