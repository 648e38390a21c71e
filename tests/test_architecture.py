"""The shape of the package (docs/architecture.md), checked from the code's own imports: no import circle
(function-level imports included), imports point down the floors, no module over 400 lines, one module per
command with its options dataclass, one file per PEFT method that brings its own flags."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unift"
MAX_LINES = 400
BASE = {"errors", "options", "runtime", "allocator", "compat", "console"}  # the ground floor: anyone may import these
# floor -> the floors it may import (besides its own modules); docs/architecture.md says why
ALLOWED = {
    "errors": set(), "options": {"errors"}, "runtime": {"errors"}, "allocator": set(), "compat": {"errors"},
    "console": {"compat"},
    "data": BASE,
    "models": BASE | {"data"},
    "peft": BASE | {"data", "models"},
    "accel": BASE | {"data", "models"},
    "loader": BASE | {"data", "models", "peft"},
    "inference": BASE | {"data", "models", "peft", "loader"},
    "train": BASE | {"data", "models", "peft", "accel", "loader"},
    "evals": BASE | {"data", "models", "inference"},
    "serve": BASE | {"data", "models", "inference"},
    "commands": BASE | {"data", "models", "peft", "accel", "loader", "inference", "train", "evals", "serve"},
    "cli": BASE,  # the commands are imported by name (importlib), only the one that runs
    "__main__": {"cli"},
    "__init__": set(),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the unift modules it imports anywhere in its text (module, class or function level)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if package else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("unift") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_checker_sees_a_circle_and_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    # unift.commands.common imports the generator inside a function only: still an edge
    assert "unift.inference.generator" in graph["unift.commands.common"]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_floors():
    wrong = sorted(f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
                   if floor(target) != floor(module) and floor(target) not in ALLOWED[floor(module)])
    assert wrong == []


def test_no_module_over_400_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # `# long: <reason>` opening a body (after its docstring): a function kept long on purpose
def long_reason(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str:
    """The reason a `# long: <reason>` comment line gives between the function's docstring (or its def
    line) and its first statement; '' when there is none."""
    body = node.body
    documented = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    code = body[1:] if documented else body
    start = body[0].end_lineno if documented else node.lineno  # 1-based line before the comments: 0-based index after
    stop = code[0].lineno - 1 if code else node.end_lineno
    for text in lines[start:stop]:
        if text.strip().startswith(LONG_MARK):
            return text.strip()[len(LONG_MARK):].strip()
    return ""


def long_functions(source: str) -> dict[str, int]:
    """Qualified name -> lines of each function or method (nested ones included) over MAX_FUNCTION_LINES
    that gives no `# long:` reason."""
    lines = source.splitlines()
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = child.end_lineno - child.lineno + 1
                if length > MAX_FUNCTION_LINES and not long_reason(child, lines):
                    found[prefix + child.name] = length
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, f"{prefix}{child.name}." if isinstance(child, ast.ClassDef) else prefix)

    visit(ast.parse(source), "")
    return found


def package_long_functions() -> dict[str, int]:
    return {f"{path.relative_to(PACKAGE.parent).as_posix()}::{name}": n for path in sorted(PACKAGE.rglob("*.py"))
            for name, n in long_functions(path.read_text(encoding="utf-8")).items()}


def test_the_long_function_checker_counts_from_def_to_end_and_reads_the_reason():
    def function(name: str, header: str, body_lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + header + "".join(f"{indent}    x = {i}\n" for i in range(body_lines))

    source = (function("fits", "", 59)  # 60 lines with its def
              + function("too_long", '    """Doc."""\n', 60)
              + function("explained", '    """Doc."""\n    # long: one flat table\n', 70)
              + function("no_reason", "    # long:\n", 70)
              + "class C:\n" + function("method", "", 61, indent="    ")
              + function("outer", "    # long: a test\n", 1) + function("inner", "", 61, indent="    "))
    assert long_functions(source) == {"too_long": 62, "no_reason": 72, "C.method": 62, "outer.inner": 62}


def test_no_function_over_60_lines_without_a_reason():
    """A function over 60 lines is split into named helpers, or opens its body (after the docstring) with
    `# long: <why>` where splitting would read worse (a flat table-like sequence, a hot loop)."""
    assert package_long_functions() == {}


def test_every_command_is_a_module_with_an_options_dataclass():
    from unift.cli import COMMANDS, command_module

    files = {m.name for m in pkgutil.iter_modules([str(PACKAGE / "commands")])} - {"common"}
    assert {module for module, _ in COMMANDS.values()} == files
    for name in COMMANDS:
        module = command_module(name)
        actions = getattr(module, "SUBCOMMANDS", None)
        pairs = [(o, r) for o, r, _, _ in actions.values()] if actions else [(module.OPTIONS, module.run)]
        for options, run in pairs:
            assert dataclasses.is_dataclass(options) and callable(run), name
            assert all("help" in f.metadata for f in dataclasses.fields(options)), name


def test_preset_names_written_for_the_flags_are_the_generation_presets():
    from unift.commands.common import PRESET_NAMES
    from unift.inference.settings import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)


def test_every_method_file_registers_methods_that_bring_their_flags():
    from unift.peft import METHODS, method_flag_fields
    from unift.train.args import RunArgs, TrainArgs
    from unift.train.stages import stage_flag_fields

    registered = {m.name: m for m in METHODS.values()}
    by_file: dict[str, list[str]] = {}
    for spec in registered.values():
        by_file.setdefault((spec.build or spec.own_weights).__module__, []).append(spec.name)
    files = {f"unift.peft.methods.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / "peft" / "methods")])}
    assert set(by_file) == files  # every method file registers something, every method lives in one
    general = {f.name for f in dataclasses.fields(RunArgs)}
    method_flags = {f.name for f in method_flag_fields()}
    stage_flags = {f.name for f in stage_flag_fields()}
    # a flag is general, a stage's or a method's, never two of them
    assert not general & method_flags and not general & stage_flags and not stage_flags & method_flags
    assert {f.name for f in dataclasses.fields(TrainArgs)} == general | method_flags | stage_flags
    for spec in registered.values():
        assert spec.flags is None or set(spec.options) >= {f.name for f in dataclasses.fields(spec.flags)}


def test_every_stage_file_registers_one_stage_that_brings_its_flags():
    """A stage is one file under unift/train/stages/ (besides the registry and what stages share): it
    registers exactly one StageSpec, whose flags `unift train` offers and no other stage defines."""
    from unift.train.stages import STAGES

    folder = PACKAGE / "train" / "stages"
    files = {m.name for m in pkgutil.iter_modules([str(folder)])} - {"registry", "shared", "__main__"}
    assert files == set(STAGES)  # one file per stage, named after it
    for name in files:
        assert (folder / f"{name}.py").read_text(encoding="utf-8").count("register_stage(StageSpec(") == 1, name
    orders = [s.order for s in STAGES.values()]
    assert orders == sorted(set(orders))  # listed in their order, no two in one place


# Private methods of another library that a class outside unift.compat may define, and why
PRIVATE_OVERRIDES_ALLOWED: dict[str, str] = {
    # peft's BaseTuner is an extension point: a custom tuner (unift's bottleneck adapters) implements these
    "unift.peft.bottleneck.BottleneckModel._prepare_adapter_config": "peft's tuner interface",
    "unift.peft.bottleneck.BottleneckModel._check_merge_allowed": "peft's tuner interface",
    "unift.peft.bottleneck.BottleneckModel._unload_and_optionally_merge": "peft's tuner interface",
}


def private_overrides() -> list[str]:
    """module.Class.method for each single-underscore method a unift class outside compat defines that an
    upstream class also has: one in the class's own bases, or (for unift.train's mixins) the trainers unift
    mixes its hooks into."""
    import transformers
    import trl

    mixed_into = [transformers.Trainer, trl.DPOTrainer, trl.KTOTrainer, trl.RewardTrainer, trl.GRPOTrainer]
    found = []
    for name in sorted(modules()):
        if name.startswith("unift.compat") or name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != name:
                continue
            upstream = [c for c in cls.__mro__ if not c.__module__.startswith("unift")]
            upstream += mixed_into if name.startswith("unift.train") else []
            for attr, value in vars(cls).items():
                if not attr.startswith("_") or attr.startswith("__") or not inspect.isfunction(getattr(value, "__func__", value)):
                    continue
                for base in upstream:
                    method = getattr(base, attr, None)
                    if method is not None and not getattr(method, "__isabstractmethod__", False):
                        found.append(f"{name}.{cls.__qualname__}.{attr}")
                        break
    return found


def test_private_methods_of_other_libraries_are_overridden_only_in_compat():
    """An override of another library's private method breaks silently when that library changes; in
    unift.compat each has a test in tests/test_compat.py that fails first."""
    assert sorted(set(private_overrides()) - set(PRIVATE_OVERRIDES_ALLOWED)) == []


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.startswith("unift.compat")))
def test_compat_patches_import_nothing_of_unift_above_them(name):
    assert {floor(t) for t in import_graph()[name]} <= {"compat", "errors"}


# The registries: every fact about a method or a family lives on its MethodSpec or ModelSpec. A literal
# collection naming two or more methods (or families) elsewhere is a second table that drifts from the
# registry, as the in-memory merge set and two model_type maps once did.
REGISTRY_FILES = ("unift/models/registry.py", "unift/peft/registry.py", "unift/peft/methods/")
# Tables keyed by names that merely coincide with family names, and why they are not family facts
NOT_FAMILY_TABLES = {
    # transformers' config.model_type of a merged checkpoint -> llama.cpp's architecture: a fact of the file
    # format per architecture (the llama family's Mistral checkpoints, say, are not claimed by it)
    "unift/inference/gguf.py",
}


def registry_names() -> dict[str, set[str]]:
    from unift.models import MODELS
    from unift.peft import METHODS

    return {"methods": set(METHODS),
            "families": set(MODELS) | {t for spec in MODELS.values() for t in spec.hf_model_types}}


def name_tables(source: str, names: dict[str, set[str]]) -> list[tuple[int, str, list[str]]]:
    """(line, kind, names) of each literal set, tuple, list or dict (its keys) made of strings only, two or
    more of them names of one registry's entries."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        words = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
        if len(words) < 2 or len(words) != len(items):
            continue
        for kind, known in names.items():
            hits = [w for w in words if w in known]
            if len(hits) >= 2:
                found.append((node.lineno, kind, hits))
    return found


def test_the_name_table_checker_sees_a_set_of_methods_and_a_dict_of_families():
    names = {"methods": {"lora", "ia3"}, "families": {"llama", "glm4"}}
    source = 'A = frozenset({"lora", "ia3"})\nB = {"glm4": "x", "llama": "y"}\nC = ("lora", "other")\n'
    assert sorted(name_tables(source, names)) == [(1, "methods", ["lora", "ia3"]), (2, "families", ["glm4", "llama"])]


def test_only_the_registries_list_methods_and_families():
    names = registry_names()
    tables = [f"{path.relative_to(PACKAGE.parent)}:{line}: {kind} {hits}"
              for path in sorted(PACKAGE.rglob("*.py"))
              if not str(path.relative_to(PACKAGE.parent)).startswith(REGISTRY_FILES)
              for line, kind, hits in name_tables(path.read_text(encoding="utf-8"), names)
              if not (kind == "families" and str(path.relative_to(PACKAGE.parent)) in NOT_FAMILY_TABLES)]
    assert tables == []


# Which engine a run scales out with is decided once (unift.train.scaling); compat's keep-out reads the
# launcher's environment too, before anything is imported, to keep DeepSpeed out of runs that cannot use it.
ENGINE_DECIDERS = {"unift/train/scaling.py", "unift/compat/keep_out.py"}
ENGINE_INPUTS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "args.deepspeed")


def test_only_the_scaling_module_decides_the_engine():
    readers = sorted(f"{path.relative_to(PACKAGE.parent)}: {word}" for path in PACKAGE.rglob("*.py")
                     for word in ENGINE_INPUTS
                     if str(path.relative_to(PACKAGE.parent)) not in ENGINE_DECIDERS
                     and any(word in line and not line.lstrip().startswith("#")
                             for line in _code_lines(path)))
    assert readers == []


def _code_lines(path: Path) -> list[str]:
    """The module's lines outside its docstrings (a docstring may name what it is about)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {n for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and ast.get_docstring(node) is not None
            for n in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
    return [line for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if i not in docs]
