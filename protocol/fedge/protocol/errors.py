"""The one exception family fedge raises for bad input.

Every user-facing error derives from :class:`FedgeError`, so the CLI can print a clear
one-line message instead of a traceback, and tests can assert the exact reason.
"""


class FedgeError(Exception):
    """Base class of every error fedge reports to a user instead of crashing."""


class TaskSpecError(FedgeError):
    """A task spec is invalid; the message names the offending field (e.g. ``model.hidden``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"task spec: {field}: {problem}")
        self.field = field
        self.problem = problem


class ManifestError(FedgeError):
    """A model manifest is malformed or does not match the model it describes."""
