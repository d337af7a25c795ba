"""The chaos loop's own checks (tests/support/chaos.py) catch what they are there to catch: a
round counted twice or short of what the aggregator accepted, and an update that crossed the
broker and was neither counted nor refused. Fed with the aggregator's real log lines."""

from __future__ import annotations

from typing import Any

from support.chaos import AggregatorLedger, acknowledged_rounds, reconcile_updates

# The aggregator's own lines (after its "2026-12-04 15:09:58,257 INFO fedge.aggregator: " prefix).
LINES = [
    "published manifest v11: train round r0008-v11, 2 devices selected, deadline in 4s",
    "accepted update from watch-01",
    "accepted update from watch-02",
    "round r0008-v11 aggregated: 2/2 devices, fed. eval accuracy 0.8206",
    "published manifest v12: train round r0009-v12, 2 devices selected, deadline in 4s",
    "accepted update from watch-01",
    "resuming from checkpoint: generation 1, version 12, 10 rounds done",
    "accepted update from watch-02",
    "rejected message from watch-02 on fedge/v1/e2e/update/watch-02: no_open_round",
]
PREFIX = "2026-12-04 15:09:58,257 INFO fedge.aggregator: "
LOG = "".join(f"{PREFIX}{line}\n" for line in LINES)


def round_record(round_id: str, reported: int) -> dict[str, Any]:
    return {"round_id": round_id, "reported": reported, "outcome": "aggregated", "phase": "train"}


def test_the_ledger_follows_rounds_across_a_restart() -> None:
    ledger = AggregatorLedger.parse(LOG)
    # The update accepted after "resuming" belongs to no round: the restart aborted r0009.
    assert ledger.accepted == {"r0008-v11": ["watch-01", "watch-02"], "r0009-v12": ["watch-01"]}
    assert ledger.refused == {"watch-02": ["no_open_round"]}


def test_a_consistent_run_has_no_problems() -> None:
    recorded = {("r0008-v11", "watch-01"): 1, ("r0008-v11", "watch-02"): 1, ("r0009-v12", "watch-01"): 1}
    assert reconcile_updates(AggregatorLedger.parse(LOG), recorded, [round_record("r0008-v11", 2)]) == []


def test_a_round_counting_more_than_the_log_accepted_is_reported() -> None:
    problems = reconcile_updates(AggregatorLedger.parse(LOG), {}, [round_record("r0008-v11", 3)])
    assert problems == ["round r0008-v11 counted 3 update(s); the log accepted ['watch-01', 'watch-02']"]


def test_an_update_accepted_twice_in_a_round_is_reported() -> None:
    doubled = "".join(f"{PREFIX}{line}\n" for line in [*LINES[:3], LINES[2], *LINES[3:]])
    problems = reconcile_updates(AggregatorLedger.parse(doubled), {}, [round_record("r0008-v11", 3)])
    assert problems == [
        "round r0008-v11 counted 3 update(s); the log accepted ['watch-01', 'watch-02', 'watch-02']"
    ]


def test_an_update_that_crossed_the_broker_and_was_neither_counted_nor_refused_is_lost() -> None:
    recorded = {("r0008-v11", "watch-01"): 1, ("r0008-v11", "watch-02"): 1, ("r0008-v11", "watch-03"): 1}
    problems = reconcile_updates(AggregatorLedger.parse(LOG), recorded, [round_record("r0008-v11", 2)])
    assert problems == [
        "1 update(s) of watch-03 crossed the broker for aggregated rounds and were neither counted "
        "nor refused (refusals logged: [])"
    ]


def test_a_second_copy_is_accounted_for_by_its_refusal() -> None:
    recorded = {("r0008-v11", "watch-01"): 1, ("r0008-v11", "watch-02"): 2}
    assert reconcile_updates(AggregatorLedger.parse(LOG), recorded, [round_record("r0008-v11", 2)]) == []


def test_a_device_log_tells_which_rounds_the_broker_acknowledged() -> None:
    log = "\n".join(
        f"2026-12-04 15:16:49,491 INFO fedge.agent: {line}"
        for line in [
            "update for round r0016-v19 sealed (22259 bytes, counter 19, message 19)",
            "message 19 acknowledged by the broker",
            "update for round r0017-v20 sealed (22259 bytes, counter 20, message 20)",
            "reconnected in round r0017-v20: sent its update again in case the broker lost it "
            "(counter 20, message 21)",
            "message 21 acknowledged by the broker",
            "update for round r0018-v21 sealed (22259 bytes, counter 21, message 22)",
            "message 7 acknowledged by the broker",  # not an update this log saw sealed
        ]
    )
    assert acknowledged_rounds(log) == {"r0016-v19", "r0017-v20"}  # r0018's was never acknowledged
