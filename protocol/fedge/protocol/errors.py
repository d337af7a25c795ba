"""The one exception family fedge raises for bad input.

Every user-facing error derives from :class:`FedgeError`, so the CLI can print a clear
one-line message instead of a traceback, and tests can assert the exact reason.

Errors about one value of a document or message derive from :class:`FieldError`, which carries
the field, what the contract expects there and what was found, as attributes: a caller (the
CLI, a status document, a log line, a test) can report or act on them without parsing the
message, and every part of the contract names them the same way.

Refusals that something counts or branches on carry a short stable ``reason`` code and read
``"{reason}: {detail}"``: :class:`ReasonError`, or :class:`ReasonFieldError` where the field
attributes are known too.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

#: The type of a :class:`ReasonError`'s code: ``str``, or a ``StrEnum`` such as
#: :class:`fedge.protocol.reasons.RejectReason` where the codes are a closed set.
Reason = TypeVar("Reason", bound=str)


class FedgeError(Exception):
    """Base class of every error fedge reports to a user instead of crashing."""


class ReasonError(FedgeError, Generic[Reason]):
    """A refusal with a short stable code: ``reason`` is what counters, logs and tests key on.

    The message is ``"{reason}: {detail}"``. One base, so that every refusal that carries a code
    (signed documents, bounded JSON, EdgeX readings) words and keeps it the same way.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class FieldError(FedgeError):
    """One field of an input is not what the contract allows.

    ``field`` names it as a reader finds it (``model.hidden[0]``, ``weights_bytes``, ``codec``);
    ``expected`` says what the contract allows there and ``found`` what the input held. Each is
    ``None`` where the check that failed does not know it (a schema error may name only the
    field; a message-level error none), so the attributes are there on every subclass and
    filled in wherever the raising check has them. The message is the raiser's own text when it
    gives one (existing messages stay word for word), else built from the three.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        field: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(message if message is not None else self._describe())

    def _describe(self) -> str:
        where = self.field if self.field is not None else "input"
        return f"{where}: expected {self.expected}, found {self.found!r}"


class ReasonFieldError(FieldError, Generic[Reason]):
    """A :class:`FieldError` with a short stable code, worded like a :class:`ReasonError`.

    For the refusals of a message on the wire (frames, sealed messages, payloads): the
    aggregator counts them by ``reason`` and the field attributes say what was wrong where.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        field: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}", field=field, expected=expected, found=found)
        self.reason = reason


class TaskSpecError(FieldError):
    """A task spec is invalid; the message names the offending field (e.g. ``model.hidden``)."""

    def __init__(self, field: str, problem: str, *, expected: Any = None, found: Any = None) -> None:
        super().__init__(f"task spec: {field}: {problem}", field=field, expected=expected, found=found)
        self.problem = problem


class ManifestError(FieldError):
    """A model manifest is malformed or does not match the model it describes."""
