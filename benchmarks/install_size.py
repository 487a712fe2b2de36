"""Time and size of README command 1's install, in a fresh virtual environment.

    python benchmarks/install_size.py                 # this checkout
    python benchmarks/install_size.py --tree ../old   # another checkout, to compare

The install steps are read from the tree's own README (command 1, up to the server's start), so
the figure is what a new user gets. Prints the wall time of the install, the size of the
environment's site-packages with and without torch, and its largest packages.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_steps(tree: Path) -> list[str]:
    """The pip commands of README command 1 (after the venv is made, before the server runs)."""
    readme = (tree / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python3.11 -m venv"))
    steps = [step.strip() for step in line.split("&&")]
    return [step for step in steps if step.startswith("pip install")]


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def measure(tree: Path) -> None:
    steps = install_steps(tree)
    with tempfile.TemporaryDirectory(prefix="toolkit-install-") as scratch:
        venv = Path(scratch) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = str(venv / "bin" / "pip")
        started = time.perf_counter()
        for step in steps:
            words = step.split()[2:]  # after "pip install"
            words = [str(tree) if w in (".", '"."') else w for w in words]
            done = subprocess.run([pip, "install", "-q", *words], cwd=tree, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{step} failed:\n{done.stdout}{done.stderr}")
        seconds = time.perf_counter() - started
        # Everything the server runs must import from what was installed.
        imports = "import toolkit.launch_server, toolkit.process.single, toolkit.process.engine"
        check = subprocess.run(
            [str(venv / "bin" / "python"), "-c", imports], capture_output=True, text=True, cwd=scratch
        )
        site = next((venv / "lib").glob("python*/site-packages"))
        packages = {p.name: size_mb(p) for p in site.iterdir() if p.is_dir()}
        torch = packages.get("torch", 0.0)
        total = size_mb(site)
        print(f"tree: {tree}")
        print(f"steps: {' && '.join(steps)}")
        print(f"install: {seconds:.0f} s; site-packages {total:.0f} MB, {total - torch:.0f} MB without torch")
        print("server imports: " + ("ok" if check.returncode == 0 else check.stderr.strip().splitlines()[-1]))
        largest = sorted(packages.items(), key=lambda item: -item[1])[:12]
        print("largest: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in largest))
        for module in ("sentence_transformers", "transformers", "sklearn", "scipy", "openai", "ipykernel"):
            print(f"  {module}: {'installed' if (site / module).is_dir() else 'absent'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose README to follow")
    measure(parser.parse_args().tree.resolve())


if __name__ == "__main__":
    main()
