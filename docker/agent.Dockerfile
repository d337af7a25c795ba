# syntax=docker/dockerfile:1
# fedge device agent: LiteRT only (never TensorFlow, never data-set packages).
# Build from the repository root, for a board or for several platforms at once:
#   docker build -f docker/agent.Dockerfile -t fedge-agent:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/agent.Dockerfile -t fedge-agent:0.1.0 .
# ai-edge-litert 2.3.0 ships manylinux_2_27 wheels for x86_64 and aarch64 (no 32-bit armv7).
# How to run it on a board: docs/deploy.md, "The agent on an ARM board: Docker".

# Pinned by tag; in production pin by digest: python:3.11-slim@sha256:<digest>.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what a device runs: the contract, the I/O shell, the agent, the CLI with its tools and
# the data (setup.py builds the parts whose folders are present); no aggregator/ (TensorFlow
# code), no lab/ (the demo), no tests, no bench.
COPY pyproject.toml setup.py ./
# Dependencies first, from pyproject.toml alone (no parts yet, a placeholder README): this
# layer is rebuilt when the dependencies change, not on every source edit.
RUN touch README.md && pip install --no-cache-dir "./[agent]" && pip uninstall --yes fedge
COPY README.md ./
COPY protocol/ protocol/
COPY shell/ shell/
COPY agent/ agent/
COPY tools/ tools/
COPY tasks/ tasks/
COPY edgex_profiles/ edgex_profiles/
RUN pip install --no-cache-dir --no-deps ./

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fedge-agent" \
      org.opencontainers.image.description="fedge device agent: on-device LiteRT training, sealed MQTT updates" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FEDGE_HEALTH_FILE=/var/lib/fedge/heartbeat \
    FEDGE_HEALTH_MAX_AGE_S=120
RUN groupadd --system --gid 10001 fedge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedge --no-create-home \
       --shell /usr/sbin/nologin fedge \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedge \
    && install -d -m 0755 /etc/fedge
COPY --from=builder /opt/venv /opt/venv
# Task specs, for [data] task = "/opt/fedge/tasks/<task>.toml" in the agent's config.
COPY tasks/ /opt/fedge/tasks/
WORKDIR /var/lib/fedge
USER 10001:10001
# State: keys, sample store, device state, outbox. Owned by uid 10001, mode 0700.
VOLUME ["/var/lib/fedge"]
# Healthy means the agent's loop touched its heartbeat file recently; with [metrics] enabled
# (off by default: a board opens no port unless told) set FEDGE_HEALTH_URL to its /healthz,
# e.g. -e FEDGE_HEALTH_URL=http://127.0.0.1:9464/healthz, and the check asks it instead
# (200: healthy; 503, refused or no answer in 4 s: not). docs/metrics.md.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, time, urllib.request; u = os.environ.get('FEDGE_HEALTH_URL'); p = os.environ.get('FEDGE_HEALTH_FILE', '/var/lib/fedge/heartbeat'); m = float(os.environ.get('FEDGE_HEALTH_MAX_AGE_S', '120')); sys.exit(0 if (urllib.request.build_opener(urllib.request.ProxyHandler({})).open(u, timeout=4).status == 200 if u else os.path.isfile(p) and time.time() - os.path.getmtime(p) < m) else 1)"]
ENTRYPOINT ["fedge", "agent", "run"]
CMD ["--config", "/etc/fedge/agent.toml"]
