#!/usr/bin/env bash
# Builds fedge's container images with podman, with no registry and no Docker engine:
#   base       a Debian bookworm root made by debootstrap (python3, venv, CA certificates),
#              imported as localhost/fedge-base:bookworm-ARCH. Kept once built (--rebuild-base
#              makes it again).
#   agent      docker/agent.Dockerfile on that base     -> localhost/fedge-agent:VERSION-ARCH
#   aggregator docker/aggregator.Dockerfile on the base -> localhost/fedge-aggregator:VERSION-ARCH
#   FILE=TAG   any other Dockerfile on the base, e.g. docker/broker.Dockerfile=localhost/x:1
# Every build runs with --pull=never and the host's CA bundle mounted read-only, so pip inside a
# build trusts what the host trusts (a TLS-inspecting proxy included). For --arch arm64 the
# host needs qemu-user-static registered with binfmt_misc (Debian's qemu-user-static package).
#
# usage: scripts/container-images.sh [--arch amd64|arm64] [--rebuild-base] TARGET...
# Prints one line per image: "image TAG SIZE_BYTES".
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
# Our podman settings (runc, explicit rlimits); see the file for why.
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/docker/podman/containers.conf}"

arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
rebuild_base=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="$2"; shift 2 ;;
        --arch=*) arch="${1#--arch=}"; shift ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "container-images: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$arch" in
    amd64|arm64) ;;
    *) echo "container-images: --arch must be amd64 or arm64, not '$arch'" >&2; exit 2 ;;
esac
if [ ${#targets[@]} -eq 0 ]; then
    echo "container-images: name at least one target (base, agent, aggregator or FILE=TAG)" >&2
    exit 2
fi
for tool in podman debootstrap; do
    if ! command -v "$tool" >/dev/null && [ ! -x "/usr/sbin/$tool" ]; then
        echo "container-images: $tool is missing (bash scripts/system-deps.sh --containers)" >&2
        exit 1
    fi
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)"
base="localhost/fedge-base:bookworm-$arch"
ca_bundle="${FEDGE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

rootfs_dirs=()
cleanup() {
    local dir
    for dir in "${rootfs_dirs[@]}"; do
        rm -rf "$dir" "$dir.log"
    done
}
trap cleanup EXIT

report() {
    local size
    size="$(podman image inspect --format '{{.Size}}' "$1")"
    echo "image $1 $size"
}

build_base() {
    if [ "$rebuild_base" -eq 0 ] && podman image exists "$base"; then
        report "$base"
        return
    fi
    if [ "$arch" != "$(dpkg --print-architecture)" ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        echo "container-images: no qemu-aarch64 binfmt handler; install qemu-user-static" >&2
        exit 1
    fi
    local root
    root="$(mktemp -d /var/tmp/fedge-rootfs.XXXXXX)"
    # Removed on any exit (an EXIT trap, not RETURN: a RETURN trap stays set after this
    # function and would fire, with `root` out of scope, when any later function returns).
    rootfs_dirs+=("$root")
    echo "container-images: debootstrap bookworm ($arch) into $root" >&2
    if ! debootstrap --arch="$arch" --variant=minbase \
            --include=python3,python3-venv,ca-certificates \
            bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1; then
        tail -n 20 "$root.log" >&2
        rm -f "$root.log"
        exit 1
    fi
    rm -f "$root.log"
    # What an image does not need: package caches and lists, documentation.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    tar --numeric-owner -C "$root" -c . \
        | podman import --arch "$arch" --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    report "$base"
}

build_file() {
    local file="$1" tag="$2"
    podman image exists "$base" || build_base
    podman build --quiet --format docker --pull=never --arch "$arch" \
        --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" \
        -v "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro" \
        -f "$file" -t "$tag" . >/dev/null
    report "$tag"
}

for target in "${targets[@]}"; do
    case "$target" in
        base) build_base ;;
        agent) build_file docker/agent.Dockerfile "localhost/fedge-agent:$version-$arch" ;;
        aggregator) build_file docker/aggregator.Dockerfile "localhost/fedge-aggregator:$version-$arch" ;;
        *=*) build_file "${target%%=*}" "${target#*=}" ;;
        *) echo "container-images: unknown target '$target'" >&2; exit 2 ;;
    esac
done
