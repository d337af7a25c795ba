#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages fedge's set-up needs, only when something is missing.
# Runs as root (CI) or through sudo; does nothing on a machine that already has everything.
set -euo pipefail

need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv python3-pip)
command -v make >/dev/null || need+=(make)
# The MQTT broker for the tests and `fedge demo` (lab/fedge/lab/broker.py). Debian installs it in
# /usr/sbin, which is not on a normal user's PATH. Where systemd runs, the package also starts
# a system broker on port 1883; fedge's own brokers use free ports and do not need it.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# mosquitto_sub: the BMS guide's command line is run as written (tests/tools/test_fleet_status.py).
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
# The lab CA of `fedge broker config`, and the check of the agent's systemd unit.
command -v openssl >/dev/null || need+=(openssl)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v shellcheck >/dev/null || need+=(shellcheck)  # the board installer scripts
# npm fetches AsyncAPI's JSON Schemas (@asyncapi/specs) that tests/contract validate against.
command -v npm >/dev/null || need+=(npm)
# The fleet dashboard's browser test (tests/e2e/test_dashboard_browser.py): headless Chromium.
command -v chromium >/dev/null || need+=(chromium)
# The container images and their tests (scripts/container-images.sh): podman with runc (crun
# refuses hosts whose cgroups are hybrid v1/v2), and debootstrap for the local base image, since
# no registry is reachable. The systemd-in-a-container and `podman kube play` tests need them too
# (catatonit: the init of kube play's pause image, which podman builds locally).
command -v podman >/dev/null || need+=(podman iptables containernetworking-plugins catatonit)
# The network-fault tests (tests/e2e/test_network_faults.py): a network namespace and a veth
# pair per device (ip), token-bucket rate limits (tc), packet loss and partitions (iptables).
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || need+=(runc)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
# --arm64: the arm64 agent image builds and runs under emulation (make images-arm64).
if [ "${1:-}" = "--arm64" ]; then
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static binfmt-support)
fi

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "system-deps: missing ${need[*]} and no apt-get here; install them by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "system-deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
