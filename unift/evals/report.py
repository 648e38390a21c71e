"""What `unift eval` shows: a Markdown table of every setup x figure, examples, and PNG bar charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (key in a task's figures, column title, format)
COLUMNS = (
    ("exact_match", "exact match", "pct"),
    ("perplexity", "perplexity (mean of per-example)", "num"),
    ("perplexity_corpus", "perplexity (corpus, per token)", "num"),
    ("bleu", "BLEU", "num"),
    ("rouge_l", "ROUGE-L", "num"),
    ("accuracy", "accuracy", "pct"),
    ("preference_accuracy", "preference accuracy", "pct"),
    ("margin", "log-likelihood margin", "num"),
    ("reward_margin", "reward margin", "num"),
)


def _cell(figures: dict[str, Any], key: str, kind: str) -> str:
    value = figures.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "pct":
        total = figures.get("total", figures.get("examples"))
        count = figures.get("correct")
        return f"{100 * value:.1f}% ({count}/{total})" if count is not None else f"{100 * value:.1f}%"
    return f"{value:.2f}" if value < 1000 else f"{value:.4g}"


def markdown_table(document: dict[str, Any]) -> str:
    """One row per setup; per task, one column per figure it has."""
    rows = document["setups"]
    columns = []
    for task in rows[0]["tasks"] if rows else []:
        for key, title, kind in COLUMNS:
            if any(key in r["tasks"][task] for r in rows):
                columns.append((task, key, title, kind))
    lines = ["| model | " + " | ".join(f"{task}: {title}" for task, _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [_cell(r["tasks"][task], key, kind) for task, key, _, kind in columns]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    subjects = subject_table(document)
    return "\n".join(lines) + (f"\n\n{subjects}" if subjects else "")


def subject_table(document: dict[str, Any]) -> str:
    """Exam accuracy per subject (rows) and setup (columns), when an exam was scored."""
    rows = document["setups"]
    exams = [t for t in (rows[0]["tasks"] if rows else {}) if "subjects" in rows[0]["tasks"][t]]
    parts = []
    for task in exams:
        subjects = sorted(rows[0]["tasks"][task]["subjects"])
        lines = [f"| {task}: subject | " + " | ".join(r["label"] for r in rows) + " |",
                 "|---|" + "---:|" * len(rows)]
        for s in subjects:
            cells = [_cell(r["tasks"][task]["subjects"][s], "accuracy", "pct") for r in rows]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def print_examples(document: dict[str, Any], references: dict[str, list], show: int) -> None:
    """The first `show` questions of each generation task with every setup's answer."""
    rows = document["setups"]
    for task, conversations in references.items():
        for i in range(min(show, len(conversations))):
            print(f"\nQ: {conversations[i][-2]['content'] if len(conversations[i]) > 1 else ''}")
            print(f"   reference: {conversations[i][-1]['content']!r}")
            for r in rows:
                predictions = r["tasks"].get(task, {}).get("predictions")
                if predictions:
                    print(f"   {r['label']:>12}: {predictions[i]!r}")


def plot_results(document: dict[str, Any], folder: Path) -> list[Path]:
    """One bar chart per figure (setups side by side, one group per task), as PNG files in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = document["setups"]
    written = []
    tasks = list(rows[0]["tasks"]) if rows else []
    for key, title, kind in COLUMNS:
        present = [t for t in tasks if any(key in r["tasks"][t] for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(present) * len(rows) / 2, 3.2))
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            values = [r["tasks"][t].get(key, math.nan) * (100 if kind == "pct" else 1) for t in present]
            bars = ax.bar([i + j * width for i in range(len(present))], values, width, label=r["label"])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(present))], present)
        ax.set_ylabel(title + (" (%)" if kind == "pct" else ""))
        ax.set_title(f"{document.get('model', '')}: {title}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"eval_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
