"""`miniglm plot RUN`: the loss curves of metrics.jsonl as a PNG."""

from __future__ import annotations

from pathlib import Path

from miniglm.fileio import UserError, atomic_path, read_log


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path}: no such file; train the run first")
    return read_log(path)  # a torn last line (a kill mid-append) is skipped


def plot_losses(run: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else Path(run) / "loss.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
