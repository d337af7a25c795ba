"""``fedge status``: the fleet at a glance, from the broker's retained topics.

It reads what a building-management system (BMS) reads (``docs/bms.md``): the aggregator's
status (``aggregator/status``), the fleet summary (``aggregator/fleet``), every device's status
(``status/+``) and newest prediction (``insight/+``), as the read-only principal of
``fedge broker config --bms NAME`` (``--username``, ``--password-file``, ``--ca-file``, the same
login options as ``fedge edgex tap``). It publishes nothing.

Retained messages come right after the broker acknowledges a subscription; to know that all of
them are in, the command subscribes once more (to a topic nothing is published on) and stops
when that second acknowledgement arrives: the broker sent the retained messages of the first
one before it. A broker that cannot be reached or refuses the credentials is one line on
stderr (``fedge: error: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fedge.protocol.errors import FedgeError

if TYPE_CHECKING:
    from fedge.protocol.mqtt_settings import MqttSettings

DEFAULT_TIMEOUT_S = 10.0
#: Largest retained JSON document read (a device's status is at most 64 KiB).
MAX_DOCUMENT_BYTES = 1024 * 1024
#: After the broker confirmed the retained messages were sent, a moment for them to be read.
SETTLE_S = 0.1


def _now() -> float:
    return time.time()


@dataclass
class FleetView:
    """What the retained topics of one fleet say (``None``: nothing retained there)."""

    fleet: str
    aggregator_status: dict[str, Any] | None = None
    fleet_summary: dict[str, Any] | None = None
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    insights: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.aggregator_status or self.fleet_summary or self.devices or self.insights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "aggregator_status": self.aggregator_status,
            "fleet_summary": self.fleet_summary,
            "devices": self.devices,
            "insights": self.insights,
            "unreadable": self.unreadable,
        }


def read_fleet(settings: MqttSettings, fleet: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> FleetView:
    """The fleet's retained documents. Raises :class:`FedgeError` (one line) when the broker
    cannot be reached, refuses the connection, or does not answer within ``timeout_s``."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded  # noqa: PLC0415
    from fedge.protocol.config_source import ConfigError  # noqa: PLC0415
    from fedge.protocol.topics import FleetTopics  # noqa: PLC0415
    from fedge.shell.mqtt import connect_failure_hint, make_client  # noqa: PLC0415

    topics = FleetTopics(fleet)
    events: queue.Queue[tuple[str, Any, bytes]] = queue.Queue()
    sentinel = f"{topics.base}/$fedge-status-end"

    def on_connect(c: mqtt.Client, u: object, f: object, reason: Any, p: object = None) -> None:
        events.put(("connect", reason, b""))

    def on_connect_fail(c: mqtt.Client, u: object) -> None:
        events.put(("fail", sys.exc_info()[1], b""))

    def on_subscribe(c: mqtt.Client, u: object, mid: int, reasons: object, p: object = None) -> None:
        events.put(("suback", mid, b""))

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        events.put(("message", message.topic, bytes(message.payload)))

    try:
        client = make_client(settings, persistent=False)
    except ConfigError as exc:  # an unreadable --ca-file: the command's input
        raise FedgeError(str(exc)) from None
    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    view = FleetView(fleet)
    filters = [
        topics.aggregator_status,
        topics.fleet_summary,
        topics.status_filter,
        f"{topics.base}/insight/+",
    ]
    first_mid: int | None = None
    end_mid: int | None = None
    settle_until: float | None = None
    until = time.monotonic() + timeout_s
    client.connect_async(settings.host, settings.port, settings.keepalive)
    client.loop_start()
    try:
        while settle_until is None or time.monotonic() < settle_until:
            remaining = until - time.monotonic()
            if remaining <= 0 and settle_until is None:
                what = "no answer" if first_mid is None else "the retained messages did not all arrive"
                raise FedgeError(f"{what} from the broker at {settings.url} within {timeout_s:g} s")
            try:
                kind, what, payload = events.get(timeout=max(0.01, min(0.2, remaining)))
            except queue.Empty:
                continue
            if kind == "fail":
                hint = connect_failure_hint(what if isinstance(what, BaseException) else None, settings)
                raise FedgeError(f"cannot connect to the broker at {settings.url}: {what}; check: {hint}")
            if kind == "connect":
                if what.is_failure:
                    raise FedgeError(
                        f"the broker at {settings.url} refused the connection: {what} (check --username "
                        "and --password-file: a BMS principal of fedge broker config --bms)"
                    )
                first_mid = client.subscribe([(f, 0) for f in filters])[1]
            elif kind == "suback" and what == first_mid:
                end_mid = client.subscribe(sentinel, qos=0)[1]
            elif kind == "suback" and what == end_mid:
                settle_until = time.monotonic() + SETTLE_S
            elif kind == "message" and payload:
                try:
                    document = loads_bounded(payload, max_bytes=MAX_DOCUMENT_BYTES)
                except BoundedJsonError:
                    document = None
                if not isinstance(document, dict):
                    view.unreadable.append(str(what))
                    continue
                _keep(view, topics.base, str(what), document)
    finally:
        client.loop_stop()
        client.disconnect()
    view.unreadable.sort()
    return view


def _keep(view: FleetView, base: str, topic: str, document: dict[str, Any]) -> None:
    rest = topic[len(base) + 1 :]
    if rest == "aggregator/status":
        view.aggregator_status = document
    elif rest == "aggregator/fleet":
        view.fleet_summary = document
    elif rest.startswith("status/"):
        view.devices[rest.removeprefix("status/")] = document
    elif rest.startswith("insight/"):
        view.insights[rest.removeprefix("insight/")] = document


# --- rendering (pure) ----------------------------------------------------------------------------


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _age(then: object, now: float) -> str:
    if not isinstance(then, int | float) or isinstance(then, bool):
        return "-"
    seconds = max(0.0, now - float(then))
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def _counts(counts: object) -> str:
    if not isinstance(counts, dict) or not counts:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _insight(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "-"
    prediction = doc.get("prediction")
    if not isinstance(prediction, dict):
        return "?"
    if "label" in prediction:
        probabilities = prediction.get("probabilities")
        p = probabilities.get(prediction["label"]) if isinstance(probabilities, dict) else None
        return f"{prediction['label']}" + (f" ({p:.2f})" if isinstance(p, int | float) else "")
    value, units = prediction.get("value"), prediction.get("units")
    return f"{_fmt(value, '.4g')}" + (f" {units}" if units else "")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def render_text(view: FleetView, now: float) -> str:
    """The terminal view; ``now`` (Unix seconds) for the ages."""
    lines = []
    agg, summary = view.aggregator_status, view.fleet_summary
    if agg is None:
        lines.append(f"fleet {view.fleet}: no aggregator status (has the aggregator of this fleet started?)")
    else:
        lines.append(
            f"fleet {view.fleet}: aggregator {_fmt(agg.get('state'))}, phase {_fmt(agg.get('phase'))}, "
            f"model v{_fmt(agg.get('version'))} (generation {_fmt(agg.get('generation'))}), "
            f"round {_fmt(agg.get('round_id'))}, "
            f"{_fmt(agg.get('completed_rounds'))}/{_fmt(agg.get('rounds'))} rounds, "
            f"updated {_age(agg.get('time'), now)}"
        )
    if summary is not None:
        d = summary.get("devices") if isinstance(summary.get("devices"), dict) else {}
        assert isinstance(d, dict)
        lines.append(
            f"devices: {_fmt(d.get('enrolled'))} enrolled: {_fmt(d.get('online'))} online, "
            f"{_fmt(d.get('stale'))} stale, {_fmt(d.get('offline'))} offline, "
            f"{_fmt(d.get('never_seen'))} never seen, {_fmt(d.get('not_ready'))} not ready"
        )
        for key, what in (("stale_ids", "stale"), ("offline_ids", "offline"), ("not_ready_ids", "not ready")):
            ids = d.get(key)
            if isinstance(ids, list) and ids:
                lines.append(f"  {what}: {', '.join(map(str, ids))}")
        last = summary.get("last_round")
        if isinstance(last, dict):
            lines.append(
                f"last round: {_fmt(last.get('round_id'))} "
                f"({_fmt(last.get('phase'))}, {_fmt(last.get('outcome'))}): "
                f"{_fmt(last.get('participants'))}/{_fmt(last.get('selected'))} devices, "
                f"{_fmt(last.get('metric'))} {_fmt(last.get('value'), '.4f')}, "
                f"fed. eval loss {_fmt(last.get('fed_eval_loss'), '.4f')}"
            )
        else:
            lines.append("last round: none yet")
        lines.append(f"rejected updates: {_counts(summary.get('rejected_total'))}")
    elif agg is not None:
        lines.append("fleet summary: not published (an aggregator older than fedge.fleet/1?)")
    lines.append("")
    ids = sorted(set(view.devices) | set(view.insights))
    if ids:
        rows = [["DEVICE", "STATE", "READY", "MODEL", "ROUND", "SAMPLES", "UPDATED", "INSIGHT"]]
        for device in ids:
            s = view.devices.get(device, {})
            model = s.get("model_version")
            rows.append(
                [
                    device,
                    _fmt(s.get("state")),
                    _fmt(s.get("ready")),
                    "-" if model is None else f"v{model}",
                    _fmt(s.get("round_id")),
                    _fmt(s.get("samples")),
                    _age(s.get("time"), now),
                    _insight(view.insights.get(device)),
                ]
            )
        lines += _table(rows)
    else:
        lines.append("no device statuses")
    if view.unreadable:
        lines.append(f"unreadable (not a JSON object): {', '.join(view.unreadable)}")
    return "\n".join(lines) + "\n"


# --- the command ---------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> MqttSettings:
    from fedge.tools.edgex_tap import client_settings, read_password_file  # noqa: PLC0415

    return client_settings(
        args.broker,
        "fedge-status",
        username=args.username,
        password=None if args.password_file is None else read_password_file(args.password_file),
        ca_file=args.ca_file,
    )


def cmd_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from fedge.protocol.topics import check_id  # noqa: PLC0415

    out = sys.stdout if out is None else out
    check_id(args.fleet, "fleet id")
    if not args.timeout > 0:
        raise FedgeError("--timeout must be > 0 seconds")
    settings = settings_from_args(args)
    view = read_fleet(settings, args.fleet, args.timeout)
    if view.empty and not view.unreadable:
        raise FedgeError(
            f"nothing retained under fedge/v1/{args.fleet}/ that this principal may read: check --fleet "
            "(and that --username is a BMS principal of this fleet)"
        )
    if args.json:
        out.write(json.dumps(view.to_dict(), indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_text(view, _now()))
    return 0


def add_parser(subparsers: Any) -> None:
    """Adds ``fedge status`` to the subparsers of ``fedge``."""
    st = subparsers.add_parser(
        "status",
        help="the fleet at a glance, from the broker's retained topics (read-only, as a BMS)",
        description="Print the fleet's retained aggregator status, fleet summary, device statuses "
        "and predictions (docs/bms.md). Connects as a read-only principal and publishes nothing.",
    )
    st.add_argument("--broker", required=True, help="the fleet's broker, mqtt[s]://host:port")
    st.add_argument("--fleet", required=True, help="the fleet id")
    st.add_argument("--username", help="broker username: a BMS principal of fedge broker config --bms")
    st.add_argument(
        "--password-file", type=Path, help="file holding the password, one line, mode 0600 (0400)"
    )
    st.add_argument("--ca-file", help="the CA that signed the broker's certificate (mqtts://)")
    st.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for the broker (default {DEFAULT_TIMEOUT_S:g})",
    )
    st.add_argument("--json", action="store_true", help="print the retained documents as JSON")
    st.set_defaults(func=cmd_status)
