# syntax=docker/dockerfile:1
# The default pipeline in a container: the same pinned environment as `bash scripts/repro.sh`,
# installed by the same script (scripts/env.sh), run as a non-root user with the network switches off.
#
#   docker build -t ato .
#   docker run --name ato-run ato                  # the whole pipeline (dvc repro), ~the README's timing
#   docker cp ato-run:/ato/reports ./reports-docker  # summary.md, figures, metrics
#   docker run --rm ato bash scripts/test.sh       # the test suite
#
# Building needs PyPI and the PyTorch CPU wheel index (torch==2.13.0+cpu is pinned in
# requirements.lock); running needs no network at all.
FROM python:3.11-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV ATO_VENV=/opt/ato/venv \
    PATH=/opt/ato/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1 \
    WANDB_MODE=disabled

RUN useradd --create-home --uid 1000 --shell /bin/bash ato \
 && mkdir -p /opt/ato /ato/.dvc \
 && chown -R ato:ato /opt/ato /ato
USER 1000:1000
WORKDIR /ato

# The install: exactly what scripts/env.sh does for repro.sh and test.sh (a venv at $ATO_VENV from
# requirements.txt constrained by requirements.lock, then ato itself, editable from src/). The extra
# index is where pip finds the CPU build of torch, which keeps the image free of CUDA libraries.
COPY --chown=ato:ato requirements.txt requirements.lock pyproject.toml README.md ./
COPY --chown=ato:ato scripts/ scripts/
COPY --chown=ato:ato src/ src/
RUN --mount=type=cache,target=/home/ato/.cache/pip,uid=1000,gid=1000 \
    export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
 && . scripts/env.sh

# The pipeline definition (DVC runs without git inside the image: no .git is copied), the tests and
# the benchmarks.
COPY --chown=ato:ato dvc.yaml dvc.lock* params.yaml .dvcignore ./
COPY --chown=ato:ato .dvc/config .dvc/config
COPY --chown=ato:ato tests/ tests/
COPY --chown=ato:ato bench/ bench/
RUN dvc config --local core.no_scm true

CMD ["bash", "scripts/repro.sh"]
