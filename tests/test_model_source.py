"""Where --model-path finds a model: a directory, the Hugging Face cache, the bundled copy, or nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.errors import ModelLoadError
from toolkit.service.model_source import bundled_model_dir, resolve_model_dir


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source`'s files the way huggingface_hub caches a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_local_directory_wins(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path.resolve()


def test_hub_id_resolves_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    snapshot = fake_hub_cache(tmp_path, "someone/tiny-model", bundled_model_dir())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("someone/tiny-model") == snapshot


def test_bundled_name_falls_back_to_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2") == bundled_model_dir()
    assert resolve_model_dir(None) == bundled_model_dir()


def test_unknown_model_names_every_place_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as raised:
        resolve_model_dir("nobody/nothing")
    message = str(raised.value)
    assert "nobody/nothing" in message and str(tmp_path) in message and "local directory" in message
    assert "HF_HUB_OFFLINE" in message and "not tried" in message


def test_an_unreachable_hub_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(repo_id: str, local_files_only: bool = False) -> str:
        if local_files_only:
            raise FileNotFoundError("not cached")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelLoadError) as raised:
        resolve_model_dir("nobody/nothing")
    assert "the hub could not be reached (ConnectionError: Failed to resolve" in str(raised.value)
