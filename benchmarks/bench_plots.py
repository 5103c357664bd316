"""PNG plots of bench_finetune results: step time and memory against sequence length, a line per
configuration. matplotlib is optional (pip install matplotlib, or the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

METRICS = {  # file suffix: (result key, y label, scale)
    "step_time": ("step_s", "median step time (s)", 1.0),
    "alloc_peak": ("alloc_peak_bytes", "allocation peak of a step (MB)", 2**-20),
    "saved": ("saved_bytes", "saved for backward (MB)", 2**-20),
    "peak_rss": ("peak_rss_above_model_bytes", "peak RSS above the loaded model (MB)", 2**-20),
}


def plot(results: list[dict], prefix: Path) -> list[Path]:
    """Writes <prefix>_<metric>.png for each metric present; returns the paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    configs = list(dict.fromkeys(r["config"] for r in results))
    for suffix, (key, label, scale) in METRICS.items():
        if not any(r.get(key) is not None for r in results):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in configs:
            rows = sorted((r for r in results if r["config"] == name and r.get(key) is not None), key=lambda r: r["seq"])
            if rows:
                ax.plot([r["seq"] for r in rows], [r[key] * scale for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(f"{prefix}_{suffix}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
