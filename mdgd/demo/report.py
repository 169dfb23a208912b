"""The demo's report in the shape of the paper's Table 1: a table, JSON, Markdown, a PNG.

Columns: #Params (trainable elements; MDGD-GM's is the mean it updates per step),
the accuracy (%) on each pre-trained task, on the target task, their average
``Avg`` (all tasks, as in the paper), the ``H-score`` (:func:`mdgd.metrics.h_score`,
Table 1's form), the effective rank of the visual tokens (mean over the
pre-trained tasks' eval pictures) and the median step time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mdgd.metrics import h_score


@dataclass
class Row:
    method: str
    params: int | None
    accuracy: dict[str, float]  # task -> [0, 1]
    erank: dict[str, float]
    step_ms: float | None


def summarise(row: Row, pretrained_tasks: list[str], target: str) -> dict:
    pre = [row.accuracy[t] for t in pretrained_tasks]
    allv = pre + [row.accuracy[target]]
    return {
        "pretrained_mean": sum(pre) / len(pre),
        "avg": sum(allv) / len(allv),
        "h_score": h_score(pre, row.accuracy[target], form="table1"),
        "erank_mean": sum(row.erank[t] for t in pretrained_tasks) / len(pretrained_tasks),
    }


def verdict(rows: list[Row], pretrained_tasks: list[str], target: str) -> list[str]:
    """Plain sentences about what this run measured (no claim the numbers do not back)."""
    by = {r.method: (r, summarise(r, pretrained_tasks, target)) for r in rows}
    zero = by["Zero-shot"][1]["pretrained_mean"]
    lines = []
    for name, (r, s) in by.items():
        if name == "Zero-shot":
            continue
        lines.append(
            f"{name}: pre-trained tasks {100 * s['pretrained_mean']:.1f}% "
            f"({100 * (s['pretrained_mean'] - zero):+.1f} points vs zero-shot), "
            f"target {100 * r.accuracy[target]:.1f}%, visual erank {s['erank_mean']:.1f}."
        )
    if "Fine-tune" in by and "MDGD" in by:
        ft, md = by["Fine-tune"], by["MDGD"]
        d_ft = ft[1]["pretrained_mean"] - zero
        d_md = md[1]["pretrained_mean"] - zero
        change = f"{100 * d_md:+.1f} vs {100 * d_ft:+.1f} points on the pre-trained tasks"
        if d_ft >= 0:
            lines.append(f"Plain fine-tuning did not forget in this run: {change} (MDGD vs it).")
        elif d_md > d_ft:
            lines.append(f"MDGD forgot less than plain fine-tuning: {change}.")
        else:
            lines.append(f"In this run MDGD did NOT forget less than plain fine-tuning: {change}.")
        gap = md[0].accuracy[target] - ft[0].accuracy[target]
        lines.append(f"Target task: MDGD {gap * 100:+.1f} points vs fine-tuning.")
    return lines


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def table_rows(rows: list[Row], pretrained_tasks: list[str], target: str) -> tuple[list[str], list]:
    head = [
        "Method",
        "#Params",
        *pretrained_tasks,
        f"{target} (target)",
        "Avg",
        "H-score",
        "erank",
        "ms/step",
    ]
    body = []
    for r in rows:
        s = summarise(r, pretrained_tasks, target)
        body.append(
            [
                r.method,
                _fmt_params(r.params),
                *(f"{100 * r.accuracy[t]:.1f}" for t in pretrained_tasks),
                f"{100 * r.accuracy[target]:.1f}",
                f"{100 * s['avg']:.1f}",
                f"{100 * s['h_score']:.1f}",
                f"{s['erank_mean']:.1f}",
                "-" if r.step_ms is None else f"{r.step_ms:.0f}",
            ]
        )
    return head, body


def format_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)


def write_markdown(path: Path, report: dict, table_md: str) -> None:
    meta = report["meta"]
    text = [
        "# mdgd demo: visual forgetting (the shape of the paper's Table 1)",
        "",
        f"Measured on {meta['machine']}, {meta['threads']} torch thread(s), seed {meta['seed']}, "
        f"size `{meta['size']}`; wall time {meta['wall_seconds']:.0f} s "
        f"(phase 1 {'loaded from cache' if meta['pretrain']['from_cache'] else 'trained'}).",
        "",
        "Accuracies in %, on held-out examples; `erank` is the effective rank (Eq. 4) of the "
        "last hidden layer at the image tokens, mean over the pre-trained tasks "
        f"(pre-trained model: {report['erank_before']:.1f}).",
        "",
        table_md,
        "",
        *(f"- {line}" for line in report["verdict"]),
        "",
    ]
    path.write_text("\n".join(text))


def plot(path: Path, rows: list[Row], pretrained_tasks: list[str], target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [*pretrained_tasks, target]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.3]}, constrained_layout=True
    )
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        ax1.bar(xs, [100 * r.accuracy[t] for t in tasks], width, label=r.method)
    ax1.set_xticks(range(len(tasks)))
    ax1.set_xticklabels([*pretrained_tasks, f"{target}\n(target)"])
    ax1.axvline(len(pretrained_tasks) - 0.5, color="grey", lw=0.8, ls=":")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title("accuracy per task after instruction-tuning on the target task")
    ax1.legend(fontsize=8, ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.13))

    names = [r.method for r in rows]
    ers = [summarise(r, pretrained_tasks, target)["erank_mean"] for r in rows]
    ax2.bar(range(len(rows)), ers, color=[f"C{i}" for i in range(len(rows))])
    ax2.axhline(ers[0], color="black", lw=0.8, ls="--", label=f"{names[0]}: {ers[0]:.1f}")
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("effective rank")
    ax2.set_title("effective rank of the visual tokens")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out_dir: Path, report: dict, rows: list[Row], pretrained_tasks, target) -> dict:
    """Write ``report.json``, ``report.md`` and ``report.png``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head, body = table_rows(rows, pretrained_tasks, target)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "figure": out_dir / "report.png",
    }
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2))
    write_markdown(paths["markdown"], report, markdown_table(head, body))
    plot(paths["figure"], rows, pretrained_tasks, target)
    return paths
