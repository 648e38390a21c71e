"""The model_type x peft_type support matrix, computed from the registries. `unift list` prints it and the
README's copy is generated from it (`python -m unift.peft.support --update-readme`; a test keeps them equal)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unift.models import MODELS
from unift.peft import METHODS, method_names

README_START = "<!-- support-matrix:start -->"
README_END = "<!-- support-matrix:end -->"


def support_matrix() -> dict[str, dict[str, str]]:
    """{model_type: {peft_type: "" if it works, else the reason}}."""
    models = sorted({m.name for m in MODELS.values()})
    methods = method_names()
    return {m: {p: METHODS[p].unsupported.get(m, "") for p in methods} for m in models}


def _matrix_table() -> str:
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
    if notes:
        lines += [""] + [f"({i}) {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines)


def _methods_table() -> str:
    lines = ["| peft_type | what it trains | its flags | merge | quantized base |", "|---|---|---|---|---|"]
    for name in method_names():
        method = METHODS[name]
        label = name + (f" ({', '.join(f'`{a}`' for a in method.aliases)})" if method.aliases else "")
        flags = " ".join(f"`--{o}`" for o in method.options if o not in ("quantization_bit", "load_in_8bit"))
        if method.mergeable and not method.merge_check:
            merge = "yes"
        else:
            merge = method.merge_note or "no"
        if method.quantization_note:
            quantized = method.quantization_note
        elif method.quantization_bit:
            quantized = f"{method.quantization_bit}-bit (always)"
        elif method.quantization_bits:
            quantized = " or ".join(f"{b}-bit" for b in method.quantization_bits)
        else:
            quantized = "no"
        lines.append(f"| {label} | {method.description} | {flags or '-'} | {merge} | {quantized} |")
    return "\n".join(lines)


def support_table() -> str:
    """The matrix (with the reason for every refused pair) and what each method is, as Markdown."""
    remote = "; ".join(sorted({f"{m.name}: {m.remote_code_note}" for m in MODELS.values() if m.remote_code_note}))
    return (
        _matrix_table()
        + "\n\nyes = trained, saved, reloaded to identical logits and generated with the KV cache by "
        "tests/test_peft_matrix.py on a tiny model of that family's native transformers class. Checkpoints "
        f"that need --trust_remote_code run their own modelling code ({remote}); tests/test_remote_code.py "
        "trains, reloads, generates with the KV cache and merges LoRA through a tiny ChatGLM-style model of "
        "that kind, with the targets found in the model (every linear layer but the output head).\n\n"
        + _methods_table()
    )


def _bounds(text: str, start_marker: str, end_marker: str) -> tuple[int, int]:
    return text.index(start_marker) + len(start_marker), text.index(end_marker)


def readme_block(readme: str) -> str:
    """The text between the README's support-matrix markers."""
    start, end = _bounds(readme, README_START, README_END)
    return readme[start:end].strip("\n")


def replace_between(path: Path, start_marker: str, end_marker: str, body: str) -> bool:
    """Write `body` between two marker comments of a generated README section; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = _bounds(text, start_marker, end_marker)
    new = text[:start] + "\n" + body + "\n" + text[end:]
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def update_readme(path: Path) -> bool:
    """Write the generated table between the markers; True when the file changed."""
    return replace_between(path, README_START, README_END, support_table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unift.peft.support", description=__doc__)
    parser.add_argument("--update-readme", nargs="?", const="README.md", metavar="PATH",
                        help="rewrite the table between the README markers (default: README.md)")
    ns = parser.parse_args(argv)
    if ns.update_readme:
        changed = update_readme(Path(ns.update_readme))
        print(f"{ns.update_readme}: {'updated' if changed else 'already up to date'}")
    else:
        print(support_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
