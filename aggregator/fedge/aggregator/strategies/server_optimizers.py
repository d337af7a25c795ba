"""Server optimizers on the aggregated mean delta (Reddi et al. 2021, "Adaptive Federated
Optimization"; FedAvgM: Hsu et al. 2019).

A round's mean delta ``d`` (the FedAvg mean of the clipped updates, the noised mean under
differential privacy, or the secure sum over the survivors) is treated as a pseudo-gradient
and the server keeps state across rounds:

- ``fedavgm``:   ``m = beta m + d``; ``w += lr * m``
- ``fedadagrad``: ``m = b1 m + (1 - b1) d``; ``v = v + d**2``
- ``fedadam``:    ``m = b1 m + (1 - b1) d``; ``v = b2 v + (1 - b2) d**2``
- ``fedyogi``:    ``m = b1 m + (1 - b1) d``; ``v = v - (1 - b2) d**2 sign(v - d**2)``

and, for the three adaptive ones, ``w += lr * m / (sqrt(v) + tau)``. As in the paper, ``m``
starts at 0, ``v`` at ``tau**2``, and there is no bias correction. Every operation is
coordinate-wise and in float64; the state is O(model) (``m``, and ``v`` for the adaptive
ones), streaming like FedAvg, whatever the fleet size.

The state lives in ``EngineState.server_optimizer`` and the checkpoint (:func:`state_to_json`,
:func:`state_from_json`: the arrays as base64 float64, exact), so it survives restarts and
leader changes. A state of another strategy or model size is refused
(:func:`check_state`): changing the strategy of a running fleet starts a new model generation.

:class:`ServerOptimizer` is the update fold; :func:`optimizer_step` the arithmetic, which the
round engine also applies to a secure round's mean. A round's new state is only computed by
``result`` and kept in :attr:`ServerOptimizer.next_state`; the engine commits it with the new
weights, so an aborted round leaves the state as it was.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.strategies.fold import prepared
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import UpdatePayload
from fedge.protocol.strategy_announcement import ADAPTIVE_OPTIMIZERS, SERVER_OPTIMIZERS

__all__ = [
    "MeanFold",
    "ServerOptimizer",
    "ServerOptimizerState",
    "ServerOptimizerStateError",
    "check_state",
    "initial_state",
    "optimizer_step",
    "state_from_json",
    "state_to_json",
]

F64 = npt.NDArray[np.float64]


class ServerOptimizerStateError(FedgeError):
    """A checkpointed server-optimizer state that does not fit the configured strategy or
    model, or that is malformed."""


@dataclass(frozen=True, eq=False)
class ServerOptimizerState:
    """A server optimizer's state after ``step`` aggregated rounds: the first moment ``m``
    and, for the adaptive optimizers, the second moment ``v`` (float64, one per weight)."""

    strategy: str
    step: int
    m: F64
    v: F64 | None = None

    @property
    def parameter_count(self) -> int:
        return int(self.m.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerOptimizerState):
            return NotImplemented
        same_v = (self.v is None and other.v is None) or (
            self.v is not None and other.v is not None and np.array_equal(self.v, other.v)
        )
        return (
            self.strategy == other.strategy
            and self.step == other.step
            and np.array_equal(self.m, other.m)
            and same_v
        )

    __hash__ = None  # type: ignore[assignment]


def initial_state(strategy: str, parameter_count: int, tau: float) -> ServerOptimizerState:
    """Before the first aggregated round: ``m = 0`` and, adaptive, ``v = tau**2``."""
    if strategy not in SERVER_OPTIMIZERS:
        raise AggregationError(f"{strategy!r} is not a server optimizer")
    v = np.full(parameter_count, tau * tau, dtype=np.float64) if strategy in ADAPTIVE_OPTIMIZERS else None
    return ServerOptimizerState(strategy, 0, np.zeros(parameter_count, dtype=np.float64), v)


def check_state(state: ServerOptimizerState | None, strategy: str, parameter_count: int) -> None:
    """Refuses (one line) a checkpointed state the configured ``strategy`` cannot continue: of
    another strategy (a stateless one included: its moments would be stale if the fleet went
    back) or another number of weights. None (no state yet) always fits."""
    if state is None:
        return
    if state.strategy != strategy or state.parameter_count != parameter_count:
        raise ServerOptimizerStateError(
            f'the checkpoint holds "{state.strategy}" server-optimizer state for '
            f'{state.parameter_count} weights, and [rounds] strategy is "{strategy}" for '
            f"{parameter_count}: restore the strategy, or start a new model generation "
            "([aggregator] model_generation + 1; docs/strategies.md)"
        )


def optimizer_step(
    settings: RoundSettings, state: ServerOptimizerState | None, delta: F64
) -> tuple[F64, ServerOptimizerState]:
    """The move of the global weights for the round's mean ``delta``, and the state after it
    (``state`` None: the first round). Pure: ``state`` is not changed."""
    name = settings.strategy
    p = int(delta.shape[0])
    current = initial_state(name, p, settings.server_tau) if state is None else state
    if current.strategy != name or current.parameter_count != p:
        raise AggregationError(
            f"server-optimizer state is for {current.strategy!r} with {current.parameter_count} "
            f"weights, not {name!r} with {p}"
        )
    d = delta.astype(np.float64, copy=False)
    lr = float(settings.server_learning_rate)
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "fedavgm":
            m = settings.server_momentum * current.m + d
            return lr * m, ServerOptimizerState(name, current.step + 1, m, None)
        assert current.v is not None
        b1, b2, tau = settings.server_beta1, settings.server_beta2, settings.server_tau
        m = b1 * current.m + (1.0 - b1) * d
        d2 = d * d
        if name == "fedadagrad":
            v = current.v + d2
        elif name == "fedadam":
            v = b2 * current.v + (1.0 - b2) * d2
        else:  # fedyogi
            v = current.v - (1.0 - b2) * d2 * np.sign(current.v - d2)
        step = lr * m / (np.sqrt(v) + tau)
    return step, ServerOptimizerState(name, current.step + 1, m, v)


class MeanFold(Protocol):
    """A fold whose outcome is a mean delta (FedAvg, the DP-noised mean)."""

    def add(self, update: UpdatePayload) -> None: ...

    def mean_delta(self) -> F64: ...


class ServerOptimizer:
    """A train round's fold: ``inner``'s mean delta, moved by the server optimizer
    (``UpdateFold``). Streaming: memory O(model) for the mean plus the state."""

    def __init__(self, inner: MeanFold, settings: RoundSettings, state: ServerOptimizerState | None) -> None:
        self.inner = inner
        self._prepared = prepared(inner)  # the mean, if it takes prepared updates
        self.settings = settings
        self.state = state
        #: Set by :meth:`result`: the state after this round, for the engine to keep.
        self.next_state: ServerOptimizerState | None = None

    def add(self, update: UpdatePayload) -> None:
        self.inner.add(update)

    @property
    def takes_prepared(self) -> bool:
        """Whether the mean inside takes prepared updates (``strategies.fold.PreparedFold``)."""
        return self._prepared is not None

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64]) -> None:
        inner = self._prepared
        if inner is None:
            raise TypeError(f"{type(self.inner).__name__} takes no prepared updates")
        inner.add_prepared(update, cast)

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        step, state = optimizer_step(self.settings, self.state, self.inner.mean_delta())
        with np.errstate(over="ignore", invalid="ignore"):
            out = (global_weights.astype(np.float64) + step).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise AggregationError("the aggregated weights overflow float32")
        self.next_state = state
        return out


def _encode(array: F64) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f8").tobytes()).decode("ascii")


def _decode(value: object, parameter_count: int, what: str) -> F64:
    if not isinstance(value, str):
        raise ServerOptimizerStateError(f"checkpoint metadata: server_optimizer.{what} must be base64 text")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ServerOptimizerStateError(
            f"checkpoint metadata: server_optimizer.{what} is not base64"
        ) from None
    if len(raw) != 8 * parameter_count:
        raise ServerOptimizerStateError(
            f"checkpoint metadata: server_optimizer.{what} holds {len(raw) // 8} values, "
            f"not {parameter_count}"
        )
    array = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ServerOptimizerStateError(f"checkpoint metadata: server_optimizer.{what} is not finite")
    return array


def state_to_json(state: ServerOptimizerState | None) -> dict[str, Any] | None:
    """The checkpoint's ``server_optimizer``: plain JSON, the arrays as base64 float64 (exact)."""
    if state is None:
        return None
    return {
        "strategy": state.strategy,
        "step": state.step,
        "parameter_count": state.parameter_count,
        "m": _encode(state.m),
        "v": None if state.v is None else _encode(state.v),
    }


def state_from_json(value: object) -> ServerOptimizerState | None:
    """The state :func:`state_to_json` wrote; absent / null (checkpoints before server
    optimizers, or no optimizer round yet) is None. ``ServerOptimizerStateError`` if malformed."""
    if value is None:
        return None
    keys = {"strategy", "step", "parameter_count", "m", "v"}
    if not isinstance(value, dict) or set(value) != keys:
        raise ServerOptimizerStateError(
            f"checkpoint metadata: server_optimizer must be an object with {sorted(keys)}"
        )
    strategy, step, parameter_count = value["strategy"], value["step"], value["parameter_count"]
    if strategy not in SERVER_OPTIMIZERS:
        raise ServerOptimizerStateError(
            f"checkpoint metadata: server_optimizer.strategy {strategy!r} is unknown"
        )
    for what, number, low in (("step", step, 0), ("parameter_count", parameter_count, 1)):
        if isinstance(number, bool) or not isinstance(number, int) or number < low:
            raise ServerOptimizerStateError(f"checkpoint metadata: server_optimizer.{what} is {number!r}")
    adaptive = strategy in ADAPTIVE_OPTIMIZERS
    if (value["v"] is None) == adaptive:
        raise ServerOptimizerStateError(
            f"checkpoint metadata: server_optimizer.v must be "
            f"{'present' if adaptive else 'null'} for {strategy}"
        )
    m = _decode(value["m"], parameter_count, "m")
    v = _decode(value["v"], parameter_count, "v") if adaptive else None
    return ServerOptimizerState(strategy, step, m, v)
