#!/usr/bin/env bash
# Installs (or updates) the fedge device agent on Debian / Raspberry Pi OS. Idempotent: a second
# run with the same arguments changes nothing and says "nothing to do".
#
#   sudo firmware_scripts/install-agent.sh --config agent.toml [--key ID.box] [--source PATH]
#
# What it does, each step only when needed:
#   - apt: python3-venv when `python3 -m venv` is unavailable (--no-apt skips apt entirely);
#   - /opt/fedge/venv: created if missing; `pip install SOURCE[agent]` only when the version
#     installed there differs from SOURCE's version (SOURCE: a wheel, an sdist or a source
#     directory; default: this repository);
#   - /etc/systemd/system/fedge-agent.service (0644): installed when missing or different;
#   - /etc/fedge (0755) and /etc/fedge/agent.toml (0644, see below): the config is copied only
#     when absent. An existing config is never overwritten;
#   - the state directory and the device key (0600) from --key: copied only when absent. An
#     existing key is never overwritten. The directory is laid out as systemd lays out a
#     DynamicUser= StateDirectory: /var/lib/private (0700) holds fedge-agent (0700) and
#     /var/lib/fedge-agent is the symlink private/fedge-agent. A plain /var/lib/fedge-agent
#     directory would make systemd move it at the first start, and that rename fails with EXDEV
#     where /var/lib sits on overlayfs (containers, overlay-root firmware): the agent never starts;
#   - /opt/fedge/tasks (0755): the task specs of this repository's tasks/ (0644), which
#     provision-device.sh's --task names (/opt/fedge/tasks/har-watch.toml); replaced when different;
#   - `systemctl daemon-reload` / `systemctl enable fedge-agent` when systemd is PID 1 and the
#     target is the running system; where systemd is not running (image build, chroot) the unit
#     is still enabled, offline (`systemctl enable` only makes the symlinks), so the image starts
#     the agent at its first boot. Never with --root.
#
# agent.toml is installed 0644, not 0600: the unit runs with DynamicUser=, so the agent is not
# root and cannot read a root-only file in /etc/fedge. Secrets belong in /etc/fedge/agent.env
# (root, 0600, read by PID 1) or in the StateDirectory, never in agent.toml.
#
# --root DIR installs into a staging root (tests, image builds): paths get the DIR prefix,
# non-root users may run it, and systemctl is never called. The venv is created at
# DIR/opt/fedge/venv, so its scripts name that path: for an image, run this script inside the
# chroot (`chroot DIR /path/install-agent.sh ...`) rather than with --root.
#
# Environment (tests, offline installs):
#   FEDGE_PIP_ARGS   extra arguments for pip install, split on spaces
#                    (e.g. "--no-index --find-links /srv/wheels")
#   FEDGE_PYTHON     the Python that creates the venv (default: python3)
set -euo pipefail

PROG=install-agent
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

ROOT=/
SOURCE=$REPO_DIR
CONFIG=""
KEY=""
USE_APT=1
UNIT_SRC=$SCRIPT_DIR/systemd/fedge-agent.service
TASKS_SRC=$REPO_DIR/tasks
PYTHON=${FEDGE_PYTHON:-python3}

usage() {
    cat <<EOF
usage: $PROG [--root DIR] [--source PATH] [--config agent.toml] [--key DEVICE.box] [--no-apt]

  --root DIR       install below DIR instead of / (staging root; systemctl is not called)
  --source PATH    fedge wheel, sdist or source directory (default: $REPO_DIR)
  --config FILE    agent.toml to install as /etc/fedge/agent.toml if that is absent
                   (required unless /etc/fedge/agent.toml exists)
  --key FILE       device key (from provision-device.sh) to install into /var/lib/fedge-agent
                   if no key of that name is there
  --no-apt         never call apt-get (offline, tests)
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a path"; SOURCE=$2; shift 2 ;;
        --config) [ $# -ge 2 ] || die "--config needs a file"; CONFIG=$2; shift 2 ;;
        --key) [ $# -ge 2 ] || die "--key needs a file"; KEY=$2; shift 2 ;;
        --no-apt) USE_APT=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# --- checks, before anything is changed ---------------------------------------------------------

if [ "$ROOT" = / ]; then
    [ "$(id -u)" -eq 0 ] || die "must run as root (or use --root DIR to install into a staging root)"
    P=""
else
    [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
    P=$(realpath -- "$ROOT")
fi

[ -f "$UNIT_SRC" ] || die "unit file $UNIT_SRC not found"
[ -e "$SOURCE" ] || die "--source $SOURCE does not exist"
SOURCE=$(realpath -- "$SOURCE")

ETC=$P/etc/fedge
CONFIG_DST=$ETC/agent.toml
# /var/lib/fedge-agent is what the config names; the files live where DynamicUser= wants them.
STATE=$P/var/lib/fedge-agent
STATE_PRIVATE=$P/var/lib/private/fedge-agent
STATE_LINK_TARGET=private/fedge-agent
VENV=$P/opt/fedge/venv
UNIT_DST=$P/etc/systemd/system/fedge-agent.service
TASKS_DST=$P/opt/fedge/tasks

if [ -n "$CONFIG" ]; then
    [ -f "$CONFIG" ] || die "--config $CONFIG is not a file"
elif [ ! -e "$CONFIG_DST" ]; then
    die "no config: give --config agent.toml (provision-device.sh writes one); $CONFIG_DST does not exist"
fi
if [ -n "$KEY" ]; then
    [ -f "$KEY" ] || die "--key $KEY is not a file"
fi

# The version SOURCE would install: from a wheel's or sdist's name, or a directory's pyproject.
source_version() {
    local name
    if [ -d "$SOURCE" ]; then
        [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE has no pyproject.toml"
        "$PYTHON" -B -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])' "$SOURCE/pyproject.toml" ||
            die "cannot read the version from $SOURCE/pyproject.toml"
        return
    fi
    name=$(basename "$SOURCE")
    case $name in
        fedge-*.whl) name=${name#fedge-}; echo "${name%%-*}" ;;
        fedge-*.tar.gz) name=${name#fedge-}; echo "${name%.tar.gz}" ;;
        *) die "--source $SOURCE: expected fedge-VERSION-*.whl, fedge-VERSION.tar.gz or a directory" ;;
    esac
}
case $SOURCE in
    *.whl | *.tar.gz) source_version >/dev/null ;; # refuse a misnamed file before any change
    *) [ -d "$SOURCE" ] || die "--source $SOURCE: expected a wheel, an sdist or a directory" ;;
esac

CHANGES=0
changed() {
    echo "$PROG: $*"
    CHANGES=$((CHANGES + 1))
}

# Owner for what we create: root when run as root, else (staging) the caller.
OWNER_ARGS=()
if [ "$(id -u)" -eq 0 ]; then
    OWNER_ARGS=(-o root -g root)
fi

# install -d, but reports only what it creates; fixes the mode of an existing directory.
ensure_dir() {
    local mode=$1 dir=$2
    if [ ! -d "$dir" ]; then
        install -d -m "$mode" "${OWNER_ARGS[@]}" "$dir"
        changed "created $dir (mode $mode)"
    elif [ "$(stat -c %a "$dir")" != "${mode#0}" ]; then
        chmod "$mode" "$dir"
        changed "set mode $mode on $dir"
    fi
}

# Copies FILE to DST with MODE only if DST does not exist (configs and keys: never replaced).
copy_if_absent() {
    local mode=$1 src=$2 dst=$3
    if [ -e "$dst" ] || [ -L "$dst" ]; then
        if [ -n "$src" ] && ! cmp -s "$src" "$dst"; then
            echo "$PROG: keeping existing $dst (differs from $src; never overwritten)" >&2
        fi
        return
    fi
    install -m "$mode" "${OWNER_ARGS[@]}" "$src" "$dst"
    changed "installed $dst (mode $mode)"
}

# --- apt --------------------------------------------------------------------------------------

if [ "$USE_APT" -eq 1 ]; then
    # A minimal Debian (debootstrap --variant=minbase) has no python3 at all.
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        command -v apt-get >/dev/null || die "python3 / python3-venv is missing and there is no apt-get"
        [ "$(id -u)" -eq 0 ] || die "python3 / python3-venv is missing; apt-get needs root"
        # A fresh image may have no package lists yet.
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv
        changed "installed python3 and python3-venv (apt)"
    fi
fi

# --- venv and fedge -----------------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (install python3 and python3-venv, or drop --no-apt)"
WANT_VERSION=$(source_version)

if [ ! -x "$VENV/bin/python" ]; then
    ensure_dir 0755 "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    changed "created venv $VENV"
fi
HAVE_VERSION=$(cd / && "$VENV/bin/python" -I -B -c 'import importlib.metadata as m
try:
    print(m.version("fedge"))
except m.PackageNotFoundError:
    pass')
if [ "$HAVE_VERSION" != "$WANT_VERSION" ]; then
    PIP_EXTRA=()
    if [ -n "${FEDGE_PIP_ARGS:-}" ]; then
        read -r -a PIP_EXTRA <<<"$FEDGE_PIP_ARGS"
    fi
    # From /: `python -m pip` puts the working directory on sys.path, and a source checkout
    # there (fedge.egg-info) would look like an installed fedge.
    (cd / && PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "${PIP_EXTRA[@]}" "${SOURCE}[agent]")
    changed "installed fedge ${WANT_VERSION} into $VENV (was: ${HAVE_VERSION:-not installed})"
fi

# --- systemd unit, config, state ----------------------------------------------------------------

ensure_dir 0755 "$(dirname "$UNIT_DST")"
if ! cmp -s "$UNIT_SRC" "$UNIT_DST"; then
    install -m 0644 "${OWNER_ARGS[@]}" "$UNIT_SRC" "$UNIT_DST"
    changed "installed $UNIT_DST"
    UNIT_CHANGED=1
else
    UNIT_CHANGED=0
fi

ensure_dir 0755 "$ETC"
if [ -n "$CONFIG" ]; then
    copy_if_absent 0644 "$CONFIG" "$CONFIG_DST"
fi

# The StateDirectory as systemd makes it for DynamicUser=yes (see the top of this file).
ensure_state_dir() {
    if [ -d "$STATE" ] && [ ! -L "$STATE" ]; then
        # An install from before this layout: systemd moves it into /var/lib/private at the next
        # start (which needs /var/lib on one non-overlay file system). Left as it is.
        ensure_dir 0700 "$STATE"
        echo "$PROG: $STATE is a plain directory; systemd moves it to /var/lib/private at the next start" >&2
        return
    fi
    ensure_dir 0700 "$(dirname "$STATE_PRIVATE")"
    ensure_dir 0700 "$STATE_PRIVATE"
    if [ ! -L "$STATE" ]; then
        [ ! -e "$STATE" ] || die "$STATE exists and is neither a directory nor a symlink"
        ln -s "$STATE_LINK_TARGET" "$STATE"
        changed "linked $STATE -> $STATE_LINK_TARGET"
    elif [ "$(readlink "$STATE")" != "$STATE_LINK_TARGET" ]; then
        die "$STATE points to $(readlink "$STATE"), not $STATE_LINK_TARGET"
    fi
}

if [ -n "$KEY" ]; then
    ensure_state_dir
    copy_if_absent 0600 "$KEY" "$STATE/$(basename "$KEY")"  # through the symlink
fi

# Task specs: shipped with the agent like the unit (never edited on the device), so replaced when
# they differ.
if [ -d "$TASKS_SRC" ]; then
    for task in "$TASKS_SRC"/*.toml; do
        [ -f "$task" ] || continue
        ensure_dir 0755 "$TASKS_DST"
        if ! cmp -s "$task" "$TASKS_DST/$(basename "$task")"; then
            install -m 0644 "${OWNER_ARGS[@]}" "$task" "$TASKS_DST/$(basename "$task")"
            changed "installed $TASKS_DST/$(basename "$task")"
        fi
    done
fi

# --- systemctl ----------------------------------------------------------------------------------

if [ -n "$P" ]; then
    echo "$PROG: staging root $P: not calling systemctl" >&2
elif [ ! -d /run/systemd/system ]; then
    # An image build or a chroot: nothing to reload, but an image must start the agent at boot.
    # Not booted with systemd, systemctl enable/is-enabled work offline (symlinks only).
    if command -v systemctl >/dev/null; then
        echo "$PROG: systemd is not running (chroot or container?): skipping daemon-reload, enabling offline" >&2
        if ! systemctl is-enabled --quiet fedge-agent 2>/dev/null; then
            systemctl enable --quiet fedge-agent
            changed "enabled fedge-agent (offline; it starts at the next boot)"
        fi
    else
        echo "$PROG: systemd is not running and there is no systemctl: skipping daemon-reload and enable" >&2
    fi
else
    if [ "$UNIT_CHANGED" -eq 1 ]; then
        systemctl daemon-reload
        changed "systemctl daemon-reload"
    fi
    if ! systemctl is-enabled --quiet fedge-agent; then
        systemctl enable --quiet fedge-agent
        changed "enabled fedge-agent (start it: systemctl start fedge-agent)"
    fi
fi

if [ "$CHANGES" -eq 0 ]; then
    echo "$PROG: nothing to do"
else
    echo "$PROG: done ($CHANGES change(s))"
fi
