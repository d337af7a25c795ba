"""The aggregator's broker connection has Nagle's algorithm off (issue 18).

With manual acks the aggregator writes the PUBACK of a round's last update and, a millisecond
later, the next round's blobs and manifest. With Nagle on, the second write waited for the
broker's delayed ACK of the first (40 ms on Linux): bench_rounds saw the round overhead at
N = 10 grow from 23 to 60 ms. A real Mosquitto, the real service's client."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import create_fleet
from fedge.shell.mqtt import connect

pytest_plugins = ("support.mqtt_fixtures",)


def test_the_aggregator_connects_with_tcp_nodelay(
    tmp_path: Path, har_model_dir: Path, mosquitto: MosquittoBroker
) -> None:
    fleet = create_fleet(tmp_path, "f1", har_model_dir, mosquitto.url, {"watch-01": 1}, {"min_devices": 1})
    service = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    connect(service.client, service.config.mqtt, receive_maximum=service.receive_maximum())
    service.client.loop_start()
    try:
        assert service.connected.wait(10.0), "the aggregator did not connect to the test broker"
        sock = service.client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        service.client.disconnect()
        time.sleep(0.05)
        service.client.loop_stop()
