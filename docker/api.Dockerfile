# syntax=docker/dockerfile:1
#
# The API image: the FastAPI app and the shared service layer (`pip install .`), with no torch.
# It also runs the one-off `prefix-rft init` (migrations + bucket) and `prefix-rft keys ...`.
#
#   docker build -f docker/api.Dockerfile -t prefix-rft-api .
#
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv, copied whole into the runtime stage.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so that this (slow) layer is rebuilt only
# when the dependency list changes, not on every source edit. Only [project.dependencies]: the
# `train` extra (torch, transformers, peft, ...) belongs to the worker image.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself (its dependencies are already satisfied, so this only adds our packages and
# the `prefix-rft` console script).
COPY . .
RUN pip install .

# The API must never carry torch: fail the build if anything pulled it in.
RUN if python -c "import torch" 2>/dev/null; then \
        echo "error: torch is importable in the API image; it belongs to the worker image only" >&2; \
        exit 1; \
    fi

# ---------------------------------------------------------------------------------------------
# runtime: the same base, the virtual environment, the source (alembic config and migrations
# included), a non-root user.
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFIX_RFT_DATA_DIR=/var/lib/prefix-rft

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/prefix-rft \
    && chown app:app /var/lib/prefix-rft

COPY --from=build /opt/venv /opt/venv
# Read-only for the app user (owned by root).
COPY . /app
WORKDIR /app

USER 10001:10001
EXPOSE 8000

# Liveness only (/ready also checks the database, broker and storage). No curl in slim images.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--proxy-headers"]
