"""The training log: `loss.csv` (step, loss, lr, seconds) and its picture `loss.png`."""
import csv
import os

import numpy as np

from gm.util import atomic_write

HEADER = ["step", "loss", "lr", "seconds"]


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


class LossLog:
    """Appends one row per optimizer step. On resume, rows after the resumed step are dropped first, so the
    log of an interrupted and resumed run reads like that of an uninterrupted one."""

    def __init__(self, save_path, resume_step=0):
        self.csv_path = os.path.join(save_path, "loss.csv")
        self.png_path = os.path.join(save_path, "loss.png")
        rows = self.read(self.csv_path) if resume_step and os.path.exists(self.csv_path) else []
        rows = [r for r in rows if int(r[0]) <= resume_step]
        atomic_write(self.csv_path, lambda p: self._write(p, rows), ".csv")
        self.steps = [int(r[0]) for r in rows]
        self.losses = [float(r[1]) for r in rows]

    @staticmethod
    def read(path):
        """The data rows; a row cut short (the run was killed while writing it) is left out."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        return [row for row in rows if len(row) == len(HEADER) and all(_is_number(v) for v in row)]

    @staticmethod
    def _write(path, rows):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows(rows)

    def append(self, step, loss, lr, seconds):
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.6g}", f"{seconds:.3f}"])
        self.steps.append(step)
        self.losses.append(loss)

    def plot(self):
        """Write loss.png: the per-step loss and its moving average (diffusion losses are noisy)."""
        if not self.steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(self.steps, self.losses, lw=0.8, alpha=0.4, label="loss")
        window = max(1, min(50, len(self.losses) // 5))
        if window > 1:
            smooth = np.convolve(self.losses, np.ones(window) / window, mode="valid")
            ax.plot(self.steps[window - 1:], smooth, lw=2, label=f"moving average ({window} steps)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("diffusion loss")
        ax.set_title("Textual inversion training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.png_path, lambda p: fig.savefig(p, format="png"), ".png")
        plt.close(fig)
