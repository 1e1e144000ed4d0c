# The service's image: `python -m service` on the same lock file that `make` installs.
# Build:  docker build -t registry.example.com/playing-with-neon-service:TAG .
# Schema migrations are not run here: the Kubernetes Job in k8s/base runs `python -m service migrate`.

# --- builder: a virtual environment with the locked runtime dependencies, nothing else ---
FROM python:3.12-slim-trixie AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# No pip inside the venv: the base image's pip installs into it and stays behind in this stage.
RUN python -m venv --without-pip /opt/venv

# Only the lock file is copied before the install, so this layer is rebuilt only when the lock changes.
# Wheels only: the build fails instead of reaching for a compiler that the slim image does not have
# (every package locked today has wheels for CPython 3.12 on both x86_64 and aarch64).
COPY requirements.lock /tmp/requirements.lock
RUN python -m pip --python /opt/venv/bin/python install --no-cache-dir \
        --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock

# --- runtime: the interpreter, the venv and the `service` package ---
FROM python:3.12-slim-trixie

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000

# A fixed, unprivileged UID/GID that Kubernetes' runAsUser/runAsGroup repeat; no home, no shell.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# Root-owned and read-only to the service's user: the process cannot change its own code.
COPY service/ ./service/

USER 10001:10001
EXPOSE 8000

# Docker and Compose use this; Kubernetes ignores it and runs the probes in k8s/base/deployment.yaml.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]

# Python is PID 1 without an init: uvicorn installs its own SIGTERM handler, and with WORKERS > 1
# it reaps its own worker processes. `migrate` instead of `serve` runs the migrations (the Job does).
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]
