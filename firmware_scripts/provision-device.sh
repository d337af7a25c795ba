#!/usr/bin/env bash
# Provisions one device: its X25519 key (`fedge keys device`) and its agent.toml. Idempotent:
# an existing key is kept (never overwritten without --force) and an identical agent.toml is
# left alone. Prints the device's enrollment record on stdout (everything else goes to stderr),
# so `provision-device.sh ... > gw-0042.record` feeds `fedge enroll --record gw-0042.record`.
#
#   firmware_scripts/provision-device.sh --id gw-0042 --fleet building-a \
#       --broker mqtts://broker.lan:8883 --aggregator-key KEY --verify-key KEY \
#       --edgex-device gw-0042-imu --task /opt/fedge/tasks/har-watch.toml --out ./gw-0042
#
# Writes OUT/ID.box (0600, from fedge) and OUT/agent.toml (0600); install both on the device with
# `install-agent.sh --config OUT/agent.toml --key OUT/ID.box`. The config names the key where
# the agent finds it on the device (--device-key-path, default /var/lib/fedge-agent/ID.box).
#
# The agent makes two broker connections, each its own principal of `fedge broker config`:
# the fleet connection as ID and, when the EdgeX bus is the fleet broker, the EdgeX connection
# as ID.edgex (the broker uses the username as client id, so one username for both would make
# them take each other's session over; and only ID.edgex may read the device's EdgeX readings).
# agent.toml names both usernames; their passwords go into /etc/fedge/agent.env.
set -euo pipefail

PROG=provision-device

ID="" FLEET="" BROKER="" AGG_KEY="" EDGEX_DEVICE="" TASK="" OUT="" CONFIG=""
USERNAME="" EDGEX_USERNAME=""
VERIFY_KEYS=()
FEDGE=""
FORCE=0
JSON=0
STATE_DIR=/var/lib/fedge-agent
KEY_PATH=""

usage() {
    cat <<EOF
usage: $PROG --id ID --fleet FLEET --broker URL --aggregator-key KEY --verify-key KEY
       [--verify-key KEY ...] --task PATH [--edgex-device NAME] --out DIR
       [--username NAME] [--edgex-username NAME]
       [--config FILE] [--device-key-path PATH] [--fedge BIN] [--force] [--json]

  --id ID                device id (also the key's file name: DIR/ID.box)
  --fleet FLEET          fleet id
  --broker URL           the fleet's MQTT broker (mqtt://host:1883, mqtts://host:8883)
  --aggregator-key KEY   the aggregator's X25519 public key (updates are sealed to it)
  --verify-key KEY       an aggregator Ed25519 verify key (repeat for several)
  --task PATH            the task spec on the device (e.g. /opt/fedge/tasks/har-watch.toml)
  --edgex-device NAME    the EdgeX device whose readings this agent trains on (default: ID)
  --out DIR              where the key and agent.toml are written (created 0700)
  --username NAME        the device's broker username (default: ID, as fedge broker config names it)
  --edgex-username NAME  the username of its EdgeX-bus connection on the fleet broker
                         (default: ID.edgex, as fedge broker config names it)
  --config FILE          agent.toml path (default: DIR/agent.toml)
  --device-key-path P    the key's path on the device (default: $STATE_DIR/ID.box)
  --fedge BIN            the fedge command (default: /opt/fedge/venv/bin/fedge, else fedge on PATH)
  --force                replace an existing key and a differing agent.toml
  --json                 print the enrollment record as JSON
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

need_arg() {
    [ "$2" -ge 2 ] || die "$1 needs a value"
}

while [ $# -gt 0 ]; do
    case $1 in
        --id) need_arg "$1" $#; ID=$2; shift 2 ;;
        --fleet) need_arg "$1" $#; FLEET=$2; shift 2 ;;
        --broker) need_arg "$1" $#; BROKER=$2; shift 2 ;;
        --aggregator-key) need_arg "$1" $#; AGG_KEY=$2; shift 2 ;;
        --verify-key) need_arg "$1" $#; VERIFY_KEYS+=("$2"); shift 2 ;;
        --edgex-device) need_arg "$1" $#; EDGEX_DEVICE=$2; shift 2 ;;
        --task) need_arg "$1" $#; TASK=$2; shift 2 ;;
        --out) need_arg "$1" $#; OUT=$2; shift 2 ;;
        --username) need_arg "$1" $#; USERNAME=$2; shift 2 ;;
        --edgex-username) need_arg "$1" $#; EDGEX_USERNAME=$2; shift 2 ;;
        --config) need_arg "$1" $#; CONFIG=$2; shift 2 ;;
        --device-key-path) need_arg "$1" $#; KEY_PATH=$2; shift 2 ;;
        --fedge) need_arg "$1" $#; FEDGE=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        --json) JSON=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

missing=()
[ -n "$ID" ] || missing+=(--id)
[ -n "$FLEET" ] || missing+=(--fleet)
[ -n "$BROKER" ] || missing+=(--broker)
[ -n "$AGG_KEY" ] || missing+=(--aggregator-key)
[ ${#VERIFY_KEYS[@]} -gt 0 ] || missing+=(--verify-key)
[ -n "$TASK" ] || missing+=(--task)
[ -n "$OUT" ] || missing+=(--out)
[ ${#missing[@]} -eq 0 ] || { usage >&2; die "missing ${missing[*]}"; }

# Values go into TOML basic strings: refuse anything that would need escaping.
for value in "$ID" "$FLEET" "$BROKER" "$AGG_KEY" "${VERIFY_KEYS[@]}" "$EDGEX_DEVICE" "$TASK" "$KEY_PATH"; do
    case $value in
        *'"'* | *\\* | *$'\n'* | *$'\r'* | *$'\t'*) die "value contains a quote, backslash or control character: $value" ;;
    esac
done
[[ $ID =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "invalid device id '$ID': use 1-64 letters, digits, '_', '.', '-'"
USERNAME=${USERNAME:-$ID}
EDGEX_USERNAME=${EDGEX_USERNAME:-$ID.edgex}
for name in "$USERNAME" "$EDGEX_USERNAME"; do
    [[ $name =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "invalid username '$name': use 1-64 letters, digits, '_', '.', '-'"
done
[ "$USERNAME" != "$EDGEX_USERNAME" ] ||
    die "--edgex-username must differ from --username: each connection needs its own principal"
case $BROKER in
    mqtt://* | mqtts://* | ws://* | wss://*) ;;
    *) die "--broker must be an mqtt://, mqtts://, ws:// or wss:// URL, not $BROKER" ;;
esac

if [ -z "$FEDGE" ]; then
    if [ -x /opt/fedge/venv/bin/fedge ]; then
        FEDGE=/opt/fedge/venv/bin/fedge
    else
        FEDGE=$(command -v fedge) || die "fedge not found (install it, or give --fedge BIN)"
    fi
fi
[ -x "$FEDGE" ] || die "--fedge $FEDGE is not executable"
# The Python next to fedge reads an existing key's public half (the key itself is never printed).
PYTHON=$(dirname "$FEDGE")/python
[ -x "$PYTHON" ] || PYTHON=python3

EDGEX_DEVICE=${EDGEX_DEVICE:-$ID}
KEY_PATH=${KEY_PATH:-$STATE_DIR/$ID.box}
CONFIG=${CONFIG:-$OUT/agent.toml}
KEY_FILE=$OUT/$ID.box

# --- the key ------------------------------------------------------------------------------------

if [ -e "$KEY_FILE" ] && [ "$FORCE" -eq 0 ]; then
    PUBLIC_KEY=$("$PYTHON" -B -c 'import sys
from pathlib import Path
from fedge.tools.keys import read_private_key_file
from fedge.protocol.sealing import key_to_text
print(key_to_text(read_private_key_file(Path(sys.argv[1]), "box").public_key))' "$KEY_FILE") ||
        die "cannot read the existing key $KEY_FILE (replace it with --force)"
    echo "$PROG: keeping existing key $KEY_FILE" >&2
else
    force_args=()
    [ "$FORCE" -eq 0 ] || force_args=(--force)
    record_json=$("$FEDGE" keys device --id "$ID" --out "$OUT" --json "${force_args[@]}") ||
        die "fedge keys device failed"
    PUBLIC_KEY=$("$PYTHON" -B -c 'import json, sys; print(json.loads(sys.argv[1])["public_key"])' "$record_json")
    echo "$PROG: created key $KEY_FILE" >&2
fi

# --- agent.toml ---------------------------------------------------------------------------------

verify_list=""
for key in "${VERIFY_KEYS[@]}"; do
    verify_list+="${verify_list:+, }\"$key\""
done

config_text=$(
    cat <<EOF
# fedge agent config for device $ID (written by provision-device.sh). No secrets in here:
# the passwords go into /etc/fedge/agent.env (FEDGE_AGENT__MQTT__PASSWORD=... from
# credentials/$USERNAME.txt, FEDGE_AGENT__EDGEX__PASSWORD=... from credentials/$EDGEX_USERNAME.txt).
[agent]
device_id = "$ID"
fleet = "$FLEET"
state_dir = "$STATE_DIR"
key_file = "$KEY_PATH"
aggregator_public_key = "$AGG_KEY"
aggregator_verify_keys = [$verify_list]

[mqtt]
broker = "$BROKER"
username = "$USERNAME"

[data]
source = "edgex"
task = "$TASK"

[edgex]
device = "$EDGEX_DEVICE"
# The EdgeX bus is the fleet broker; the agent connects to it as a principal of its own.
username = "$EDGEX_USERNAME"
EOF
)

if [ -e "$CONFIG" ] && [ "$(cat "$CONFIG")" = "$config_text" ]; then
    echo "$PROG: $CONFIG is up to date" >&2
elif [ -e "$CONFIG" ] && [ "$FORCE" -eq 0 ]; then
    die "$CONFIG exists with different settings; refusing to overwrite it (use --force)"
else
    mkdir -p "$(dirname "$CONFIG")"
    tmp=$(mktemp "$(dirname "$CONFIG")/.agent.toml.XXXXXX")
    printf '%s\n' "$config_text" >"$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$CONFIG"
    echo "$PROG: wrote $CONFIG" >&2
fi

# --- the enrollment record ----------------------------------------------------------------------

if [ "$JSON" -eq 1 ]; then
    printf '{"id": "%s", "public_key": "%s"}\n' "$ID" "$PUBLIC_KEY"
else
    printf '"%s" = "%s"\n' "$ID" "$PUBLIC_KEY"
fi
