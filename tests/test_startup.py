"""Start-up: the model is loaded, warmed up and served on the device threads (see DeviceThreads)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch

import toolkit.execution.assembly
import toolkit.execution.device_threads
import toolkit.execution.kernel_builder
from toolkit.execution.assembly import load_service
from toolkit.execution.cpu_policy import (
    MIN_SHARED_BATCH_TOKENS,
    ONE_CORE_BATCH_TOKENS,
    SEVERAL_CORES_BATCH_TOKENS,
    ThreadPlan,
    WorkSplit,
    default_workers,
)
from toolkit.execution.device_threads import CORES, DeviceThreads
from toolkit.execution.runner import Runner
from toolkit.models import short_batch_linear
from toolkit.scheduling.work import WorkItem
from toolkit.server_args import ServerArgs
from toolkit.service.model_files import ModelFiles


def files_of(args: ServerArgs) -> ModelFiles:
    return args.model_files()


def test_loading_warm_up_and_serving_share_one_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    threads: dict[str, set[int]] = {"load": set(), "forward": set()}
    load_model, embed = toolkit.execution.assembly.load_model, Runner.embed

    def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["load"].add(threading.get_ident())
        return load_model(*args, **kwargs)

    def recording_embed(self, batch):  # type: ignore[no-untyped-def]
        threads["forward"].add(threading.get_ident())
        return embed(self, batch)

    monkeypatch.setattr(toolkit.execution.assembly, "load_model", recording_load)
    monkeypatch.setattr(Runner, "embed", recording_embed)
    args = ServerArgs.from_cli(["--device", "cpu", "--cpu-workers", "1"], environ={})
    service = load_service(args, files_of(args))
    try:
        warmed_up = set(threads["forward"])
        rows = service.queue.runner.submit([WorkItem([101, 2000, 102])]).result(timeout=30)
    finally:
        service.queue.runner.shutdown()
    assert rows[0].shape == (384,)
    assert warmed_up, "the warm-up ran no forward"
    assert threads["load"] == warmed_up == threads["forward"]
    assert threading.get_ident() not in threads["forward"]


def test_device_threads_are_idle_with_nothing_queued_or_running_and_once_shut_down() -> None:
    threads = DeviceThreads(2)
    assert threads.idle
    release = threading.Event()
    running = threads.submit(release.wait, 10)
    queued = [threads.submit(release.wait, 10) for _ in range(2)]  # one waits behind another
    assert not threads.idle
    release.set()
    for future in [running, *queued]:
        future.result(timeout=10)
    assert threads.idle
    release.clear()
    threads.submit(release.wait, 10)
    threads.submit(release.wait, 10)
    threads.submit(release.wait, 10)  # dropped by the shutdown below, never counted down
    threads.shutdown(wait=False, cancel_futures=True)
    assert threads.idle
    release.set()


@pytest.mark.parametrize("warmup", [True, False])
def test_short_batch_kernels_are_built_after_start_up_with_the_warm_up(monkeypatch, warmup: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(short_batch_linear, "packed_products_pay_off", lambda layers: True)
    built: list[tuple[int, str]] = []  # (rows, device thread) of each job
    all_built = threading.Event()

    def recording_build(layers, rows):  # type: ignore[no-untyped-def]
        built.append((rows, threading.current_thread().name))
        if rows == short_batch_linear.PACKED_MAX_ROWS:
            all_built.set()

    monkeypatch.setattr(toolkit.execution.kernel_builder, "build_kernels", recording_build)
    flags = ["--device", "cpu", "--cpu-workers", "1"] + ([] if warmup else ["--no-warmup"])
    args = ServerArgs.from_cli(flags, environ={})
    service = load_service(args, files_of(args))
    try:
        if warmup:
            assert all_built.wait(timeout=30)
        else:  # a builder would be running still, or have recorded its jobs
            assert not any(thread.name == "kernel-builder" for thread in threading.enumerate())
    finally:
        service.queue.runner.shutdown()
    if warmup:
        assert [rows for rows, _ in built] == list(range(1, short_batch_linear.PACKED_MAX_ROWS + 1))
        assert {thread.rsplit("_", 1)[0] for _, thread in built} == {"device-0"}
    else:
        assert built == []


@pytest.mark.skipif(CORES != 2, reason="the default of two CPU workers is for 2 cores")
def test_two_cpu_workers_run_batches_side_by_side_and_a_lone_batch_on_both_cores(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    embed = Runner.embed
    both_running = threading.Barrier(2, timeout=20)
    seen: list[tuple[str, int]] = []  # (device thread's name, torch threads) of each forward

    def recording_embed(self, batch):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name.rsplit("_", 1)[0], torch.get_num_threads()))
        if len(seen) <= 2:
            both_running.wait()  # passes only if the other batch is in a forward at the same time
        return embed(self, batch)

    args = ServerArgs.from_cli(["--device", "cpu", "--no-warmup"], environ={})
    service = load_service(args, files_of(args))
    runner = service.queue.runner
    monkeypatch.setattr(Runner, "embed", recording_embed)
    try:
        side_by_side = [runner.submit([WorkItem([101, 2000 + i, 102])]) for i in range(2)]
        rows = [future.result(timeout=30)[0] for future in side_by_side]
        rows += runner.submit([WorkItem([101, 2002, 102])]).result(timeout=30)
    finally:
        runner.shutdown()
    assert runner.parallel_batches == 2
    together, lone = dict(seen[:2]), seen[2]
    # The second thread has one core however the first thread's count was last set.
    assert set(together) == {"device-0", "device-1"} and together["device-1"] == 1
    assert lone == ("device-0", 2)  # alone: the first thread, on both cores
    assert all(row.shape == (384,) for row in rows)


@pytest.mark.skipif(CORES != 2, reason="the default of two CPU workers is for 2 cores")
def test_one_large_request_is_split_over_both_cores_and_a_small_one_runs_on_both(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    embed = Runner.embed
    seen: list[tuple[str, int, int]] = []  # (device thread, torch threads, tokens) of each forward

    def recording_embed(self, batch):  # type: ignore[no-untyped-def]
        name = threading.current_thread().name.rsplit("_", 1)[0]
        # Real tokens only: the fillers that bound batch shapes are no part of the split.
        seen.append((name, torch.get_num_threads(), int(batch.cu_seqlens[batch.real_seqs])))
        return embed(self, batch)

    args = ServerArgs.from_cli(["--device", "cpu", "--no-warmup"], environ={})
    service = load_service(args, files_of(args))
    monkeypatch.setattr(Runner, "embed", recording_embed)
    length = MIN_SHARED_BATCH_TOKENS // 2 + 1  # four of them: just over a share for each worker

    async def scenario() -> None:
        service.queue.start()
        try:
            large = [WorkItem([101] + [2000 + i] * (length - 2) + [102]) for i in range(4)]
            assert len(await service.queue.submit(large)) == 4
            small = [WorkItem([101, 2000 + i, 102]) for i in range(2)]
            assert len(await service.queue.submit(small)) == 2
        finally:
            await service.queue.close()

    asyncio.run(scenario())
    # The large request's halves ran side by side, one core each; the small one whole on both.
    assert sorted(seen[:2]) == [("device-0", 1, 2 * length), ("device-1", 1, 2 * length)]
    assert seen[2:] == [("device-0", 2, 6)]


@pytest.mark.parametrize(
    ("cores", "workers", "boosts", "split"),
    [
        (2, 2, True, WorkSplit(2, 2 * MIN_SHARED_BATCH_TOKENS, include_busy=True)),
        (4, 4, True, WorkSplit(4, 4 * MIN_SHARED_BATCH_TOKENS, include_busy=True)),
        (16, 4, False, WorkSplit(4, 0, include_busy=False)),
        (16, 1, False, None),
    ],
)
def test_workers_of_several_cores_share_all_idle_work_and_single_cores_a_large_queue(
    monkeypatch, cores: int, workers: int, boosts: bool, split: WorkSplit | None
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(toolkit.execution.device_threads, "CORES", cores)
    threads = DeviceThreads(workers)
    model = SimpleNamespace(row_pooling_modes=())  # all the runner reads of a model when built
    runner = Runner(model, torch.device("cpu"), ("mean",), True, threads)  # type: ignore[arg-type]
    try:
        assert (threads.plan.boosts_lone_batches, runner.work_split) == (boosts, split)
    finally:
        runner.shutdown()


def test_default_cpu_workers_are_two_on_two_cores_else_one_and_the_flag_caps_at_one_per_core() -> None:
    by_cores = {cores: default_workers(None, cores) for cores in (1, 2, 4, 7, 8, 16, 64)}
    assert by_cores == {1: 1, 2: 2, 4: 1, 7: 1, 8: 1, 16: 1, 64: 1}
    assert default_workers(ServerArgs.from_cli(["--cpu-workers", "8"], environ={}).cpu_workers, 4) == 4


def test_cpu_batches_are_smaller_for_workers_of_one_core() -> None:
    assert ThreadPlan(2, 2).batch_tokens == ThreadPlan(16, 16).batch_tokens == ONE_CORE_BATCH_TOKENS
    assert ThreadPlan(1, 2).batch_tokens == ThreadPlan(1, 16).batch_tokens == SEVERAL_CORES_BATCH_TOKENS
    assert ONE_CORE_BATCH_TOKENS < SEVERAL_CORES_BATCH_TOKENS


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--max-batch-tokens", "1000"], 1000)])
def test_the_server_takes_its_plans_batch_budget_unless_the_flag_sets_one(
    flags: list[str], expected: int | None
) -> None:
    args = ServerArgs.from_cli(["--device", "cpu", "--cpu-workers", "1", "--no-warmup", *flags], environ={})
    service = load_service(args, files_of(args))
    try:
        assert service.queue.max_batch_tokens == (expected or ThreadPlan(1, CORES).batch_tokens)
    finally:
        service.queue.runner.shutdown()


def test_settled_garbage_collector_skips_start_up_objects_and_young_churn() -> None:
    import gc

    from toolkit.process.bootstrap import settle_garbage_collector

    threshold = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 10_000  # torch, the app and the tests' own objects
        assert gc.get_threshold()[0] > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_short_texts_are_tokenized_on_the_event_loop_long_ones_beside_it() -> None:
    import asyncio

    from toolkit.service.inference import INLINE_TOKENIZE_CHARS, EmbedRequest

    args = ServerArgs.from_cli(["--device", "cpu"], environ={})
    service = load_service(args, files_of(args))
    encode = service.tokenizer.encode
    threads: list[int] = []

    def recording_encode(texts: list[str]) -> list[list[int]]:
        threads.append(threading.get_ident())
        return encode(texts)

    service.tokenizer.encode = recording_encode  # type: ignore[method-assign]
    long_text = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1)

    async def scenario() -> tuple[int, list[int]]:
        service.queue.start()
        try:
            for text in ("a short query", long_text):
                result = await service.embed(EmbedRequest(inputs=[text]))
                assert result.embeddings.shape == (1, 384)
        finally:
            await service.queue.stop()
        return threading.get_ident(), threads

    try:
        loop_thread, seen = asyncio.run(scenario())
    finally:
        service.queue.runner.shutdown()
    assert seen[0] == loop_thread and seen[1] != loop_thread


def test_compile_is_on_by_default_only_on_cuda_and_for_encoders_only_with_graphs() -> None:
    """An encoder's compiled add + LayerNorm steps pay off only when CUDA graphs replay them."""
    from types import SimpleNamespace

    import torch

    from toolkit.execution.assembly import _compile_wanted
    from toolkit.server_args import ServerArgs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    encoder = SimpleNamespace(compile_pays_off=True, compile_needs_graphs=True)
    decoder = SimpleNamespace(compile_pays_off=True, compile_needs_graphs=False)
    fallback = SimpleNamespace(compile_pays_off=False, compile_needs_graphs=False)
    graphs, no_graphs = ServerArgs(), ServerArgs(cuda_graphs=False)
    embeds, reranks = SimpleNamespace(task="embed"), SimpleNamespace(task="rerank")
    assert _compile_wanted(graphs, cuda, encoder, embeds)  # type: ignore[arg-type]
    assert not _compile_wanted(no_graphs, cuda, encoder, embeds)  # type: ignore[arg-type]
    assert _compile_wanted(no_graphs, cuda, decoder, embeds)  # type: ignore[arg-type]
    assert not _compile_wanted(graphs, cuda, fallback, embeds)  # type: ignore[arg-type]
    assert not _compile_wanted(graphs, cpu, decoder, embeds)  # type: ignore[arg-type]
    assert _compile_wanted(ServerArgs(compile=True, cuda_graphs=False), cpu, encoder, embeds)  # type: ignore[arg-type]
    assert not _compile_wanted(ServerArgs(compile=False), cuda, decoder, embeds)  # type: ignore[arg-type]
    # A cross-encoder runs without graphs, so an encoder's compile does not pay off either.
    assert not _compile_wanted(graphs, cuda, encoder, reranks)  # type: ignore[arg-type]
    assert _compile_wanted(ServerArgs(compile=True), cuda, encoder, reranks)  # type: ignore[arg-type]
    # Nor does SPLADE, whose vocabulary-wide outputs run without graphs too.
    assert not _compile_wanted(graphs, cuda, encoder, SimpleNamespace(task="sparse"))  # type: ignore[arg-type]
