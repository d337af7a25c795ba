"""How a round's accepted reports become the next model: the aggregator's strategies.

The round engine (``fedge.aggregator.round_engine``) decides *which* messages count (size,
topic, header, round, counter, decryption, one slot per device); the folds here decide *what
they add up to*. They are pure arithmetic: no I/O, no clock, no keys, no rejection reasons.

- ``fold``: the interfaces, :class:`~fedge.aggregator.strategies.fold.UpdateFold` and
  :class:`~fedge.aggregator.strategies.fold.MomentsFold` (``add``, ``result``).
- ``clipping``: the norm bounds and ``NormClip``, the wrapper that gives any update fold the
  clipping (or refusal) of an update's L2 norm.
- ``weighting``: how much a claimed example count counts (once, or capped at the previous
  round's median claim).
- ``metrics``: ``RoundMetrics``, the wrapper that folds the round's reported training loss and
  federated evaluation together with the update.
- ``factory``: ``build_round_folds``, the one place that builds a round's folds from
  ``RoundSettings`` and what the bounds remember of earlier rounds.

The folds themselves sit next to their arithmetic: ``fedge.aggregator.fedavg.FedAvg`` and
``fedge.aggregator.moments.MomentsAggregation``.

Adding a strategy (a robust mean, a server optimizer): a class with ``add(update)``, which
checks before it changes anything and raises ``AggregationError``, and
``result(global_weights)``; a ``[rounds]`` value that names it; a branch in
``factory.update_strategy``. Clipping, the metrics and the engine's checks stay as they are.

This file imports nothing, so a fold's module can import the interfaces without a cycle.
"""
