"""The rejection reasons: one enum, raised by the protocol modules and documented in order.

docs/protocol.md is what operators read next to ``rejected_total``; these tests keep its
"Rejection reasons" list and its frame reasons equal to :class:`RejectReason` and
:data:`FRAME_REASONS`, and the protocol modules from raising a reason the enum lacks.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from fedge.protocol.reasons import FRAME_PREFIX, FRAME_REASONS, PAYLOAD_PREFIX, RejectReason

REPO = Path(__file__).resolve().parents[2]
PROTOCOL_MD = REPO / "docs" / "protocol.md"
PROTOCOL_SRC = REPO / "protocol" / "fedge" / "protocol"


def _section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, f"docs/protocol.md has no section {title!r}"
    return match.group(1)


def _codes(paragraph: str) -> list[str]:
    """The backticked codes of a ``·``-separated list, without the notes in parentheses (they
    quote settings such as ``max_update_bytes``, which are not reasons)."""
    return re.findall(r"`([^`]+)`", re.sub(r"\([^()]*\)", "", paragraph))


def _documented_reasons() -> list[str]:
    """The list in "Rejection reasons (aggregator)": its one paragraph that starts with a code."""
    paragraphs = [p for p in _section("Rejection reasons (aggregator)").split("\n\n") if p.startswith("`")]
    assert len(paragraphs) == 1, paragraphs
    return _codes(paragraphs[0])


def _first_occurrences(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def test_every_documented_reason_is_a_member() -> None:
    listed = _documented_reasons()
    codes = [c for c in listed if not c.endswith("*")]
    assert [c for c in codes if c not in set(RejectReason)] == []
    # The two families of prefixed frame reasons are listed as patterns, nothing else.
    assert sorted(c for c in listed if c.endswith("*")) == sorted([FRAME_PREFIX + "*", PAYLOAD_PREFIX + "*"])


def test_every_member_is_documented() -> None:
    """A member is named in the list, or is a frame reason the list names as ``frame_*``."""
    listed = set(_documented_reasons()) | set(FRAME_REASONS)
    assert [m.value for m in RejectReason if m not in listed] == []


def test_the_documented_order_is_the_enum_order() -> None:
    codes = _first_occurrences([c for c in _documented_reasons() if not c.endswith("*")])
    assert codes == [m.value for m in RejectReason if m in set(codes)]


def test_the_frames_section_lists_the_frame_reasons_in_order() -> None:
    paragraph = next(p for p in _section("Frames").split("\n\n") if p.startswith("Frame reasons"))
    listed = [c for c in _codes(paragraph) if re.fullmatch(r"[a-z_]+", c)]
    assert listed == [r.value for r in FRAME_REASONS]


def test_members_are_their_codes() -> None:
    """Status JSON, checkpoints and tests compare reasons with plain strings."""
    assert RejectReason.DECRYPT_FAILED == "decrypt_failed"
    assert {RejectReason.LATE: 1} == {"late": 1}
    assert json.dumps({RejectReason.LATE: RejectReason.WRONG_KIND}) == '{"late": "wrong_kind"}'
    assert f"{RejectReason.BAD_MAGIC}: x" == "bad_magic: x"
    assert FRAME_PREFIX + RejectReason.TRUNCATED == "frame_truncated"
    assert len(set(RejectReason)) == len([m.value for m in RejectReason])  # no aliases


def test_every_member_says_what_it_means() -> None:
    """Each member has its ``#:`` comment, so the enum reads as the reference it is."""
    lines = (PROTOCOL_SRC / "reasons.py").read_text(encoding="utf-8").splitlines()
    for member in RejectReason:
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{member.name} = "))
        assert lines[at - 1].strip().startswith("#: "), member.name


def _raised_reasons(module: str, error: str) -> list[ast.expr]:
    """The first argument of every ``error(...)`` call in ``module``."""
    tree = ast.parse((PROTOCOL_SRC / module).read_text(encoding="utf-8"))
    return [
        node.args[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == error
        and node.args
    ]


def _member(arg: ast.expr) -> RejectReason | None:
    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "RejectReason":
        return RejectReason[arg.attr]
    return None


def _is_prefixed_frame_reason(arg: ast.expr) -> bool:
    """``FRAME_PREFIX + exc.reason`` or ``PAYLOAD_PREFIX + exc.reason`` (exc a FrameError)."""
    return (
        isinstance(arg, ast.BinOp)
        and isinstance(arg.op, ast.Add)
        and isinstance(arg.left, ast.Name)
        and arg.left.id in {"FRAME_PREFIX", "PAYLOAD_PREFIX"}
        and isinstance(arg.right, ast.Attribute)
        and arg.right.attr == "reason"
    )


def test_frame_errors_carry_frame_reasons_only() -> None:
    raised = _raised_reasons("framing.py", "FrameError")
    assert raised and all(_member(arg) in FRAME_REASONS for arg in raised), [ast.unparse(a) for a in raised]


@pytest.mark.parametrize(("module", "error"), [("sealing.py", "SealError"), ("messages.py", "MessageError")])
def test_update_errors_carry_members_or_prefixed_frame_reasons(module: str, error: str) -> None:
    raised = _raised_reasons(module, error)
    odd = [ast.unparse(a) for a in raised if _member(a) is None and not _is_prefixed_frame_reason(a)]
    assert raised and odd == []
