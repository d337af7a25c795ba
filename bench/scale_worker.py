"""One process of ``bench_scale.py``'s simulated fleet: a slice of the devices, one MQTT
connection each, driven by a single event loop.

Why not :class:`mqtt_sim.SimFleet` as it is: it starts a paho network thread per device, and
five thousand threads in one process spend the GIL waking each other up. :class:`LoopFleet` is
a SimFleet whose sockets are served by one ``selectors`` loop through paho's external-loop API
(``loop_read``, ``loop_write``, ``loop_misc``); the devices' work per round -- verify the signed
manifest, random delta, encode, seal with the device's own key, publish QoS 1 -- is SimFleet's
own ``_device_round``, run in the same thread between network passes.

Prints ``ready`` once every device is connected and subscribed, then runs until every device
saw the final manifest and the broker acknowledged every update (or ``--timeout``), disconnects
cleanly and prints one JSON line (its last stdout line): what the devices did per manifest
version (monotonic times, comparable with the observer's), errors, CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from fedge.protocol.sealing import private_key_from_text, public_key_from_text
from fedge.protocol.signing import verify_key_from_text
from mqtt_sim import SimError, SimFleet
from training_worker import emit, rss_fields

#: Seconds between keepalive checks of every connection (paho's ``loop_misc``).
MISC_INTERVAL_S = 5.0
#: Device rounds done between two network passes, so PUBACKs and manifests keep being read.
ROUNDS_PER_PASS = 64
#: Connections opened between two network passes while connecting.
CONNECT_BATCH = 100
KEEPALIVE_S = 120


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to ``wanted`` (the hard limit too, if needed and allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        except (ValueError, OSError):
            pass
    target = hard if hard == resource.RLIM_INFINITY or soft < hard else soft
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class LoopFleet(SimFleet):
    """A :class:`SimFleet` served by one event loop instead of a network thread per device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sel = selectors.DefaultSelector()
        self._masks: dict[int, int] = {}
        self._last_misc = time.monotonic()

    # --- the event loop -------------------------------------------------------------------

    def _sync(self, device: str, client: mqtt.Client) -> None:
        """Writes what paho queued (callbacks only queue); watches the socket for writability
        only while something is left to write; a lost connection is an error."""
        sock = client.socket()
        if sock is None:
            self._lost(device, "connection lost")
            return
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if sock is None:
            self._lost(device, "connection lost while writing")
            return
        fd = sock.fileno()
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        if self._masks.get(fd) != mask:
            self._sel.modify(sock, mask, device)
            self._masks[fd] = mask

    def _lost(self, device: str, what: str) -> None:
        with self._lock:
            self.errors.append(f"{device}: {what}")

    def pump(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            device = key.data
            client = self.clients[device]
            if mask & selectors.EVENT_READ:
                rc = client.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._unregister(key.fileobj)
                    self._lost(device, f"read failed: {mqtt.error_string(rc)}")
                    continue
            if mask & selectors.EVENT_WRITE and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                self._unregister(key.fileobj)
                self._lost(device, "write failed")
                continue
            self._sync(device, client)
        now = time.monotonic()
        if now - self._last_misc >= MISC_INTERVAL_S:
            self._last_misc = now
            for device, client in self.clients.items():
                if client.socket() is not None:
                    client.loop_misc()
                    self._sync(device, client)

    def _unregister(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fileobj)

    def work_pass(self) -> int:
        """Up to ROUNDS_PER_PASS queued manifests handled (SimFleet's device work); returns how many."""
        done = 0
        while done < ROUNDS_PER_PASS and not self._inbox.empty():
            device, frame, arrived = self._inbox.get_nowait()
            done += 1
            if not frame:
                continue
            try:
                self._device_round(device, frame, arrived)
            except Exception as exc:  # reported as a failed run by the benchmark, never swallowed
                with self._lock:
                    self.errors.append(f"{device}: {type(exc).__name__}: {exc}")
            self._sync(device, self.clients[device])
        return done

    # --- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for i, (device, client) in enumerate(self.clients.items()):
            client.connect(self.host, self.port, keepalive=KEEPALIVE_S)  # CONNECT written here
            sock = client.socket()
            if sock is None:
                raise SimError(f"{device}: no socket after connect")
            self._sel.register(sock, selectors.EVENT_READ, device)
            self._masks[sock.fileno()] = selectors.EVENT_READ
            self._sync(device, client)
            if i % CONNECT_BATCH == CONNECT_BATCH - 1:
                self.pump(0.0)
            if time.monotonic() >= deadline:
                raise SimError(f"timed out after {timeout:.0f}s opening {len(self.clients)} connections")
        while len(self._ready) < len(self.clients) and not self.errors:
            if time.monotonic() >= deadline:
                raise SimError(f"timed out after {timeout:.0f}s: {len(self._ready)}/{len(self.clients)} "
                               "devices subscribed")
            self.pump(0.05)
        if self.errors:
            raise SimError(self.errors[0])

    def final_version(self) -> int | None:
        return next((v for v, w in self.work.items() if w.phase == "final"), None)

    def finished(self) -> bool:
        final = self.final_version()
        return (
            final is not None
            and self._inbox.empty()
            and all(v >= final for v in self.seen_version.values())
            and self.all_acknowledged()
        )

    def run(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.errors and time.monotonic() < deadline:
            self.pump(0.0 if not self._inbox.empty() else 0.05)
            self.work_pass()
            if self.finished():
                return True
        return False

    def stop(self) -> None:
        for d, c in self.clients.items():
            if c.socket() is None:
                continue
            # A clean goodbye: the status goes offline, as a stopping agent leaves it.
            c.publish(self.topics.status(d), b"", qos=0, retain=True)
            c.disconnect()
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(c.want_write() and c.socket() for c in self.clients.values()):
            self.pump(0.05)
        self._sel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--keys", type=Path, required=True, help="JSON: device id -> box key")
    parser.add_argument("--aggregator-public", required=True, help="the aggregator's box public key (base64)")
    parser.add_argument("--verify-key", required=True, help="the aggregator's Ed25519 verify key (base64)")
    parser.add_argument("--parameters", type=int, required=True)
    parser.add_argument("--input-dim", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="the whole run, after connecting")
    args = parser.parse_args(argv)
    keys_text: dict[str, str] = json.loads(args.keys.read_text(encoding="utf-8"))
    nofile = raise_nofile(len(keys_text) + 256)
    keys = {d: private_key_from_text(k) for d, k in keys_text.items()}
    fleet = LoopFleet(
        args.host, args.port, args.fleet, keys, public_key_from_text(args.aggregator_public),
        verify_key_from_text(args.verify_key), args.parameters, args.input_dim, seed=args.seed,
    )
    started = time.monotonic()
    finished = False
    connect_s = None
    try:
        fleet.start(args.connect_timeout)
        connect_s = time.monotonic() - started
        print("ready", flush=True)
        finished = fleet.run(args.timeout)
    except SimError as exc:
        fleet.errors.append(str(exc))
    finally:
        fleet.stop()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    work = {
        str(v): {
            **w.to_dict(),
            "sealed_bytes": w.sealed_bytes,
            "busy_s": w.busy_s,
            "first_arrival": w.first_arrival,
            "first_publish": w.first_publish,
            "last_publish": w.last_publish,
        }
        for v, w in fleet.work.items()
    }
    emit({
        "devices": len(keys),
        "connect_s": connect_s,
        "finished": finished,
        "errors": fleet.errors[:20],
        "error_count": len(fleet.errors),
        "work": work,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "nofile_limit": list(nofile),
        **rss_fields(),
    })
    return 0 if finished and not fleet.errors else 1


if __name__ == "__main__":
    sys.exit(main())
