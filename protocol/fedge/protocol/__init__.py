"""fedge's wire contract: task specs, model manifests, topics, frames, codecs, sealing and signing.

Pure and small on purpose: no sockets, no files, no clocks. Both the device agent and the
aggregator import it; it imports neither, so the contract cannot drift towards one side.
Each contract fact lives in one place: the weights blob in :mod:`fedge.protocol.weights`, the
signed document types in :class:`fedge.protocol.signing.DocType`, the codecs in
:class:`fedge.protocol.codec.Codec`, the rejection reasons in
:class:`fedge.protocol.reasons.RejectReason`, and the errors' field, expected and found values
in :class:`fedge.protocol.errors.FieldError`.
"""

PROTOCOL_VERSION = 1
