"""PNG plots of training runs (matplotlib, from the ``demo`` extra; headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedge.protocol.errors import FedgeError


def plot_history(
    path: Path,
    title: str,
    steps: Sequence[int],
    train_loss: Sequence[float],
    test_loss: Sequence[float],
    test_metric: Sequence[float | None],
    metric_name: str = "held-out accuracy",
    step_name: str = "epoch",
    reference: float | None = None,
    reference_name: str = "centralized",
    second_metric: Sequence[float | None] | None = None,
    second_metric_name: str = "federated evaluation",
) -> Path:
    """Loss (left axis) and accuracy (right axis) per epoch or round, written as a PNG."""
    try:
        import matplotlib  # noqa: PLC0415 - optional, demo-only dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise FedgeError("plotting needs matplotlib: pip install 'fedge[demo]'") from None
    fig, ax_loss = plt.subplots(figsize=(7, 4), dpi=100)
    ax_loss.plot(steps, train_loss, label="train loss", color="tab:blue")
    ax_loss.plot(steps, test_loss, label="held-out loss", color="tab:orange")
    ax_loss.set_xlabel(step_name)
    ax_loss.set_ylabel("loss")
    metric = [m for m in test_metric if m is not None]
    if metric:
        ax_acc = ax_loss.twinx()
        ax_acc.plot(steps[: len(metric)], metric, label=metric_name, color="tab:green")
        if second_metric is not None:
            pairs = [(s, m) for s, m in zip(steps, second_metric, strict=False) if m is not None]
            if pairs:
                ax_acc.plot(
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    label=second_metric_name,
                    color="tab:purple",
                    linestyle=":",
                )
        if reference is not None:
            ax_acc.axhline(
                reference, color="tab:gray", linestyle="--", label=f"{reference_name} {reference:.3f}"
            )
        ax_acc.set_ylabel(metric_name)
        ax_acc.set_ylim(0.0, 1.0)
        ax_acc.legend(loc="lower right")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
