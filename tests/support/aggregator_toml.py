"""The least aggregator.toml the loader accepts, for tests of one table's parsing."""

MINIMAL_AGGREGATOR_TOML = """
[aggregator]
fleet = "f1"
model_dir = "model"
state_dir = "state"
registry = "devices.toml"
box_key_file = "keys/aggregator.box"
signing_key_file = "keys/aggregator.sign"

[mqtt]
broker = "mqtt://localhost"
"""
