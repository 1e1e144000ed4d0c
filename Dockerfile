# The service's image: `python -m service` on the same lock file that `make` installs.
# Build:  make image   (or: docker build -t registry.example.com/playing-with-neon-service:TAG .)
# Schema migrations are not run here: the Kubernetes Job in k8s/base runs `python -m service migrate`.
#
# Base: Debian trixie's slim image with Debian's own Python 3.13, so the interpreter and its
# libraries (OpenSSL, libffi, expat, zlib) get Debian's security updates with every rebuild, as in
# the distroless Python images. requirements.lock is resolved for every CPython from 3.11 on
# (uv's --universal), and every locked package has a cp313 wheel for x86_64 and aarch64.

# --- builder: a virtual environment with the locked runtime dependencies, nothing else ---
FROM debian:trixie-slim AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# python3.13, not python3: the package name pins the minor version the wheels are built for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.13 python3.13-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# pip lives in a venv of its own (Debian's python3.13 has none outside one) and installs into
# /opt/venv, which gets no pip: only /opt/venv is copied to the runtime stage.
RUN python3.13 -m venv /opt/pip \
    && python3.13 -m venv --without-pip /opt/venv

# Only the lock file is copied before the install, so this layer is rebuilt only when the lock changes.
# Wheels only: the build fails instead of reaching for a compiler that the slim image does not have.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/pip/bin/pip --python /opt/venv/bin/python install --no-cache-dir \
        --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock

# --- runtime: the interpreter, the venv and the `service` package ---
FROM debian:trixie-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000

# The interpreter only (no venv, no pip); ca-certificates for sslmode=verify-full, whose default
# root store is the system's. A fixed, unprivileged UID/GID that Kubernetes' runAsUser/runAsGroup
# repeat; no home, no shell.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.13 ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt/* \
        /var/log/dpkg.log \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# Root-owned and read-only to the service's user: the process cannot change its own code. Compiled
# here, since the read-only root file system lets the service write no bytecode of its own.
COPY service/ ./service/
RUN python -m compileall -q service

USER 10001:10001
EXPOSE 8000

# Docker and Compose use this; Kubernetes ignores it and runs the probes in k8s/base/deployment.yaml.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]

# Python is PID 1 without an init: uvicorn installs its own SIGTERM handler, and with WORKERS > 1
# it reaps its own worker processes. `migrate` instead of `serve` runs the migrations (the Job does).
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]
