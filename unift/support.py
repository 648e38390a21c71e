"""The model_type x peft_type support matrix, computed from the registries (README's table is generated)."""

from __future__ import annotations

from unift.models import MODELS
from unift.peft import METHODS


def support_matrix() -> dict[str, dict[str, str]]:
    """{model_type: {peft_type: "" if it works, else the reason}}."""
    models = sorted({m.name for m in MODELS.values()})
    methods = sorted({m.name for m in METHODS.values()}, key=lambda n: list(METHODS).index(n))
    return {m: {p: METHODS[p].unsupported.get(m, "") for p in methods} for m in models}


def support_table() -> str:
    matrix = support_matrix()
    methods = list(next(iter(matrix.values())))
    lines = ["| model_type | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    notes: list[str] = []
    for model, row in matrix.items():
        cells = []
        for method in methods:
            reason = row[method]
            if reason:
                notes.append(f"{model} + {method}: {reason}")
                cells.append(f"no ({len(notes)})")
            else:
                cells.append("yes")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [""] + [f"({i}) {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines).rstrip()
