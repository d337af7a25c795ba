"""Which live predictions are published (``[insight]``), and why the others are not: the pure
policy (``fedge.agent.insight.InsightPolicy``), the publisher's counting and logging without a
model, the bounded window buffer and the har-watch replay's timing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedge.agent.config import InsightSettings
from fedge.agent.insight import (
    SKIP_REASONS,
    InsightError,
    InsightPolicy,
    InsightPublisher,
    Prediction,
    prediction_from_output,
)
from fedge.agent.live import LiveWindow, LiveWindowBuffer, LiveWindows
from fedge.lab.har_watch import LiveReplay
from fedge.protocol.task import TaskSpec
from support.tasks import task_variant

NOW = 1_700_000_000.0
ZERO = dict.fromkeys(SKIP_REASONS, 0)


def label(name: str) -> Prediction:
    return Prediction(label=name, class_index=0, probabilities={name: 1.0})


def value(v: float) -> Prediction:
    return Prediction(value=v, units="ppm")


def offer(
    policy: InsightPolicy,
    prediction: Prediction,
    now: float,
    *,
    window_end: float | None = None,
    version: int = 3,
    have_model: bool = True,
    connected: bool = True,
) -> str:
    """What the publisher does with one window: its skip reason (counted), or "published"."""
    end = now - 1.0 if window_end is None else window_end
    reason = policy.before_inference(end, now, have_model, connected)
    if reason is None:
        reason = policy.after_inference(prediction, version)
    if reason is not None:
        policy.skip(reason)
        return reason
    policy.published(now, end, prediction, version)
    return "published"


def skipped(**counts: int) -> dict[str, int]:
    return {**ZERO, **counts}


def test_the_defaults_publish_on_change_at_most_once_a_minute_and_refuse_windows_older_than_15_min() -> None:
    assert InsightSettings() == InsightSettings("on_change", 60.0, 0.0, 900.0)


def test_every_window_without_an_interval_publishes_every_window() -> None:
    policy = InsightPolicy(InsightSettings(publish="every_window", min_interval_s=0.0))
    outcomes = [offer(policy, label("ABD"), NOW + i) for i in range(5)]
    assert outcomes == ["published"] * 5
    assert policy.report() == {
        "publish": "every_window",
        "published": 5,
        "skipped": ZERO,
        "last": {"time": NOW + 4, "window_end": NOW + 3, "model_version": 3, "label": "ABD"},
    }


def test_min_interval_allows_one_publication_per_interval_and_no_exception() -> None:
    policy = InsightPolicy(InsightSettings(publish="every_window", min_interval_s=60.0))
    times = [0.0, 1.0, 59.9, 60.0, 61.0, 130.0]
    predictions = [label("ABD"), label("PEN"), label("ROW"), label("ROW"), label("FEL"), label("FEL")]
    outcomes = [offer(policy, p, NOW + t) for p, t in zip(predictions, times, strict=True)]
    assert outcomes == ["published", "rate_limited", "rate_limited", "published", "rate_limited", "published"]
    # A new model version inside the interval waits too.
    assert offer(policy, label("FEL"), NOW + 131.0, version=4) == "rate_limited"
    assert policy.report()["skipped"] == skipped(rate_limited=4)
    assert policy.report()["published"] == 3


def test_on_change_publishes_a_new_class_or_a_new_model_and_counts_the_rest_unchanged() -> None:
    policy = InsightPolicy(InsightSettings(publish="on_change", min_interval_s=0.0))
    steps = [
        (label("ABD"), 3),
        (label("ABD"), 3),
        (label("ABD"), 3),
        (label("PEN"), 3),
        (label("PEN"), 4),  # the same class from the next global model: news
        (label("PEN"), 4),
        (label("ABD"), 4),
    ]
    outcomes = [offer(policy, p, NOW + i, version=v) for i, (p, v) in enumerate(steps)]
    assert outcomes == [
        "published",
        "unchanged",
        "unchanged",
        "published",
        "published",
        "unchanged",
        "published",
    ]
    report = policy.report()
    assert report["skipped"] == skipped(unchanged=3)
    assert report["published"] == 4
    assert report["last"] == {"time": NOW + 6, "window_end": NOW + 5, "model_version": 4, "label": "ABD"}


def test_on_change_for_regression_publishes_moves_beyond_min_change_from_the_last_published_value() -> None:
    policy = InsightPolicy(InsightSettings(publish="on_change", min_interval_s=0.0, min_change=0.5))
    values = [1.0, 1.4, 1.5, 0.6, 1.6, 1.2, 1.0]
    outcomes = [offer(policy, value(v), NOW + i) for i, v in enumerate(values)]
    # Against the last *published* value (1.0, then 1.6): small steps cannot creep past it.
    assert outcomes == [
        "published",
        "unchanged",
        "unchanged",
        "unchanged",
        "published",
        "unchanged",
        "published",
    ]
    assert policy.report()["skipped"] == skipped(unchanged=4)
    assert policy.report()["last"] == {
        "time": NOW + 6,
        "window_end": NOW + 5,
        "model_version": 3,
        "value": 1.0,
    }
    # min_change = 0: any change is news, an equal value is not.
    exact = InsightPolicy(InsightSettings(publish="on_change", min_interval_s=0.0))
    assert [offer(exact, value(v), NOW + i) for i, v in enumerate([2.0, 2.0, 2.0000001])] == [
        "published",
        "unchanged",
        "published",
    ]


def test_a_window_older_than_stale_after_s_is_not_published_and_zero_means_never_stale() -> None:
    policy = InsightPolicy(InsightSettings(publish="every_window", min_interval_s=0.0, stale_after_s=900.0))
    assert offer(policy, label("ABD"), NOW, window_end=NOW - 900.5) == "stale"
    assert offer(policy, label("ABD"), NOW, window_end=NOW - 3 * 3600) == "stale"
    assert offer(policy, label("ABD"), NOW, window_end=NOW - 899.5) == "published"
    assert (
        offer(policy, label("ABD"), NOW + 1, window_end=NOW + 30) == "published"
    )  # a clock behind the sensor's
    assert policy.report()["skipped"] == skipped(stale=2)
    replayed = InsightPolicy(InsightSettings(publish="every_window", min_interval_s=0.0, stale_after_s=0.0))
    assert offer(replayed, label("ABD"), NOW, window_end=NOW - 365 * 86400) == "published"


def test_no_model_and_off_come_first_and_offline_before_the_rate_limit() -> None:
    policy = InsightPolicy(InsightSettings(publish="every_window", min_interval_s=60.0, stale_after_s=900.0))
    old = NOW - 3600
    # Without a verified model, a stale window is still "no_model": the first thing to fix.
    assert offer(policy, label("ABD"), NOW, window_end=old, have_model=False) == "no_model"
    assert offer(policy, label("ABD"), NOW, have_model=False, connected=False) == "no_model"
    assert offer(policy, label("ABD"), NOW, window_end=old, connected=False) == "stale"
    assert offer(policy, label("ABD"), NOW, connected=False) == "offline"
    assert offer(policy, label("ABD"), NOW) == "published"
    assert offer(policy, label("ABD"), NOW + 1, connected=False) == "offline"
    assert offer(policy, label("ABD"), NOW + 2) == "rate_limited"
    assert policy.report()["skipped"] == skipped(no_model=2, stale=1, offline=2, rate_limited=1)
    off = InsightPolicy(InsightSettings(publish="off"))
    assert offer(off, label("ABD"), NOW, have_model=False) == "off"
    assert off.report() == {"publish": "off", "published": 0, "skipped": skipped(off=1), "last": None}


def test_unknown_reasons_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown insight skip reason"):
        InsightPolicy(InsightSettings()).skip("bored")


def test_model_output_becomes_a_class_with_every_probability_or_a_value(har_task: TaskSpec) -> None:
    probabilities = np.array([0.05, 0.6, 0.05, 0.1, 0.1, 0.05, 0.05], np.float32)
    p = prediction_from_output(probabilities, har_task, None)
    assert (p.label, p.class_index) == ("ABD", 1)
    assert p.to_dict() == {
        "label": "ABD",
        "class_index": 1,
        "probabilities": dict(zip(har_task.label.classes or (), map(float, probabilities), strict=True)),
    }
    regression = task_variant(har_task, {"label.classes": None, "model.kind": "regression"})
    assert prediction_from_output(np.array([21.5]), regression, "degC").to_dict() == {
        "value": 21.5,
        "units": "degC",
    }
    with pytest.raises(InsightError, match="not finite"):
        prediction_from_output(np.array([np.nan] * 7), har_task, None)
    with pytest.raises(InsightError, match="gave 2 output"):
        prediction_from_output(np.array([0.5, 0.5]), har_task, None)


def window(task: TaskSpec, end_s: float) -> LiveWindow:
    return LiveWindow(
        np.zeros(task.input_dim, np.float32), int((end_s - 2) * 1e9), int(end_s * 1e9), task.features
    )


def test_the_publisher_counts_every_window_it_does_not_publish_and_logs_each_reason_once(
    har_task: TaskSpec, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes) -> bool:
        sent.append((topic, payload))
        return True

    settings = InsightSettings(publish="every_window", min_interval_s=0.0)
    publisher = InsightPublisher(settings, "watch-01", "f1", "fedge/v1/f1/insight/watch-01", "auto", publish)
    assert publisher.task is None
    caplog.set_level(logging.INFO, logger="fedge.agent.insight")
    batch = LiveWindows(tuple(window(har_task, NOW - i) for i in (3, 2, 1)), dropped=5)
    publisher.process(batch, NOW, connected=True)
    publisher.process(LiveWindows((window(har_task, NOW),)), NOW + 1, connected=True)
    assert sent == []
    assert publisher.report() == {
        "publish": "every_window",
        "published": 0,
        "skipped": skipped(overflow=5, no_model=4),
        "last": None,
    }
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # one per reason, the first time
    assert "(overflow: 5 window(s) dropped)" in lines[0]
    assert "(no_model)" in lines[1] and "insights.skipped.no_model" in lines[1]

    off = InsightPublisher(InsightSettings(publish="off"), "watch-01", "f1", "t", "auto", publish)
    caplog.clear()
    off.process(batch, NOW, connected=True)
    assert off.report()["skipped"] == skipped(overflow=5, off=3)
    assert any('[insight] publish = "off"' in r.getMessage() for r in caplog.records)


def test_the_window_buffer_keeps_the_newest_and_counts_what_it_dropped(har_task: TaskSpec) -> None:
    buffer = LiveWindowBuffer(maxlen=3)
    buffer.put(window(har_task, NOW + i) for i in range(5))
    taken = buffer.take()
    assert [w.end_ns for w in taken.windows] == [int((NOW + i) * 1e9) for i in (2, 3, 4)]
    assert taken.dropped == 2
    assert buffer.take() == LiveWindows((), 0)
    with pytest.raises(ValueError):
        LiveWindowBuffer(maxlen=0)


def test_the_har_watch_replay_gives_one_window_per_step_in_time(har_task: TaskSpec) -> None:
    x = np.arange(10 * har_task.input_dim, dtype=np.float32).reshape(10, har_task.input_dim)
    replay = LiveReplay(x, har_task, offset=7, t0=NOW, keep=4)
    first = replay.due(NOW)  # window 0 ends now
    assert [w.end_ns for w in first.windows] == [int(NOW * 1e9)] and first.dropped == 0
    assert first.windows[0].start_ns == int((NOW - 99 / 50) * 1e9)  # 100 rows at 50 Hz
    np.testing.assert_array_equal(first.windows[0].features, x[7])
    assert replay.due(NOW + 0.5).windows == ()  # a step is 50 rows: 1 s
    later = replay.due(NOW + 9.2)  # windows 1..9 are due: the newest 4 kept, 5 dropped
    assert [round(w.end_ns / 1e9 - NOW) for w in later.windows] == [6, 7, 8, 9]
    assert later.dropped == 5
    np.testing.assert_array_equal(later.windows[-1].features, x[(7 + 9) % 10])
