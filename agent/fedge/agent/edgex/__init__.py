"""The agent's EdgeX Foundry side: readings in from the message bus and core-data, into samples.

Pipeline (each stage a small typed module): wire (bytes -> events) -> readings (typed values)
-> samples (aligned, windowed, labelled features) -> store (bounded SQLite) -> trainer.
"""
