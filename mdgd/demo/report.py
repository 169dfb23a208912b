"""The demo's report in the shape of the paper's Table 1: a table, JSON, Markdown, a PNG.

Columns: #Params (trainable elements; MDGD-GM's is the mean it updates per step),
the accuracy (%) on each pre-trained task, the target task's score (accuracy;
for the caption target, token F1 and then exact match), the average ``Avg`` of
the pre-trained tasks and the target score (as in the paper), the ``H-score``
(:func:`mdgd.metrics.h_score`, Table 1's form), the effective rank of the visual
tokens (mean over the pre-trained tasks' eval pictures) and the median step time.
Over several seeds each cell is ``mean ± std`` (:func:`aggregate`), and the verdict
(:func:`claims`) says whether each claim held in every seed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mdgd.metrics import h_score

TARGET_MARGIN = 5.0  # points: MDGD's target score may be at most this below fine-tuning's


@dataclass
class Row:
    method: str
    params: int | None
    score: dict[str, float]  # task -> [0, 1]: accuracy, or token F1 for the caption target
    erank: dict[str, float]
    step_ms: float | None
    exact_match: dict[str, float] = field(default_factory=dict)  # caption target only


def summarise(row: Row, pretrained_tasks: list[str], target: str) -> dict:
    pre = [row.score[t] for t in pretrained_tasks]
    allv = pre + [row.score[target]]
    return {
        "pretrained_mean": sum(pre) / len(pre),
        "target": row.score[target],
        "avg": sum(allv) / len(allv),
        "h_score": h_score(pre, row.score[target], form="table1"),
        "erank_mean": sum(row.erank[t] for t in pretrained_tasks) / len(pretrained_tasks),
    }


def method_lines(runs: list[list[Row]], pretrained_tasks: list[str], target: str) -> list[str]:
    """One sentence per method: the change on the pre-trained tasks' mean since zero-shot,
    the target score and the visual erank (``runs[i]``: seed ``i``'s rows, zero-shot first;
    over several seeds, mean ± std)."""
    lines = []
    for i, row in enumerate(runs[0][1:], start=1):
        change, tgt, erank = [], [], []
        for rows in runs:
            zero = summarise(rows[0], pretrained_tasks, target)["pretrained_mean"]
            s = summarise(rows[i], pretrained_tasks, target)
            change.append(100 * (s["pretrained_mean"] - zero))
            tgt.append(100 * s["target"])
            erank.append(s["erank_mean"])
        over = " (mean ± std over seeds)" if len(runs) > 1 else ""
        lines.append(
            f"{row.method}: pre-trained tasks {_mean_std(change, '+.1f')} points vs zero-shot, "
            f"target {_mean_std(tgt)}%, visual erank {_mean_std(erank)}{over}."
        )
    return lines


def _mean_std(xs: list[float], fmt: str = ".1f") -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.fmean(xs), fmt)} ± {statistics.stdev(xs):.1f}"


def claims(
    runs: list[list[Row]],
    seeds: list[int],
    pretrained_tasks: list[str],
    target: str,
    margin: float = TARGET_MARGIN,
) -> list[str]:
    """Whether each of the demo's two claims holds in every seed (``runs[i]`` is seed ``i``'s
    rows): MDGD forgets less than fine-tuning (a higher pre-trained tasks' mean), and its
    target score is at most ``margin`` points below fine-tuning's. Says so plainly when a
    claim fails in any seed."""
    per_seed = []
    for rows in runs:
        by = {r.method: summarise(r, pretrained_tasks, target) for r in rows}
        if "Fine-tune" not in by or "MDGD" not in by:
            return []
        zero = by["Zero-shot"]["pretrained_mean"]
        per_seed.append(
            (
                100 * (by["MDGD"]["pretrained_mean"] - zero),
                100 * (by["Fine-tune"]["pretrained_mean"] - zero),
                100 * (by["MDGD"]["target"] - by["Fine-tune"]["target"]),
            )
        )
    forget = [md > ft for md, ft, _ in per_seed]
    close = [gap >= -margin for _, _, gap in per_seed]
    changes = ", ".join(f"{md:+.1f} vs {ft:+.1f}" for md, ft, _ in per_seed)
    gaps = ", ".join(f"{gap:+.1f}" for _, _, gap in per_seed)
    return [
        f"{_holds(forget, seeds)}: MDGD forgets less than fine-tuning "
        f"(pre-trained tasks, points vs zero-shot, MDGD vs fine-tuning: {changes}).",
        f"{_holds(close, seeds)}: MDGD's target score is within {margin:g} points of "
        f"fine-tuning's or above it (MDGD minus fine-tuning: {gaps} points).",
    ]


def _holds(ok: list[bool], seeds: list[int]) -> str:
    where = "this run" if len(seeds) == 1 else f"{len(seeds)} seeds"
    if all(ok):
        return f"HOLDS in {where} (seed {', '.join(map(str, seeds))})"
    failed = ", ".join(str(s) for s, good in zip(seeds, ok) if not good)
    return f"DOES NOT HOLD in {where}: {sum(ok)} of {len(ok)}, fails in seed {failed}"


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def columns(pretrained_tasks: list[str], target: str, caption: bool) -> list[str]:
    """The table's numeric columns (after ``Method``)."""
    tgt = [f"{target} F1 (target)", f"{target} EM"] if caption else [f"{target} (target)"]
    return ["#Params", *pretrained_tasks, *tgt, "Avg", "H-score", "erank", "ms/step"]


def cells(row: Row, pretrained_tasks: list[str], target: str) -> dict[str, float | None]:
    """The row's numbers per column, in the table's units (scores in %), ``None`` for "-"."""
    s = summarise(row, pretrained_tasks, target)
    out: dict[str, float | None] = {"#Params": row.params}
    out.update({t: 100 * row.score[t] for t in pretrained_tasks})
    if target in row.exact_match:
        out[f"{target} F1 (target)"] = 100 * row.score[target]
        out[f"{target} EM"] = 100 * row.exact_match[target]
    else:
        out[f"{target} (target)"] = 100 * row.score[target]
    out.update(
        {
            "Avg": 100 * s["avg"],
            "H-score": 100 * s["h_score"],
            "erank": s["erank_mean"],
            "ms/step": row.step_ms,
        }
    )
    return out


def _fmt(col: str, v: float | None) -> str:
    if v is None:
        return "-"
    if col == "#Params":
        return _fmt_params(round(v))
    return f"{v:.0f}" if col == "ms/step" else f"{v:.1f}"


def table_rows(rows: list[Row], pretrained_tasks: list[str], target: str) -> tuple[list[str], list]:
    caption = any(target in r.exact_match for r in rows)
    cols = columns(pretrained_tasks, target, caption)
    body = []
    for r in rows:
        c = cells(r, pretrained_tasks, target)
        body.append([r.method, *(_fmt(k, c[k]) for k in cols)])
    return ["Method", *cols], body


def aggregate(runs: list[list[Row]], pretrained_tasks: list[str], target: str) -> dict:
    """``{method: {column: {"mean", "std", "values"}}}`` over the seeds' rows (``runs[i]``
    is one seed's rows, in the same method order); ``std`` is the sample standard
    deviation (n - 1); a column that is "-" in a row is ``None``."""
    out: dict[str, dict] = {}
    for rows in zip(*runs):
        per_seed = [cells(r, pretrained_tasks, target) for r in rows]
        out[rows[0].method] = {
            col: None
            if per_seed[0][col] is None
            else {
                "mean": statistics.fmean(v[col] for v in per_seed),
                "std": statistics.stdev(v[col] for v in per_seed) if len(per_seed) > 1 else 0.0,
                "values": [v[col] for v in per_seed],
            }
            for col in per_seed[0]
        }
    return out


def aggregate_rows(agg: dict, head: list[str]) -> list[list[str]]:
    """Table cells ``mean ± std`` (#Params: the mean) from :func:`aggregate`."""
    body = []
    for method, cols in agg.items():
        line = [method]
        for col in head[1:]:
            c = cols[col]
            if c is None:
                line.append("-")
            elif col == "#Params":
                line.append(_fmt(col, c["mean"]))
            else:
                line.append(f"{_fmt(col, c['mean'])} ± {_fmt(col, c['std'])}")
        body.append(line)
    return body


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
    seeds = meta["seeds"]
    over = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"seeds {', '.join(map(str, seeds))} (each cell: mean ± sample std over the seeds)"
    )
    text = [
        "# mdgd demo: visual forgetting (the shape of the paper's Table 1)",
        "",
        f"Measured on {meta['machine']}, {meta['threads']} torch thread(s), {over}, "
        f"size `{meta['size']}`, target `{report['tasks']['target']}`; "
        f"wall time {meta['wall_seconds']:.0f} s.",
        "",
        "Scores in %, on held-out examples (accuracy; for the caption target, token F1 and "
        "exact match of greedy generation); `erank` is the effective rank (Eq. 4) of the "
        "last hidden layer at the image tokens, mean over the pre-trained tasks.",
        "",
        table_md,
        "",
        *(f"- {line}" for line in report["verdict"]),
        "",
    ]
    path.write_text("\n".join(text))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path: Path, agg: dict, pretrained_tasks: list[str], target_col: str) -> None:
    """Score per task and method, and the visual tokens' effective rank per method, from
    :func:`aggregate` (error bars: the std over seeds, when there are several)."""
    plt = _pyplot()
    cols, names = [*pretrained_tasks, target_col], list(agg)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.3]}, constrained_layout=True
    )
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        means = [agg[name][c]["mean"] for c in cols]
        errs = [agg[name][c]["std"] for c in cols]
        ax1.bar(xs, means, width, yerr=errs if any(errs) else None, label=name)
    ax1.set_xticks(range(len(cols)))
    ax1.set_xticklabels([*pretrained_tasks, target_col.replace(" (target)", "\n(target)")])
    ax1.axvline(len(pretrained_tasks) - 0.5, color="grey", lw=0.8, ls=":")
    ax1.set_ylabel("score (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title("score per task after instruction-tuning on the target task")
    ax1.legend(fontsize=8, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.13))

    ers = [agg[n]["erank"]["mean"] for n in names]
    er_std = [agg[n]["erank"]["std"] for n in names]
    ax2.bar(
        range(len(names)),
        ers,
        yerr=er_std if any(er_std) else None,
        color=[f"C{i}" for i in range(len(names))],
    )
    ax2.axhline(ers[0], color="black", lw=0.8, ls="--", label=f"{names[0]}: {ers[0]:.1f}")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("effective rank")
    ax2.set_title("effective rank of the visual tokens")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(path: Path, tradeoff: dict) -> None:
    """Target score against the pre-trained tasks' mean, one line per method, one point per
    number of phase-2 steps (0: the pre-trained model, shared by every line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.2), constrained_layout=True)
    for i, (name, points) in enumerate(tradeoff["methods"].items()):
        xs = [p["pretrained_mean"] for p in points]
        ys = [p["target"] for p in points]
        ax.plot(xs, ys, "-o", color=f"C{i}", label=name, ms=5)
        for p in points[1:]:
            ax.annotate(
                str(p["steps"]),
                (p["pretrained_mean"], p["target"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color=f"C{i}",
            )
    zero = next(iter(tradeoff["methods"].values()))[0]
    ax.plot([zero["pretrained_mean"]], [zero["target"]], "k*", ms=12, label="pre-trained (0 steps)")
    seeds = tradeoff["seeds"]
    over = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {seeds}"
    ax.set_xlabel("pre-trained tasks' mean score (%)  -> remembers more")
    ax.set_ylabel(f"target score: {tradeoff['target']} {tradeoff['metric']} (%)  -> learns more")
    ax.set_title(
        f"learning vs forgetting: one point per number of phase-2 steps (labels), {over}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(
    out_dir: Path,
    report: dict,
    head: list[str],
    body: list[list[str]],
    agg: dict,
    pretrained_tasks: list[str],
) -> dict:
    """Write ``report.json``, ``report.md``, ``report.png`` and, when the report has a
    trade-off sweep, ``report_tradeoff.png``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "figure": out_dir / "report.png",
    }
    if "tradeoff" in report:
        paths["tradeoff"] = out_dir / "report_tradeoff.png"
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2))
    write_markdown(paths["markdown"], report, markdown_table(head, body))
    plot(paths["figure"], agg, pretrained_tasks, head[len(pretrained_tasks) + 2])
    if "tradeoff" in report:
        plot_tradeoff(paths["tradeoff"], report["tradeoff"])
    return paths
