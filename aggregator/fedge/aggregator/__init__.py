"""fedge's gateway side: builds and converts models, runs federated rounds, aggregates updates.

Imports TensorFlow (for building models only) and ``protocol``; never ``agent``.
"""
