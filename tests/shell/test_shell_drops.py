"""fedge.shell.drops: every dropped message counted by reason, the first of each logged once."""

from __future__ import annotations

import logging
import threading

import pytest

from fedge.shell.drops import DroppedMessages

ADVICE = {"blob": "Check who publishes blobs.", "handler": "A bug in fedge."}


def test_the_first_of_each_reason_is_logged_with_its_advice_and_the_rest_only_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("fedge.test.drops")
    dropped = DroppedMessages(log, ADVICE, "messages_dropped in the device status")
    with caplog.at_level(logging.INFO, logger="fedge.test.drops"):
        for _ in range(3):
            dropped.count("blob_too_large", "fedge/v1/f/blob/ab", "70000000 bytes > 67108864")
        dropped.count("handler_error:KeyError", "fedge/v1/f/manifest", "KeyError('x')")
    assert dropped.counts() == {"blob_too_large": 3, "handler_error:KeyError": 1}
    assert dropped["blob_too_large"] == 3 and dropped["never"] == 0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.ERROR,
            "dropped a message on fedge/v1/f/blob/ab (blob_too_large): 70000000 bytes > 67108864. "
            "Check who publishes blobs. Further ones are only counted "
            "(messages_dropped in the device status).",
        ),
        (
            logging.ERROR,
            "dropped a message on fedge/v1/f/manifest (handler_error:KeyError): KeyError('x'). "
            "A bug in fedge. Further ones are only counted (messages_dropped in the device status).",
        ),
    ]


def test_routine_reasons_are_logged_at_info_and_the_traceback_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("fedge.test.drops2")
    dropped = DroppedMessages(log, ADVICE, "x", routine=frozenset({"blob_unwanted"}))
    with caplog.at_level(logging.INFO, logger="fedge.test.drops2"):
        dropped.count("blob_unwanted", "t", "no manifest names it")
        try:
            raise KeyError("boom")
        except KeyError as exc:
            dropped.count("handler_error:KeyError", "t", repr(exc), exc)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.ERROR]
    assert caplog.records[1].exc_info is not None and caplog.records[1].exc_info[0] is KeyError


def test_counts_from_many_threads_add_up_exactly() -> None:
    dropped = DroppedMessages(logging.getLogger("fedge.test.drops3"), {}, "x")

    def flood() -> None:
        for _ in range(2_000):
            dropped.count("inbox_full", "t", "full")

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dropped.counts() == {"inbox_full": 16_000}
