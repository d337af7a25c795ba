# syntax=docker/dockerfile:1
# TEST IMAGE, not a product: a clean Debian bookworm root with systemd as PID 1, into which
# firmware_scripts/install-agent.sh installs the agent exactly as on a board, twice (the second
# run must change nothing). tests/deploy/test_systemd_container.py boots it with podman and checks the
# shipped fedge-agent.service under a real systemd: READY, STATUS, the watchdog, the journal.
#
# Build it (no registry: the base is made by debootstrap, the host's CA bundle is mounted for pip):
#   bash scripts/container-images.sh docker/systemd-agent.Dockerfile=localhost/fedge-systemd-agent:test
ARG BASE_IMAGE=localhost/fedge-base:bookworm-amd64
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# systemd as init; libnss-systemd resolves the unit's DynamicUser name. Unpinned on purpose:
# the test follows Debian 12's systemd, like a board tracking bookworm.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends systemd systemd-sysv libnss-systemd procps \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    # Units that have nothing to do in a container and only slow the boot down.
    && systemctl mask systemd-logind.service getty.target console-getty.service \
        systemd-udevd.service systemd-udev-trigger.service systemd-hwdb-update.service \
        systemd-modules-load.service sys-kernel-config.mount sys-kernel-debug.mount \
        sys-kernel-tracing.mount systemd-remount-fs.service

# Only what the device side needs (see systemd-agent.Dockerfile.dockerignore).
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protocol/ protocol/
COPY shell/ shell/
COPY agent/ agent/
COPY tools/ tools/
COPY tasks/ tasks/
COPY edgex_profiles/ edgex_profiles/
COPY firmware_scripts/ firmware_scripts/

# The installer, twice. The config and key here are placeholders (the installer does not read
# them; the test replaces both with an enrolled device's before the first boot). PIP_CERT: pip
# trusts the system bundle (the build mounts the host's there) rather than its own certifi.
RUN install -d -m 0700 /tmp/dev \
    && printf '# placeholder: replaced before the first boot\n[agent]\ndevice_id = "placeholder"\n' \
        > /tmp/dev/agent.toml \
    && python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' \
        > /tmp/dev/placeholder.box \
    && chmod 0600 /tmp/dev/placeholder.box \
    && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    && firmware_scripts/install-agent.sh --source /src --config /tmp/dev/agent.toml \
        --key /tmp/dev/placeholder.box \
    && firmware_scripts/install-agent.sh --source /src --config /tmp/dev/agent.toml \
        --key /tmp/dev/placeholder.box | tee /tmp/second-run.log \
    && grep -qx 'install-agent: nothing to do' /tmp/second-run.log \
    && systemctl is-enabled fedge-agent \
    && /opt/fedge/venv/bin/fedge --help >/dev/null \
    && rm -rf /tmp/dev /tmp/second-run.log /root/.cache

WORKDIR /
# systemd's own stop signal; podman --systemd=always also sets it.
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
