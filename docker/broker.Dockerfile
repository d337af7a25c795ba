# syntax=docker/dockerfile:1
# Mosquitto 2.0.11 from Debian bookworm, laid out like eclipse-mosquitto:2.0 (user mosquitto,
# uid/gid 1883; /mosquitto/config, /mosquitto/data, /mosquitto/log). It stands in for
# eclipse-mosquitto where no registry can be reached (tests/deploy/test_kube_play.py runs k8s/ with
# it); 2.0.11 is the version fedge's broker tests run against. Build from the repository root:
#   scripts/container-images.sh docker/broker.Dockerfile=localhost/fedge-broker:2.0.11-amd64
# The configuration is not baked in: mount the directory `fedge broker config` writes
# (--install-dir /mosquitto/config --data-dir /mosquitto/data) at /mosquitto/config.

# A Debian bookworm base (scripts/container-images.sh passes its debootstrap image).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE}
ARG MOSQUITTO_VERSION=2.0.11-1.2+deb12u2
LABEL org.opencontainers.image.title="fedge-broker" \
      org.opencontainers.image.description="Mosquitto (Debian bookworm) laid out like eclipse-mosquitto, for fedge" \
      org.opencontainers.image.version="${MOSQUITTO_VERSION}" \
      org.opencontainers.image.licenses="EPL-2.0 OR EDL-1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The user first, with eclipse-mosquitto's ids: the package's postinst then finds it and
# keeps it (its own would get a random system uid, and k8s/ runs the pod as 1883).
RUN groupadd --system --gid 1883 mosquitto \
    && useradd --system --uid 1883 --gid 1883 --home-dir /var/lib/mosquitto --no-create-home \
       --shell /usr/sbin/nologin mosquitto \
    && apt-get update \
    && apt-get install -y --no-install-recommends "mosquitto=${MOSQUITTO_VERSION}" \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && test "$(id -u mosquitto):$(id -g mosquitto)" = "1883:1883" \
    && install -d -o 1883 -g 1883 -m 0755 /mosquitto/config /mosquitto/data /mosquitto/log
USER 1883:1883
VOLUME ["/mosquitto/data", "/mosquitto/log"]
EXPOSE 1883 8883
# As eclipse-mosquitto, without its entrypoint (a chown for root starts; this image never runs as root).
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
