# syntax=docker/dockerfile:1
#
# The EMA service, talking to an external Redis named by REDIS_URL (the image has no
# redis-server: without REDIS_URL the service exits with an error). Two stages: the builder
# installs the package and its dependencies into a virtualenv; the runtime stage copies only that
# virtualenv, so the image carries no compiler cache, pip, source tree or build metadata.
#
#   docker build -t ema-service .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://host.docker.internal:6379/0 ema-service
#
# tests/test_deploy.py checks the wiring below (user, port, health check, COPY sources).

# Both stages must use the same Python: the virtualenv links to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, read from pyproject.toml alone, so that this layer is rebuilt only when
# they change and not on every code edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install -r requirements.txt
# Then the package itself (a wheel built from the source and installed, not an editable install);
# pip and setuptools are not needed to run it. README.md is the package's description: without
# it the build warns.
COPY README.md ./
COPY app ./app
RUN pip install --no-deps . \
 && pip check \
 && pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ema-service" \
      org.opencontainers.image.description="Streaming exponential moving averages over HTTP, kept atomically in Redis" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid/gid, so that orchestrators can check runAsNonRoot and volumes can be owned.
RUN groupadd --system --gid 10001 ema \
 && useradd --system --uid 10001 --gid ema --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ema
COPY --from=builder /opt/venv /opt/venv
# EMA_HOST: listen on every interface of the container, or a published port reaches nothing.
# EMA_WORKERS is left to the deployment: the default (the CPU count the kernel reports) is the
# host's, not the container's CPU limit.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EMA_HOST=0.0.0.0 \
    EMA_PORT=8000
# An empty, root-owned working directory: the service writes no files.
WORKDIR /srv/ema
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz never touches Redis; /readyz does). There is no curl in the slim image,
# so Python's urllib asks; an error or a non-2xx status exits 1. It follows EMA_PORT if overridden.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMA_PORT', '8000') + '/healthz', timeout=4)"]
# Exec form: Python is PID 1 and gets SIGTERM directly; uvicorn shuts down gracefully on it.
CMD ["python", "-m", "app"]
