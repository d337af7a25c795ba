"""Norm bounds on one update, as a wrapper that any update fold gets for free.

An update's L2 norm is how far one device moves the model, and a device's key can be stolen
(SECURITY.md), so every strategy needs the same bounds; :class:`NormClip` applies them in front
of the fold it wraps, so that no strategy re-implements them. The bounds (``RoundSettings``):

- *hard*: ``max_update_norm`` (absolute) and ``update_norm_ratio`` x the model's norm. An update
  over the hard bound is clipped to it or, with ``update_norm_policy = "reject"``, refused.
- *clip*: the smallest of the hard bounds and ``update_norm_adaptive`` x the median norm of the
  previous train round's updates before clipping. The adaptive bound always clips: it sits at
  the median honest norm, so half of the honest updates reach it.

:class:`NormClip` also records each accepted update's norm before clipping: the next round's
adaptive bound is their median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.strategies.fold import UpdateFold, prepared
from fedge.protocol.messages import UpdatePayload

__all__ = ["NormBounds", "NormClip", "NormTooLarge", "l2", "norm_bounds"]


def l2(vector: np.ndarray) -> float:
    """The L2 norm, computed in float64 (a float32 sum of squares can overflow).

    ``sqrt(v . v)`` is what ``np.linalg.norm`` computes for a vector, without its dispatch
    (a few microseconds of every update's handling)."""
    v = vector.astype(np.float64).ravel()
    return math.sqrt(float(np.dot(v, v)))


@dataclass(frozen=True)
class NormBounds:
    """A round's bounds on one update's L2 norm. ``hard`` (absolute or relative to the model)
    follows ``update_norm_policy``; ``clip`` (the smallest of all, the adaptive one included)
    is where an update is clipped. None: that bound is off."""

    hard: float | None
    clip: float | None


def norm_bounds(
    settings: RoundSettings,
    weights: npt.NDArray[np.float32],
    initial_norm: float | None,
    update_norm_median: float | None,
) -> NormBounds:
    """The bounds for a round whose global model is ``weights``.

    "Unbounded" is None, never 0: a model driven to a norm of 0 (two colluding devices sending
    ``-w``) must not switch the ratio bound off, so the ratio applies to the larger of the
    model's and the initial model's norm, and to at least 1.
    """
    s = settings
    hard: list[float] = []
    if s.max_update_norm > 0:
        hard.append(s.max_update_norm)
    if s.update_norm_ratio > 0:
        reference = max(l2(weights), initial_norm or 0.0, 1.0)
        hard.append(s.update_norm_ratio * reference)
    clip = list(hard)
    if s.update_norm_adaptive > 0 and update_norm_median:
        clip.append(s.update_norm_adaptive * update_norm_median)
    return NormBounds(min(hard) if hard else None, min(clip) if clip else None)


class NormTooLarge(AggregationError):
    """An update over the hard norm bound, refused (``update_norm_policy = "reject"``)."""

    def __init__(self, norm: float, bound: float) -> None:
        super().__init__(f"update norm {norm:.6g} is over the bound {bound:.6g}")
        self.norm = norm
        self.bound = bound


class NormClip:
    """An update fold behind the round's norm bounds: each update is refused (over ``hard``,
    with ``reject``) or scaled down to ``clip`` before ``inner`` sees it.

    All or nothing, like any fold: the norm is checked first, and an update counts as clipped
    and has its norm recorded only once ``inner`` accepted it.
    """

    def __init__(self, inner: UpdateFold, bounds: NormBounds, *, reject: bool = False) -> None:
        self.inner = inner
        self._prepared = prepared(inner)  # the inner fold, if it takes prepared updates
        self.bounds = bounds
        #: Refuse (``NormTooLarge``) rather than clip an update over the hard bound.
        self.reject = reject
        #: Accepted updates scaled down to the bound (the round record's ``clipped``).
        self.clipped = 0
        #: Accepted updates' norms before clipping, in arrival order (the next adaptive bound).
        self.raw_norms: list[float] = []

    def add(self, update: UpdatePayload) -> None:
        norm = l2(update.delta)
        hard, clip = self.bounds.hard, self.bounds.clip
        if self.reject and hard is not None and norm > hard:
            raise NormTooLarge(norm, hard)
        scale = clip / norm if clip is not None and norm > clip else None
        if scale is not None:
            update = replace(update, delta=update.delta * np.float32(scale))  # float32 times float32
        self.inner.add(update)
        self.clipped += scale is not None
        self.raw_norms.append(norm)

    @property
    def takes_prepared(self) -> bool:
        """Whether the folds inside take prepared updates (``strategies.fold.PreparedFold``)."""
        return self._prepared is not None

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64], norm: float) -> None:
        """:meth:`add` for an update the caller decoded, cast to float64 (``cast``, finite, its
        scratch) and measured (``norm``: ``l2(update.delta)``, which ``sqrt(cast . cast)`` is
        to the bit): the same bounds, refusals and arithmetic, without a second cast. A clipped
        delta is scaled in float32, as :meth:`add` does, then cast into ``cast``."""
        inner = self._prepared
        if inner is None:
            raise TypeError(f"{type(self.inner).__name__} takes no prepared updates")
        hard, clip = self.bounds.hard, self.bounds.clip
        if self.reject and hard is not None and norm > hard:
            raise NormTooLarge(norm, hard)
        scale = clip / norm if clip is not None and norm > clip else None
        if scale is not None:  # float32 times float32, as in add, each product cast into ``cast``
            np.multiply(update.delta, np.float32(scale), out=cast, dtype=np.float32)
        inner.add_prepared(update, cast)
        self.clipped += scale is not None
        self.raw_norms.append(norm)

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.inner.result(global_weights)
