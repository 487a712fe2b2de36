"""Start-up: the model is loaded, warmed up and served on one thread (see new_device_thread)."""

from __future__ import annotations

import threading

import toolkit.models
from toolkit.runner import Runner, WorkItem
from toolkit.server_args import ServerArgs
from toolkit.startup import load_engine, prepare


def test_loading_warm_up_and_serving_share_one_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    threads: dict[str, set[int]] = {"load": set(), "forward": set()}
    load_model, embed = toolkit.models.load_model, Runner.embed

    def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["load"].add(threading.get_ident())
        return load_model(*args, **kwargs)

    def recording_embed(self, batch):  # type: ignore[no-untyped-def]
        threads["forward"].add(threading.get_ident())
        return embed(self, batch)

    monkeypatch.setattr(toolkit.models, "load_model", recording_load)
    monkeypatch.setattr(Runner, "embed", recording_embed)
    args = ServerArgs.from_cli(["--device", "cpu"], environ={})
    engine = load_engine(args, prepare(args))
    try:
        warmed_up = set(threads["forward"])
        rows = engine.batcher.runner.submit([WorkItem([101, 2000, 102])]).result(timeout=30)
    finally:
        engine.batcher.runner.shutdown()
    assert rows[0].shape == (384,)
    assert warmed_up, "the warm-up ran no forward"
    assert threads["load"] == warmed_up == threads["forward"]
    assert threading.get_ident() not in threads["forward"]


def test_settled_garbage_collector_skips_start_up_objects_and_young_churn() -> None:
    import gc

    from toolkit.launch_server import settle_garbage_collector

    threshold = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 10_000  # torch, the app and the tests' own objects
        assert gc.get_threshold()[0] > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
