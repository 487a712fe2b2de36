"""Every notebook under notebooks/ runs top to bottom and prints what its committed outputs show.

pytest-notebook executes each notebook in a fresh kernel and raises if a cell fails or times out.
The outputs are then compared with the committed ones after masking what legitimately changes from
run to run (see ``REPLACEMENTS``). The server's log lines are streamed into whichever cell is
running when they arrive, so they are removed from that comparison (and the stream outputs they
leave empty are dropped); instead the set of their shapes (numbers, ids and paths masked) must be
the same in both, so a stored log that the server no longer writes fails the test.

To refresh the committed outputs after an intended change::

    pytest tests/test_notebooks.py --nb-force-regen
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat import NotebookNode
from pytest_notebook.diffing import diff_notebooks, diff_to_string, filter_diff
from pytest_notebook.nb_regression import NBRegressionFixture
from pytest_notebook.notebook import regex_replace_nb

pytestmark = pytest.mark.notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 120
# Set to a fresh value for each run, so the processes a notebook leaves behind can be found.
RUN_MARKER_ENV = "TOOLKIT_NOTEBOOK_TEST_RUN"

OUTPUTS = "/cells/*/outputs"
# pytest-notebook ``diff_replace`` entries: (path, regex, replacement), applied in order to every
# string under the outputs of both notebooks before they are compared.
REPLACEMENTS: tuple[tuple[str, str, str], ...] = (
    # Server log lines, whole; not anchored, since one can land between two writes of a print().
    (OUTPUTS, r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\][^\n]*(?:\n|$)", ""),
    # tqdm progress bars, whole lines (they redraw with \r, so the line holds several frames).
    (OUTPUTS, r"[^\n]*\d+%\|[^\n]*(?:\n|$)", ""),
    (OUTPUTS, r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?", "<DATETIME>"),
    (OUTPUTS, r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<UUID>"),
    (OUTPUTS, r"(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1?\]):\d+", r"\1:<PORT>"),
    (OUTPUTS, r"(?i)\b(port[ =:]+)\d+", r"\1<PORT>"),
    (OUTPUTS, r"(?i)\b(pid[ =:]+|process \[?)\d+", r"\1<PID>"),
    (OUTPUTS, r"(?<![\w.])\d+(?:\.\d+)? ?(?:ns|us|µs|ms|s|sec|seconds|min)\b", "<DURATION>"),
    # Float digits beyond the 4th decimal: the last bits differ between CPUs and BLAS builds.
    (OUTPUTS, r"(\d\.\d{4})\d+", r"\1"),
)
# A cell tagged `measured` prints timings: its numbers and figures vary from run to run, its
# shape (the lines, the columns, that a figure is drawn) must not. The spaces before a number go
# with it: a table pads its columns to the widest number of the run.
MEASURED_TAG = "measured"
MEASURED_NUMBER = re.compile(r"(?: +|\b)\d+(?:[.,]\d+)*")
# A server log line, tagged with a time and, in a front end, the process; and what its shape masks.
LOG_LINE = re.compile(r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?: [^\]\n]*)?\] ([^\n]*)")
SHAPE_MASKS: tuple[tuple[str, str], ...] = (
    (r"\b([a-z_]+)=[^\s,;]+", r"\1=<V>"),  # the access line's fields, whichever request it was
    (r"(?:/[\w.@+-]+)+/?", "<PATH>"),
    (r"\b[0-9a-f]{32}\b", "<ID>"),
    (r"\d+(?:\.\d+)?", "<N>"),
)
# Paths whose differences never fail the test: tracebacks (ANSI colours, file paths) and what the
# kernel reports about itself (its Python version, the state of widgets it drew) after a run.
IGNORED: tuple[str, ...] = (
    "/cells/*/outputs/*/traceback",
    "/metadata/language_info",
    "/metadata/widgets",
)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Run the notebooks' ``python3`` kernel on this interpreter, whatever else is installed.

    A kernelspec in a private directory that JUPYTER_PATH puts first pins ``python3`` to
    sys.executable, so a user-wide or system-wide kernelspec cannot swap in another Python. The
    repository root goes on the kernel's PYTHONPATH (and so on the server's), so ``toolkit``
    imports even where the package is not installed into this environment.
    """
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "JUPYTER_PATH", os.pathsep.join(filter(None, [str(jupyter_dir), os.environ.get("JUPYTER_PATH")]))
        )
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        yield {"PYTHONPATH": python_path}


def normalized(notebook: NotebookNode) -> NotebookNode:
    """A copy with ``REPLACEMENTS`` applied, empty stream outputs dropped, adjacent ones joined."""
    notebook = regex_replace_nb(notebook, REPLACEMENTS)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if MEASURED_TAG in cell.metadata.get("tags", ()):
            _mask_measured(cell.outputs)
        outputs: list[NotebookNode] = []
        for output in cell.outputs:
            if output.output_type == "stream":
                if not output.text:
                    continue
                previous = outputs[-1] if outputs else None
                if previous is not None and previous.output_type == "stream" and previous.name == output.name:
                    previous.text += output.text
                    continue
            outputs.append(output)
        cell.outputs = outputs
    return notebook


def _mask_measured(outputs: list[NotebookNode]) -> None:
    for output in outputs:
        if "text" in output:
            output.text = MEASURED_NUMBER.sub(_masked_number, output.text)
        for mime in output.get("data", {}):
            output.data[mime] = (
                "<FIGURE>"
                if mime.startswith("image/")
                else MEASURED_NUMBER.sub(_masked_number, output.data[mime])
            )


def _masked_number(match: re.Match[str]) -> str:
    return " <N>" if match.group().startswith(" ") else "<N>"


def check_notebook(path: Path, exec_env: dict[str, str], regenerate: bool = False) -> None:
    """Execute the notebook at ``path`` and fail if it raises or its masked outputs changed."""
    committed = nbformat.read(path, as_version=4)
    kernel = committed.metadata.get("kernelspec", {}).get("name")
    assert kernel == KERNEL_NAME, f"{path.name}: set the notebook's kernel to {KERNEL_NAME!r}, not {kernel!r}"

    marker = uuid.uuid4().hex
    fixture = NBRegressionFixture(
        exec_timeout=CELL_TIMEOUT_S,
        exec_env={**exec_env, RUN_MARKER_ENV: marker},
        # pytest-notebook executes and raises on a failing cell; outputs and execution counts are
        # compared below, once the asynchronous log streams are normalized away, which
        # diff_replace alone cannot do.
        diff_ignore=(OUTPUTS, "/cells/*/execution_count", *IGNORED),
        # Its default post-processor merges the new notebook's streams (and not the committed
        # one's), which moves printed text across displays; normalized() treats both alike.
        post_processors=(),
    )
    try:
        result = fixture.check(str(path))
    finally:
        # A notebook that fails before terminate_process leaves its server running, in its own
        # session, after the kernel is gone.
        leftovers = _stop_processes_marked(marker)
    assert not leftovers, f"{path.name}: left processes running: {leftovers}"

    expected, actual = normalized(result.nb_initial), normalized(result.nb_final)
    diff = filter_diff(diff_notebooks(expected, actual), set(IGNORED))
    logs_then, logs_now = log_shapes(result.nb_initial), log_shapes(result.nb_final)
    if (diff or logs_then != logs_now) and regenerate:
        nbformat.write(result.nb_final, path)
        pytest.fail(f"{path.name}: outputs changed; wrote the new ones, review them with git diff")
    assert not diff, f"{path.name}: outputs differ from the committed ones\n{diff_to_string(expected, diff)}"
    assert logs_then == logs_now, (
        f"{path.name}: the stored server log has lines the server no longer writes:\n"
        + "\n".join(f"  stored only: {line}" for line in sorted(logs_then - logs_now))
        + "\n"
        + "\n".join(f"  written now: {line}" for line in sorted(logs_now - logs_then))
    )


def log_shapes(notebook: NotebookNode) -> set[str]:
    """The shapes of every server log line in the notebook's outputs."""
    shapes = set()
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            for match in LOG_LINE.finditer(output.get("text", "")):
                shape = match.group(1)
                for pattern, mask in SHAPE_MASKS:
                    shape = re.sub(pattern, mask, shape)
                shapes.add(shape)
    return shapes


def _stop_processes_marked(marker: str) -> list[str]:
    """Kill the processes whose environment carries this run's marker; return their command lines."""
    marked = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_MARKER_ENV) == marker:
                marked.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    described = []
    for process in marked:
        try:
            described.append(" ".join(process.cmdline()))
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(marked, timeout=10)
    return described


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_outputs_match(
    path: Path, kernel_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    check_notebook(path, kernel_env, regenerate=bool(request.config.getoption("nb_force_regen")))


# --- the checker itself, on small notebooks made here ---------------------------------------------


def _notebook(tmp_path: Path, source: str, stdout: str) -> Path:
    """A one-cell notebook whose committed output is ``stdout``."""
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stdout)]
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    path = tmp_path / "made.ipynb"
    nbformat.write(notebook, path)
    return path


_VARYING_CELL = """\
import os, random, sys, time, uuid
print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] Batch. #seq: 1", flush=True)
print("embedding:", f"{0.25 + random.random() * 1e-5:.6f}", "id", uuid.uuid4())
print(f"pid {os.getpid()} on http://localhost:{random.randint(20000, 60000)}, took {random.random():.2f} s")
print("\\r 50%|#####     | 1/2 [00:01<00:01]\\r100%|##########| 2/2 [00:02<00:00]", file=sys.stderr)
print("kernel:", sys.executable)
"""


def test_checker_masks_what_varies(tmp_path: Path, kernel_env: dict[str, str]) -> None:
    committed = (
        "[2026-01-02 03:04:05] Batch. #seq: 9\n"
        "embedding: 0.250012 id 123e4567-e89b-12d3-a456-426614174000\n"
        "pid 4242 on http://localhost:31337, took 0.42 s\n"
        # Not masked: the kernel must be this interpreter.
        f"kernel: {sys.executable}\n"
    )
    check_notebook(_notebook(tmp_path, _VARYING_CELL, committed), kernel_env)


def test_checker_masks_numbers_and_figures_only_in_measured_cells(
    tmp_path: Path, kernel_env: dict[str, str]
) -> None:
    source = "print('Engine', 5678, 'texts/s')"  # another run's figure
    path = _notebook(tmp_path, source, "Engine 1234 texts/s\n")
    committed = nbformat.read(path, as_version=4)
    with pytest.raises(AssertionError, match="outputs differ"):
        check_notebook(path, kernel_env)
    committed.cells[0].metadata["tags"] = [MEASURED_TAG]
    nbformat.write(committed, path)
    check_notebook(path, kernel_env)
    committed.cells[0].outputs[0].text = "Engine 1234 tokens/s\n"  # the shape changed
    nbformat.write(committed, path)
    with pytest.raises(AssertionError, match="outputs differ"):
        check_notebook(path, kernel_env)


def test_checker_fails_on_changed_output(tmp_path: Path, kernel_env: dict[str, str]) -> None:
    with pytest.raises(AssertionError, match="outputs differ"):
        check_notebook(_notebook(tmp_path, "print('dimensions:', 384)", "dimensions: 768\n"), kernel_env)


def test_checker_fails_on_a_log_line_the_server_no_longer_writes(
    tmp_path: Path, kernel_env: dict[str, str]
) -> None:
    cell = "import time\nprint(f\"[{time.strftime('%Y-%m-%d %H:%M:%S')}] Ready: 384 dimensions\", flush=True)"
    stored = "[2026-01-02 03:04:05] The server is ready to embed.\n"
    with pytest.raises(AssertionError, match=r"stored only: The server is ready to embed\."):
        check_notebook(_notebook(tmp_path, cell, stored), kernel_env)


def test_checker_fails_on_raising_cell(tmp_path: Path, kernel_env: dict[str, str]) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        check_notebook(_notebook(tmp_path, "print('ok')\n1 / 0", "ok\n"), kernel_env)
