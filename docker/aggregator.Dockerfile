# syntax=docker/dockerfile:1
# fedge aggregator: rounds, FedAvg, model builds with TensorFlow (tensorflow-cpu, pinned in pyproject).
# Build from the repository root:
#   docker build -f docker/aggregator.Dockerfile -t fedge-aggregator:0.1.0 .
# linux/amd64 only: tensorflow-cpu 2.21.0 has no aarch64 wheel (tensorflow 2.21.0 has one).

# Pinned by tag; in production pin by digest: python:3.11-slim@sha256:<digest>.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# What the gateway runs: the contract, the I/O shell, the aggregator, the agent (its trainer
# evaluates models), the CLI with its tools and the data; no lab/ (the demo), no tests, no
# bench (setup.py).
COPY pyproject.toml setup.py ./
# Dependencies first, from pyproject.toml alone (no parts yet, a placeholder README): this
# layer is rebuilt when the dependencies change, not on every source edit.
RUN touch README.md && pip install --no-cache-dir "./[aggregator]" && pip uninstall --yes fedge
COPY README.md ./
COPY protocol/ protocol/
COPY shell/ shell/
COPY agent/ agent/
COPY aggregator/ aggregator/
COPY tools/ tools/
COPY tasks/ tasks/
COPY edgex_profiles/ edgex_profiles/
RUN pip install --no-cache-dir --no-deps ./

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fedge-aggregator" \
      org.opencontainers.image.description="fedge aggregator: federated rounds over MQTT, signed global models" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    FEDGE_HEALTH_FILE=/var/lib/fedge/heartbeat \
    FEDGE_HEALTH_MAX_AGE_S=120
RUN groupadd --system --gid 10001 fedge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedge --no-create-home \
       --shell /usr/sbin/nologin fedge \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedge \
    && install -d -m 0755 /etc/fedge
COPY --from=builder /opt/venv /opt/venv
# Task specs, for the aggregator's config.
COPY tasks/ /opt/fedge/tasks/
WORKDIR /var/lib/fedge
USER 10001:10001
# State: keys, registry, checkpoints, models. Owned by uid 10001, mode 0700.
VOLUME ["/var/lib/fedge"]
# Healthy means the aggregator's loop touched its heartbeat file recently; with [metrics] enabled
# (off by default: a board opens no port unless told) set FEDGE_HEALTH_URL to its /healthz,
# e.g. -e FEDGE_HEALTH_URL=http://127.0.0.1:9465/healthz, and the check asks it instead
# (200: healthy; 503, refused or no answer in 4 s: not). docs/metrics.md.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, time, urllib.request; u = os.environ.get('FEDGE_HEALTH_URL'); p = os.environ.get('FEDGE_HEALTH_FILE', '/var/lib/fedge/heartbeat'); m = float(os.environ.get('FEDGE_HEALTH_MAX_AGE_S', '120')); sys.exit(0 if (urllib.request.build_opener(urllib.request.ProxyHandler({})).open(u, timeout=4).status == 200 if u else os.path.isfile(p) and time.time() - os.path.getmtime(p) < m) else 1)"]
ENTRYPOINT ["fedge", "aggregator", "run"]
CMD ["--config", "/etc/fedge/aggregator.toml"]
