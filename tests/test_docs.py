"""The documentation site builds without warnings and shows the notebooks with their stored outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_builds_strict_with_notebook_outputs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # Material prints a banner about its end of life on every build unless told not to.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build failed:\n{build.stdout}\n{build.stderr}"

    page = (site / "notebooks" / "openai_api_embeddings" / "index.html").read_text(encoding="utf-8")
    # Outputs stored in the notebook, not re-executed: the readiness line and the batch's usage.
    assert "Server is ready." in page
    assert "usage: 28 prompt tokens, 28 total" in page
    assert (site / "api" / "index.html").is_file()
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="notebooks/openai_api_embeddings/"' in index
