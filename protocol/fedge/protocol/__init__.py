"""fedge's wire contract: task specs, model manifests and (later) topics, codecs and sealing.

Pure and small on purpose: no sockets, no files, no clocks. Both the device agent and the
aggregator import it; it imports neither, so the contract cannot drift towards one side.
"""

PROTOCOL_VERSION = 1
