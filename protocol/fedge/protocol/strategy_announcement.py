"""What a round manifest says about the aggregation strategy (``RoundManifest.strategy``).

The aggregator's ``[rounds] strategy`` decides how a train round's accepted updates become the
next model (``docs/strategies.md``): plain FedAvg, a server optimizer on the mean (FedAvgM,
FedAdagrad, FedAdam, FedYogi: Reddi et al. 2021) or a robust aggregator (coordinate-wise
median, trimmed mean, Krum, Multi-Krum). Devices train the same way under each; the manifest
announces the strategy and its parameters so that a device, an observer or an auditor holding
the signed manifest knows what the aggregator does with the updates.

Left out of the manifest for ``fedavg`` (and of every manifest but a train round's), like
``generation``: a fleet on plain FedAvg keeps the manifests devices before this field accept,
and one document per content.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fedge.protocol.errors import FieldError

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "DEFAULT_STRATEGY",
    "ROBUST_STRATEGIES",
    "SERVER_OPTIMIZERS",
    "STRATEGIES",
    "STRATEGY_PARAMETERS",
    "StrategyAnnouncement",
    "StrategyAnnouncementError",
]

#: Plain FedAvg: never announced.
DEFAULT_STRATEGY: Final = "fedavg"
#: Server optimizers on the aggregated mean delta (state kept across rounds).
SERVER_OPTIMIZERS: Final = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
#: The server optimizers with a second-moment estimate ``v`` (Reddi et al. 2021).
ADAPTIVE_OPTIMIZERS: Final = ("fedadagrad", "fedadam", "fedyogi")
#: Robust aggregators: they need every update of the round individually.
ROBUST_STRATEGIES: Final = ("median", "trimmed_mean", "krum", "multi_krum")
#: Every ``[rounds] strategy`` value.
STRATEGIES: Final = (DEFAULT_STRATEGY, *SERVER_OPTIMIZERS, *ROBUST_STRATEGIES)

_LR = "server_learning_rate"
_ADAPTIVE = (_LR, "server_beta1", "server_beta2", "server_tau")
#: The parameters each announced strategy names (the ``[rounds]`` keys of the same names).
STRATEGY_PARAMETERS: Final[Mapping[str, tuple[str, ...]]] = {
    "fedavgm": (_LR, "server_momentum"),
    "fedadagrad": _ADAPTIVE,
    "fedadam": _ADAPTIVE,
    "fedyogi": _ADAPTIVE,
    "median": (_LR,),
    "trimmed_mean": (_LR, "trim_fraction"),
    "krum": (_LR, "byzantine_devices"),
    "multi_krum": (_LR, "byzantine_devices", "multi_krum_select"),
}
#: Parameters that are counts (integers); the others are real numbers.
_INTEGER_PARAMETERS: Final = frozenset({"byzantine_devices", "multi_krum_select"})
_MAX_PARAMETER: Final = 1e12


class StrategyAnnouncementError(FieldError):
    """The manifest's ``strategy`` object has a missing, mistyped or impossible field."""


@dataclass(frozen=True)
class StrategyAnnouncement:
    """The round's aggregation strategy (``name``, never ``"fedavg"``) and its parameters,
    exactly the keys :data:`STRATEGY_PARAMETERS` lists for it."""

    name: str
    parameters: Mapping[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in STRATEGY_PARAMETERS:
            raise StrategyAnnouncementError(
                f"strategy.name must be one of {tuple(STRATEGY_PARAMETERS)} (fedavg is not announced)",
                field="strategy.name",
                expected=tuple(STRATEGY_PARAMETERS),
                found=self.name,
            )
        if not isinstance(self.parameters, Mapping):
            raise StrategyAnnouncementError(
                "strategy.parameters must be an object",
                field="strategy.parameters",
                expected="an object",
                found=self.parameters,
            )
        expected = STRATEGY_PARAMETERS[self.name]
        if set(self.parameters) != set(expected):
            raise StrategyAnnouncementError(
                f"strategy.parameters of {self.name} must be exactly {list(expected)}",
                field="strategy.parameters",
                expected=list(expected),
                found=sorted(map(str, self.parameters)),
            )
        clean: dict[str, float | int] = {}
        for key in expected:
            clean[key] = _parameter(key, self.parameters[key])
        object.__setattr__(self, "parameters", clean)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parameters": dict(self.parameters)}

    @classmethod
    def from_dict(cls, data: Any) -> StrategyAnnouncement:
        if not isinstance(data, dict):
            raise StrategyAnnouncementError(
                "strategy must be an object", field="strategy", expected="an object", found=data
            )
        if set(data) != {"name", "parameters"}:
            raise StrategyAnnouncementError(
                "strategy must have exactly the fields ['name', 'parameters']",
                field="strategy",
                expected=["name", "parameters"],
                found=sorted(map(str, data)),
            )
        if not isinstance(data["parameters"], dict):
            raise StrategyAnnouncementError(
                "strategy.parameters must be an object",
                field="strategy.parameters",
                expected="an object",
                found=data["parameters"],
            )
        return cls(data["name"], dict(data["parameters"]))

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.parameters.items()))))


def _parameter(key: str, value: Any) -> float | int:
    where = f"strategy.parameters.{key}"
    if key in _INTEGER_PARAMETERS:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
            raise StrategyAnnouncementError(
                f"{where} must be an integer in 0..1000000", field=where, expected="0..1000000", found=value
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrategyAnnouncementError(
            f"{where} must be a number", field=where, expected="a number", found=value
        )
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= _MAX_PARAMETER):
        raise StrategyAnnouncementError(
            f"{where} must be finite and >= 0", field=where, expected="a finite number >= 0", found=value
        )
    return number
