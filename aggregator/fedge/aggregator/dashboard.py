"""The fleet dashboard: one read-only page the aggregator serves beside ``/metrics``.

A building operator wants to *look* at the fleet - which round, how accurate, which devices are
up, what got rejected, what the devices predict - without Grafana or an MQTT client. The page is
three routes on the aggregator's HTTP endpoint (``[metrics]``; bound to localhost unless the
config says otherwise):

- ``/``: a static HTML page (no templating: nothing from the fleet is ever written into HTML);
- ``/dashboard.js``: its script, served separately so the Content-Security-Policy can forbid
  inline script; it fetches ``/api/fleet`` every few seconds and writes every value with
  ``textContent``, so a device-chosen string (a class label in a prediction) can never become
  markup;
- ``/api/fleet``: the view as JSON (``fedge.dashboard/1``), built by :func:`build_view`.

No front-end stack, no external fonts or scripts: it works offline on a gateway. The chart is
an inline SVG drawn by the script.

The view is pure (:func:`build_view`); the service builds it in its own thread whenever it
publishes its status and the route hands out the last one, so the HTTP threads never touch the
round engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedge.protocol.statuses import status_counts, status_number
from fedge.shell.http_endpoint import Response, Route

DASHBOARD_SCHEMA = "fedge.dashboard/1"
#: Rounds of history the chart shows (the newest).
CHART_ROUNDS = 200
#: Predictions listed (the newest per device, newest first).
MAX_PREDICTIONS = 50
#: How often the page refreshes the view, in seconds.
REFRESH_S = 5

_SECURITY_HEADERS = {
    # Only this origin's script and the view; no inline script, no frames, no forms.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def history_points(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per aggregated training round: the fleet's own held-out metric and the mean
    training loss (moments rounds and aborted rounds are not points of the chart)."""
    points: list[dict[str, Any]] = []
    for record in history:
        if record.get("phase") != "train" or record.get("outcome") != "aggregated":
            continue
        points.append(
            {
                "round": record.get("round_number"),
                "version": record.get("version"),
                "accuracy": status_number(record.get("fed_eval_accuracy")),
                "mse": status_number(record.get("fed_eval_mse")),
                "loss": status_number(record.get("train_loss")),
                "reported": record.get("reported"),
                "selected": record.get("selected"),
            }
        )
    return points[-CHART_ROUNDS:]


def prediction_row(device: str, insight: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest prediction of one device as a table row, or None if it is not a
    ``fedge.insight/1`` document (a malformed one is left out, never shown half)."""
    if insight.get("schema") != "fedge.insight/1":
        return None
    prediction = insight.get("prediction")
    window = insight.get("window")
    model = insight.get("model")
    if not isinstance(prediction, dict) or not isinstance(window, dict) or not isinstance(model, dict):
        return None
    version = model.get("version")
    promoted = insight.get("rollout")  # the promoted weights made it (docs/rollout.md)
    if isinstance(promoted, dict) and isinstance(promoted.get("version"), int):
        version = promoted["version"]
    row: dict[str, Any] = {
        "device_id": device,
        "time": status_number(window.get("end")),
        "model_version": version if isinstance(version, int) and not isinstance(version, bool) else None,
    }
    label = prediction.get("label")
    if isinstance(label, str):
        probabilities = prediction.get("probabilities")
        probability = probabilities.get(label) if isinstance(probabilities, dict) else None
        row["prediction"] = label[:64]
        row["confidence"] = status_number(probability)
        return row
    value = status_number(prediction.get("value"))
    if value is None:
        return None
    units = prediction.get("units")
    row["prediction"] = f"{value:.4g}" + (f" {units[:16]}" if isinstance(units, str) and units else "")
    row["confidence"] = None
    return row


def rollout_view(rollout: object) -> dict[str, Any] | None:
    """The rollout gate for the header (docs/rollout.md): the version devices predict with and
    the last decision in a line; None when the status has none."""
    if not isinstance(rollout, dict):
        return None
    last = rollout.get("last_decision")
    last = last if isinstance(last, dict) else {}
    reason = last.get("reason")
    return {
        "gate": rollout.get("gate") is True,
        "promoted_version": rollout.get("promoted_version"),
        "refused": rollout.get("refused"),
        "last": f"{last.get('action')} v{last.get('version')}: {reason[:160]}"
        if isinstance(reason, str)
        else None,
    }


def build_view(
    status: Mapping[str, Any],
    fleet: Mapping[str, Any],
    history: Iterable[Mapping[str, Any]],
    devices: Iterable[Mapping[str, Any]],
    insights: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``/api/fleet`` document.

    ``status`` is the aggregator's status, ``fleet`` its fleet summary (``fedge.fleet/1``, whose
    device counts the view carries as ``counts``),
    ``history`` every closed round (the engine's records), ``devices`` one row per known device
    (``device_id``, ``condition``, ``state``, ``ready``, ``last_seen``), ``insights`` the newest
    insight document per device.
    """
    predictions = [row for device, doc in sorted(insights.items()) if (row := prediction_row(device, doc))]
    predictions.sort(key=lambda row: row["time"] or 0.0, reverse=True)
    return {
        "schema": DASHBOARD_SCHEMA,
        "fleet": status.get("fleet"),
        "time": status.get("time"),
        "round": {
            "state": status.get("state"),
            "phase": status.get("phase"),
            "round_id": status.get("round_id"),
            "completed": status.get("completed_rounds"),
            "planned": status.get("rounds"),
            "version": status.get("version"),
            "generation": status.get("generation"),
            "selected": status.get("selected"),
            "reported": len(status.get("reported") or []),
        },
        "metric": status.get("eval_metric") or "accuracy",
        "counts": status_counts(fleet.get("devices")),  # enrolled, online, stale, ...
        "devices": list(devices),
        "rejected": dict(status.get("rejected_total") or {}),
        "history": history_points(history),
        "predictions": predictions[:MAX_PREDICTIONS],
        "rollout": rollout_view(status.get("rollout")),
    }


def dashboard_routes(view_bytes: Callable[[], bytes]) -> dict[str, Route]:
    """The page, its script and ``/api/fleet`` (``view_bytes``: the last view, as JSON)."""

    def page() -> Response:
        return Response(200, DASHBOARD_HTML.encode(), "text/html; charset=utf-8", _SECURITY_HEADERS)

    def script() -> Response:
        return Response(200, DASHBOARD_JS.encode(), "text/javascript; charset=utf-8", _SECURITY_HEADERS)

    def api() -> Response:
        return Response(200, view_bytes(), "application/json", _SECURITY_HEADERS)

    return {"/": page, "/dashboard.js": script, "/api/fleet": api}


def view_json(view: Mapping[str, Any]) -> bytes:
    return json.dumps(view, sort_keys=True, allow_nan=False).encode()


DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedge fleet</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #1d232b; }
  header { background: #1d3557; color: #fff; padding: 12px 20px; display: flex; gap: 24px;
           align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px;
         padding: 16px 20px; }
  section { background: #fff; border-radius: 6px; padding: 12px 16px; box-shadow: 0 1px 2px #0002; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 8px 3px 0; border-bottom: 1px solid #eee; }
  .big { font-size: 22px; font-weight: 600; }
  .online { color: #2a9d8f; } .offline, .never_seen { color: #999; } .stale { color: #e76f51; }
  .muted { color: #888; } #error { color: #c1121f; }
  svg text { font-size: 11px; fill: #555; }
</style>
</head>
<body>
<header>
  <h1>fedge fleet <span id="fleet"></span></h1>
  <span>round <span class="big" id="round"></span></span>
  <span>phase <b id="phase"></b></span>
  <span>model v<b id="version"></b> (generation <b id="generation"></b>)</span>
  <span>predictions v<b id="promoted"></b> <span class="muted" id="rollout-last"></span></span>
  <span><b id="online"></b> of <b id="devices-total"></b> devices online</span>
  <span class="muted">updated <span id="updated"></span></span>
  <span id="error"></span>
</header>
<main>
  <section>
    <h2><span id="metric-name">accuracy</span> and training loss per round</h2>
    <svg id="chart" viewBox="0 0 460 220" width="100%" role="img" aria-label="metric per round"></svg>
  </section>
  <section>
    <h2>Devices</h2>
    <table><thead><tr><th>device</th><th>condition</th><th>state</th><th>ready</th>
      <th>last status</th></tr></thead><tbody id="devices"></tbody></table>
  </section>
  <section>
    <h2>Rejected updates since start</h2>
    <table><thead><tr><th>reason</th><th>count</th></tr></thead><tbody id="rejected"></tbody></table>
    <p class="muted" id="no-rejections">none</p>
  </section>
  <section>
    <h2>Latest predictions</h2>
    <table><thead><tr><th>device</th><th>window end</th><th>prediction</th><th>confidence</th>
      <th>model</th></tr></thead><tbody id="predictions"></tbody></table>
    <p class="muted" id="no-predictions">none yet</p>
  </section>
</main>
<script src="dashboard.js"></script>
</body>
</html>
"""

DASHBOARD_JS = (
    """"use strict";
const REFRESH_MS = """
    + str(REFRESH_S * 1000)
    + """;
const SVG = "http://www.w3.org/2000/svg";

function text(id, value) { document.getElementById(id).textContent = value == null ? "-" : String(value); }
function when(seconds) {
  if (seconds == null) return "-";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}
function row(cells, cls) {
  const tr = document.createElement("tr");
  for (const [value, c] of cells) {
    const td = document.createElement("td");
    td.textContent = value == null ? "-" : String(value);
    if (c) td.className = c;
    tr.appendChild(td);
  }
  if (cls) tr.className = cls;
  return tr;
}
function fill(id, rows) { const body = document.getElementById(id); body.replaceChildren(...rows); }
function el(name, attrs, content) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (content != null) node.textContent = content;
  return node;
}

function chart(points, metric) {
  const svg = document.getElementById("chart");
  const W = 460, H = 220, L = 40, R = 40, T = 10, B = 30;
  const nodes = [el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}),
                 el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"})];
  const key = metric === "mse" ? "mse" : "accuracy";
  const rounds = points.map(p => p.round);
  const n = points.length;
  if (n > 0) {
    const x = i => L + (n === 1 ? 0 : (W - L - R) * i / (n - 1));
    const series = (values, lo, hi, colour, label, right) => {
      const span = hi - lo || 1;
      const y = v => H - B - (H - T - B) * (v - lo) / span;
      let d = "";
      values.forEach((v, i) => {
        if (v != null) d += (d ? " L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      });
      if (d) {
        nodes.push(el("path", {d: d, fill: "none", stroke: colour, "stroke-width": 2, "data-series": label}));
      }
      nodes.push(el("text", {x: right ? W - R + 4 : 2, y: T + 10, fill: colour}, label));
      nodes.push(el("text", {x: right ? W - R + 4 : 2, y: H - B, fill: colour}, lo.toFixed(2)));
      nodes.push(el("text", {x: right ? W - R + 4 : 2, y: T + 24, fill: colour}, hi.toFixed(2)));
    };
    const m = points.map(p => p[key]);
    const known = m.filter(v => v != null);
    if (known.length) {
      const lo = key === "accuracy" ? 0 : Math.min(...known);
      const hi = key === "accuracy" ? 1 : Math.max(...known);
      series(m, lo, hi, "#1d3557", key, false);
    }
    const loss = points.map(p => p.loss);
    const knownLoss = loss.filter(v => v != null);
    if (knownLoss.length) series(loss, 0, Math.max(...knownLoss), "#e76f51", "loss", true);
    nodes.push(el("text", {x: L, y: H - 8}, "round " + rounds[0]));
    nodes.push(el("text", {x: W - R - 50, y: H - 8}, "round " + rounds[n - 1]));
  }
  svg.setAttribute("data-points", String(n));
  svg.replaceChildren(...nodes);
}

function render(view) {
  text("fleet", view.fleet);
  const r = view.round || {};
  text("round", r.completed == null ? null : r.completed + (r.planned ? " / " + r.planned : ""));
  text("phase", r.state === "done" ? "done" : r.phase);
  text("version", r.version);
  text("generation", r.generation);
  const ro = view.rollout || {};
  const promoted = ro.promoted_version == null ? "newest" : ro.promoted_version;
  text("promoted", ro.gate ? promoted : "newest (gate off)");
  text("rollout-last", ro.last == null ? "" : "(" + ro.last + ", " + ro.refused + " refused)");
  const counts = view.counts || {};
  text("online", counts.online);
  text("devices-total", (view.devices || []).length);
  text("updated", when(view.time));
  text("metric-name", view.metric === "mse" ? "MSE" : "accuracy");
  fill("devices", (view.devices || []).map(d => row([[d.device_id], [d.condition, d.condition], [d.state],
      [d.ready == null ? null : (d.ready ? "yes" : "no")], [when(d.last_seen)]])));
  const rejected = Object.entries(view.rejected || {}).sort((a, b) => b[1] - a[1]);
  fill("rejected", rejected.map(([reason, n]) => row([[reason], [n]])));
  document.getElementById("no-rejections").hidden = rejected.length > 0;
  const predictions = view.predictions || [];
  fill("predictions", predictions.map(p => row([[p.device_id], [when(p.time)], [p.prediction],
      [p.confidence == null ? null : p.confidence.toFixed(2)],
      [p.model_version == null ? null : "v" + p.model_version]])));
  document.getElementById("no-predictions").hidden = predictions.length > 0;
  chart(view.history || [], view.metric);
  document.body.setAttribute("data-loaded", "true");
}

async function refresh() {
  try {
    const answer = await fetch("api/fleet", {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    text("error", "");
  } catch (e) {
    document.getElementById("error").textContent = "cannot reach the aggregator: " + e.message;
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
"""
)
