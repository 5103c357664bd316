"""Issue 16's ablation: quality against step time, per technique, from committed JSONs (runs nothing).

Quality comes from one GSM8K quality probe (benchmarks/research/quality_probe.py: dense LoRA and every
variant, same seed, data and steps); step times from bench_finetune.py runs at 2048 x 1 and 512 x 8
with --prompt-frac 0.5 (half of each row a prompt, as GSM8K). Each variant is paired with the
bench_finetune config of the same options (VARIANTS). Prints a markdown table (dense-eval and
sparse-eval loss, kept share, step time over the best dense step at each shape) and, with matplotlib,
writes a plot of dense-eval loss against step-time ratio.

    python benchmarks/ablation.py --probe benchmarks/research/results/probe_ablation.json \\
        --steps benchmarks/results/ablation_step_cpu_2048x1.json benchmarks/results/ablation_step_cpu_512x8.json \\
        --plot benchmarks/results/ablation_cpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# probe variant -> (bench_finetune config, what it is)
VARIANTS = {
    "dense": ("best dense", "dense LoRA (the step: the faster of eager SDPA and Inductor in that run)"),
    "sparse-forward-50%": ("spt-sparse-forward", "sparse forward, 2 of 4 blocks (the defaults before issue 16)"),
    "exact-only-50%": ("spt-exact-only-50%", "exact forward, sparse backward, 2 of 4 (technique 1 alone)"),
    "loss-rows-first-50%": ("spt-loss-rows-first-50%", "the same, loss rows ranked first (1 + 2, within budget)"),
    "loss-rows-dense-50%": ("spt-50%", "the same, loss rows every block (1 + 2, beyond budget)"),
    "defaults": ("spt", "**the defaults**: loss rows every block, 3 of 4"),
}
DENSE_CONFIGS = ("eager-sdpa", "eager-attn", "inductor")


def load_steps(paths: list[Path]) -> dict[str, dict[str, float]]:
    """{shape: {config: median step seconds}}, shape as '2048x1'."""
    out: dict[str, dict[str, float]] = {}
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            out.setdefault(f"{r['seq']}x{r['batch']}", {})[r["config"]] = r["step_s"]
    return out


def rows(probe: dict, steps: dict[str, dict[str, float]]) -> list[dict]:
    runs = {r["variant"]: r["part"] for r in probe["runs"]}
    metric = probe["metric"]
    dense = runs["dense"]
    ref, untuned = dense["tuned"][metric], dense["untuned"][metric]
    out = []
    for name, (config, what) in VARIANTS.items():
        part = runs.get(name)
        if part is None:
            continue
        row = {"variant": name, "what": what, "config": config}
        if name == "dense":
            row.update(dense_eval=ref, sparse_eval=None, kept=1.0)
        else:
            de = part["tuned_dense"][metric]
            row.update(dense_eval=de, sparse_eval=part["tuned_sparse"][metric], kept=(untuned - de) / (untuned - ref))
        for shape, times in steps.items():
            best = min(times[c] for c in DENSE_CONFIGS if c in times)
            step = best if config == "best dense" else times.get(config)
            row[shape] = None if step is None else step / best
        out.append(row)
    return out


def markdown(table: list[dict], shapes: list[str], ref: float) -> str:
    head = "| configuration | dense-eval | vs dense | kept | sparse-eval | " + " | ".join(
        f"step {s} / best dense" for s in shapes) + " | bench config |"
    lines = [head, "|" + "---|" * (6 + len(shapes))]
    for r in table:
        vs = f"{100 * (r['dense_eval'] - ref) / ref:+.2f}%"
        sp = "" if r["sparse_eval"] is None else f"{r['sparse_eval']:.4f} ({100 * (r['sparse_eval'] - ref) / ref:+.0f}%)"
        steps = " | ".join("" if r.get(s) is None else f"{r[s]:.3f}" for s in shapes)
        lines.append(f"| {r['what']} | {r['dense_eval']:.4f} | {vs} | {r['kept']:.3f} | {sp} | {steps} | {r['config']} |")
    return "\n".join(lines)


def plot(table: list[dict], shapes: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for r in table:
            if r.get(shape) is None:
                continue
            marker = "s" if r["variant"] == "dense" else "*" if r["variant"] == "defaults" else "o"
            ax.scatter(r[shape], r["dense_eval"], marker=marker, s=90 if marker == "*" else 40)
            ax.annotate(r["variant"], (r[shape], r["dense_eval"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_title(f"seq x batch {shape} (prompt half of each row)")
        ax.set_xlabel("step time / best dense step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GSM8K held-out answer loss, evaluated dense")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=Path, required=True, help="quality_probe.py JSON with dense and the VARIANTS")
    p.add_argument("--steps", type=Path, nargs="+", required=True, help="bench_finetune.py JSONs (one per shape)")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    a = p.parse_args(argv)
    for path in [a.probe, *a.steps]:
        if not path.is_file():
            print(f"error: {path} does not exist (see this script's --help for the commands that write it)",
                  file=sys.stderr)
            return 2
    probe = json.loads(a.probe.read_text())
    if not any(r["variant"] == "dense" for r in probe["runs"]):
        print(f"error: {a.probe} has no dense run: rerun the probe without --no-dense", file=sys.stderr)
        return 2
    steps = load_steps(a.steps)
    shapes = sorted(steps, key=lambda s: -int(s.split("x")[0]))
    table = rows(probe, steps)
    dense = next(r for r in probe["runs"] if r["variant"] == "dense")["part"]
    print(f"quality: {a.probe} (commit {probe.get('commit')}); steps: {', '.join(map(str, a.steps))}")
    print(markdown(table, shapes, dense["tuned"][probe["metric"]]))
    if a.plot and plot(table, shapes, a.plot):
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
