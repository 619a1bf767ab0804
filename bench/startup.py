"""Per-process fixed cost of each stage (issue 23: ≤ 2 s per stage process), beside `python -c pass`.

    .venv/bin/python bench/startup.py [--repeats 3] [--params params.yaml --pair L05_k1]

For every stage, in fresh processes (best of --repeats):
- import s: `import ato.cli, ato.stages.<stage>` — what any run of the stage pays before reading params;
  the heavy libraries it pulls in at import time are listed with their share (`python -X importtime`).
- with --params: total s, the wall of `ato <stage> [--pair]` on that project, and setup + compute s =
  total − import (MLflow/Optuna setup, lazily imported libraries and the stage's own work). Point it at
  a small project (the tests' tiny pipeline) so that compute is near zero; it writes that project's outputs.
  Two setup costs are measured alone, in fresh processes: MLflow (import, open the project's store and
  experiment: every stage that tracks runs pays it) and Optuna (import, an in-memory study: `ato tune`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from ato.cli import STAGES  # noqa: E402  (the stage table, after the path is set)

HEAVY = ("torch", "transformers", "mlflow", "optuna", "matplotlib", "great_expectations", "sae_lens", "sklearn")
IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)")


def wall(argv: list[str], repeats: int) -> float:
    """Best wall time of `argv` over `repeats` fresh processes (fails loudly if the command fails)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        best = min(best, time.perf_counter() - start)
    return best


def heavy_imports(module: str) -> dict[str, float]:
    """Cumulative import seconds of each heavy library that importing `module` loads first-hand."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import ato.cli, {module}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    found: dict[str, float] = {}
    for match in IMPORT_LINE.finditer(done.stderr):
        cumulative_us, name = int(match.group(1)), match.group(3)
        if name in HEAVY:  # a top-level package's line carries everything it imported beneath it
            found[name] = found.get(name, 0.0) + cumulative_us / 1e6
    return found


MLFLOW_SETUP = """
import ato.cli  # its offline and no-telemetry environment, as a stage has
import mlflow
from ato.params import load_params
from ato.tracking import RunContext, setup
setup(RunContext.from_params(load_params({params!r})))
"""
OPTUNA_SETUP = "import ato.cli, optuna; optuna.create_study(direction='maximize')"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", default=None, help="run each stage on this project (its outputs are rewritten)")
    parser.add_argument("--pair", default=None, help="with --params: the pair of per-pair stages")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), help="default: every stage")
    args = parser.parse_args()
    bare = wall([sys.executable, "-c", "pass"], args.repeats)
    print(f"python -c pass: {bare:.2f} s")
    print(f"{'stage':18} {'import s':>9} {'setup+compute s':>16} {'total s':>8}  heavy imports (s)")
    for stage in args.stages:
        module = f"ato.stages.{STAGES[stage][0]}"
        imported = wall([sys.executable, "-c", f"import ato.cli, {module}"], args.repeats)
        heavy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(heavy_imports(module).items(), key=lambda kv: -kv[1]))
        rest, total = "", ""
        if args.params:
            command = [sys.executable, "-m", "ato.cli", stage, "--params", args.params]
            if STAGES[stage][2] and args.pair:
                command += ["--pair", args.pair]
            seconds = wall(command, 1)  # a stage run rewrites its outputs: once is enough
            rest, total = f"{seconds - imported:.2f}", f"{seconds:.2f}"
        print(f"{stage:18} {imported:9.2f} {rest:>16} {total:>8}  {heavy or '-'}")
    if args.params:
        mlflow_s = wall([sys.executable, "-c", MLFLOW_SETUP.format(params=args.params)], args.repeats)
        print(f"setup alone: MLflow import + store and experiment {mlflow_s:.2f} s", end="")
        print(f", Optuna import + study {wall([sys.executable, '-c', OPTUNA_SETUP], args.repeats):.2f} s")


if __name__ == "__main__":
    main()
