"""The thin I/O shell shared by the device and the gateway: files and MQTT.

Every fedge service writes state files, reads its private keys and config files, and talks
MQTT; each of those is done once, here, so a fix (an fsync, a file-mode check, a reconnect
rule) reaches the agent, the aggregator, the tools and the lab at the same time.

- :mod:`fedge.shell.files`: atomic writes, private key files, bounded config-file reads.
- :mod:`fedge.shell.mqtt`: the paho client, its connect, and how a connection is logged.

Imports only :mod:`fedge.protocol` and third-party libraries (never the agent or the
aggregator, which both import it), and keeps no global state: every function works on what
it is given. This ``__init__`` imports nothing, so reading a file does not load paho.
"""
