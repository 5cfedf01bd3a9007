"""The training log: `loss.csv` (step, loss, val_loss, lr, seconds, then each learned vector's health) and its
picture `loss.png`.

`val_loss` is the validation loss (`validation.py`) where it was evaluated, empty elsewhere; the row of step 0 (the
initial embedding, before any step) has the validation loss and the health only.

A vector's health is its norm and its cosine to its initial value, per text encoder: columns
`<encoder>_norm_<token>` and `<encoder>_cos_<token>`. A norm that runs away, or a cosine that falls towards 0 in a
few steps, is a learning rate too high; a cosine that stays at 1 is a vector that does not learn.
"""
import csv
import os

import numpy as np

from gm.util import atomic_write

HEADER = ["step", "loss", "val_loss", "lr", "seconds"]
MAY_BE_EMPTY = {"loss", "val_loss", "lr", "seconds"}


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def health_columns(encoders, tokens):
    """The names of the health columns for text `encoders` and learned `tokens`, in the order of `vector_health`."""
    return [f"{encoder}_{figure}_{token}" for encoder in encoders for figure in ("norm", "cos") for token in tokens]


def vector_health(rows, initial_rows):
    """Per encoder (rows [n, d] and initial rows [n, d] float32): each vector's norm, then its cosine to its initial
    value; flattened in the order of `health_columns`."""
    values = []
    for now, start in zip(rows, initial_rows):
        norms = np.linalg.norm(now, axis=1)
        cosines = (now * start).sum(axis=1) / (norms * np.linalg.norm(start, axis=1) + 1e-12)
        values += list(norms) + list(cosines)
    return [float(v) for v in values]


class LossLog:
    """Appends one row per optimizer step. On resume, rows after the resumed step are dropped first, so the
    log of an interrupted and resumed run reads like that of an uninterrupted one.

    encoders, tokens: the text encoders and learned tokens whose vectors' health each row records."""

    def __init__(self, save_path, resume_step=0, encoders=(), tokens=()):
        self.csv_path = os.path.join(save_path, "loss.csv")
        self.png_path = os.path.join(save_path, "loss.png")
        self.encoders = list(encoders)
        self.header = HEADER + health_columns(encoders, tokens)
        rows = self.read(self.csv_path, self.header) if resume_step and os.path.exists(self.csv_path) else []
        rows = [r for r in rows if int(r[0]) <= resume_step]
        atomic_write(self.csv_path, lambda p: self._write(p, rows), ".csv")
        self.steps, self.losses, self.val_steps, self.val_losses, self.health_steps, self.health = [], [], [], [], [], []
        for row in rows:
            self._keep(int(row[0]), *(float(v) if v else None for v in row[1:3]),
                       [float(v) for v in row[len(HEADER):]])

    @staticmethod
    def read(path, header):
        """The data rows under `header`; a row cut short (the run was killed while writing it), or all of them
        when the file has another header, are left out. Cells of MAY_BE_EMPTY columns may be empty."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0] != header:
            return []
        return [row for row in rows[1:] if len(row) == len(header)
                and all(_is_number(v) or (not v and name in MAY_BE_EMPTY) for name, v in zip(header, row))]

    def _write(self, path, rows):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.header)
            writer.writerows(rows)

    def append(self, step, loss, lr, seconds, health=(), val_loss=None):
        """One step's row; `health` from `vector_health`; None leaves a cell empty (no validation loss at this step;
        at step 0, no training loss, rate or time)."""
        cells = [(loss, ".6f"), (val_loss, ".6f"), (lr, ".6g"), (seconds, ".3f")] + [(v, ".6g") for v in health]
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step] + ["" if v is None else format(v, spec) for v, spec in cells])
        self._keep(step, loss, val_loss, list(health))

    def _keep(self, step, loss, val_loss, health):
        if loss is not None:
            self.steps.append(step)
            self.losses.append(loss)
        if val_loss is not None:
            self.val_steps.append(step)
            self.val_losses.append(val_loss)
        self.health_steps.append(step)
        self.health.append(health)

    def plot(self):
        """Write loss.png: the per-step loss and its moving average (diffusion losses are noisy), the validation loss
        (on an axis of its own: its changes are far smaller than the per-step loss's spread) and, beside them, the
        learned vectors' mean cosine to their initial values per text encoder."""
        if not self.steps and not self.val_steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with_health = bool(self.encoders and self.health and self.health[-1])
        fig, axes = plt.subplots(1, 2 if with_health else 1, figsize=(12 if with_health else 7, 4), dpi=100,
                                 squeeze=False)
        ax = axes[0, 0]
        ax.plot(self.steps, self.losses, lw=0.8, alpha=0.4, label="loss")
        window = max(1, min(50, len(self.losses) // 5))
        if window > 1:
            smooth = np.convolve(self.losses, np.ones(window) / window, mode="valid")
            ax.plot(self.steps[window - 1:], smooth, lw=2, label=f"moving average ({window} steps)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("diffusion loss")
        ax.set_title("Textual inversion training loss")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        if self.val_steps:
            val_ax = ax.twinx()
            handles += val_ax.plot(self.val_steps, self.val_losses, "o-", color="tab:red", lw=1.5,
                                   label="validation loss (right axis)")
            val_ax.set_ylabel("validation loss (fixed held-out draws)", color="tab:red")
            val_ax.tick_params(axis="y", colors="tab:red")
        ax.legend(handles=handles)
        if with_health:
            ax = axes[0, 1]
            health = np.array(self.health).reshape(len(self.health_steps), len(self.encoders), 2, -1)
            for k, encoder in enumerate(self.encoders):
                ax.plot(self.health_steps, health[:, k, 1].mean(axis=1), lw=2, label=encoder)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("cosine to the initial vector (mean)")
            ax.set_title("How far the learned vectors moved")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.png_path, lambda p: fig.savefig(p, format="png"), ".png")
        plt.close(fig)
