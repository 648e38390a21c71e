"""Where a training step's time goes, from torch.profiler's CPU events (bench/step_profile.py records them,
bench/step_budget.py prints them): needs only torch, so that it runs in either tool's environment.

Every op's self time is counted once, in one bucket chosen by its name, except inside two ranges whose
whole time (Python included) is theirs: the batch fetch (DATA_RANGE) and the optimizer step with gradient
clipping (OPTIMIZER_RANGE and torch's own Optimizer.step#...). Autograd's own events (evaluate_function,
the *Backward nodes, AccumulateGrad) and custom autograd Functions (events named by their class, no
"::") keep their self time as "autograd + custom Functions": the engine, and the Python of those Functions'
forward and backward passes between their ops. What no event covers on the training thread (wall time
minus the top-level events) is Python between ops: module calls, hooks, the Trainer's loop.
"""

from __future__ import annotations

import re
from collections import defaultdict

DATA_RANGE = "budget::data"
OPTIMIZER_RANGE = "budget::optimizer"

MATMUL, ELEMENTWISE, NORM, SOFTMAX, COPIES, AUTOGRAD, OTHER = (
    "matmul + attention kernels", "elementwise / activation / reductions", "norms",
    "softmax / loss (log_softmax, nll)", "copies, casts, views, allocation", "autograd + custom Functions", "other ops")
OPTIMIZER, DATA, PYTHON = "optimizer step + grad clipping", "data / collation", "Python between ops (unprofiled)"
BUCKETS = (MATMUL, ELEMENTWISE, NORM, SOFTMAX, COPIES, AUTOGRAD, OTHER, OPTIMIZER, DATA, PYTHON)

# leaf kernels of matrix products and fused attention, forward and backward (the composite aten::matmul,
# aten::linear and aten::einsum only dispatch to them: their small self time is counted here too)
_MATMUL = re.compile(r"aten::(mm|bmm|addmm|addmv|mv|baddbmm|addbmm|dot|matmul|linear|einsum|"
                     r"_?scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*|_fused_sdp_choice)_?$"
                     r"|mkldnn|onednn")
_NORM = re.compile(r"norm", re.IGNORECASE)
_SOFTMAX = re.compile(r"softmax|nll_loss|cross_entropy", re.IGNORECASE)
_COPIES = re.compile(r"aten::(copy_|to|_to_copy|clone|contiguous|cat|stack|empty\w*|zeros\w*|ones\w*|full\w*|"
                     r"fill_|zero_|new_\w+|resize_|view|_unsafe_view|reshape|transpose|permute|expand\w*|t|"
                     r"as_strided|slice|select|index|index_select|gather|scatter\w*|unsqueeze|squeeze\w*|"
                     r"flatten|split\w*|chunk|narrow|unbind|detach\w*|alias|lift_fresh|set_|split_with_sizes|"
                     r"_reshape_alias|unfold|repeat\w*|masked_select|nonzero|item|_local_scalar_dense|"
                     r"_has_compatible_shallow_copy_type|result_type|is_nonzero|arange|index_put_|_index_put_impl_|"
                     r"embedding\w*|tril|triu)$")
# a custom autograd.Function's forward is recorded under its class name: no namespace
_AUTOGRAD = re.compile(r"^autograd::|Backward\d*$|AccumulateGrad|^torch::autograd|^[A-Za-z_]\w*$")
_ELEMENTWISE = re.compile(
    r"aten::(add|sub|mul|div|rsub|neg|pow|sqrt|rsqrt|exp|log|tanh|sigmoid|silu|gelu|relu|\w*_backward|"
    r"where|masked_fill|index_fill|clamp\w*|sum|mean|max|min|amax|cos|sin|reciprocal|abs|sign|eq|ne|lt|le|gt|ge|"
    r"bernoulli|dropout|native_dropout|rand\w*|uniform_|normal_|_foreach_\w+|lerp|addcmul|addcdiv|square|"
    r"maximum|minimum|floor\w*|ceil|round|logical_\w+|bitwise_\w+|all|any|cumsum|linalg_vector_norm|"
    r"softplus|erf|_fused_adamw_|_fused_adam_|sgn|exp2|copysign|fmod|remainder)_?$")


def bucket_of(name: str) -> str:
    """The bucket an op's self time belongs to, from its name."""
    if _AUTOGRAD.search(name):
        return AUTOGRAD
    if _MATMUL.search(name):
        return MATMUL
    if _SOFTMAX.search(name):
        return SOFTMAX
    if _NORM.search(name) and "clip_grad" not in name:
        return NORM
    if _ELEMENTWISE.match(name):
        return ELEMENTWISE
    if _COPIES.match(name):
        return COPIES
    return OTHER


def _range_bucket(name: str) -> str | None:
    if name == DATA_RANGE or name.startswith("enumerate(DataLoader)"):
        return DATA
    if name == OPTIMIZER_RANGE or name.startswith("Optimizer.step#") or name.startswith("Optimizer.zero_grad#"):
        return OPTIMIZER
    return None


def budget(events, wall_seconds: float, steps: int) -> dict:
    """What `steps` profiled steps that took `wall_seconds` consist of, from profiler events (FunctionEvent:
    name, cpu_children, cpu_parent, self_cpu_time_total and time_range in microseconds): each op's self
    seconds by the range it ran in ("" outside any), the ranges' whole seconds, and the wall time no
    top-level event covers. `summarize` turns it into buckets (kept apart so that a recorded profile can
    be read again with another classification)."""
    roots = [e for e in events if e.cpu_parent is None]
    by_thread: dict[int, float] = defaultdict(float)
    for e in roots:
        by_thread[e.thread] += e.time_range.elapsed_us()
    main = max(by_thread, key=by_thread.get) if by_thread else 0
    ranges: dict[str, float] = defaultdict(float)
    ops: dict[str, dict] = {}

    def count(event, inside: str) -> None:
        where = inside or _range_bucket(event.name) or ""
        if where and not inside:  # a range's whole time is its bucket's
            ranges[where] += event.time_range.elapsed_us() / 1e6
        if event.name not in (DATA_RANGE, OPTIMIZER_RANGE) and not event.name.startswith(("Optimizer.", "enumerate(")):
            slot = ops.setdefault(event.name, {"calls": 0, "self": defaultdict(float)})
            slot["calls"] += 1
            slot["self"][where] += event.self_cpu_time_total / 1e6
        for child in event.cpu_children:
            count(child, where)

    covered = 0.0
    for e in roots:
        if e.thread == main:
            covered += e.time_range.elapsed_us() / 1e6
            count(e, "")
    return {"steps": steps, "wall_seconds": wall_seconds, "uncovered_seconds": max(wall_seconds - covered, 0.0),
            "ranges": dict(ranges), "ops": ops,
            "other_threads_seconds": sum(v for t, v in by_thread.items() if t != main) / 1e6}


def summarize(raw: dict) -> dict:
    """Seconds per step in each bucket, and each op's self seconds and calls per step with its bucket (the
    range it ran in, where it ran only there), costliest first."""
    steps = raw["steps"]
    seconds = dict.fromkeys(BUCKETS, 0.0)
    seconds.update(raw["ranges"])
    seconds[PYTHON] = raw["uncovered_seconds"]
    rows = {}
    for name, op in raw["ops"].items():
        own = bucket_of(name)
        seconds[own] += op["self"].get("", 0.0)
        places = [w for w, s in op["self"].items() if s > 0] or [""]
        rows[name] = {"self_seconds": sum(op["self"].values()) / steps, "calls": op["calls"] / steps,
                      "bucket": places[0] or own if len(places) == 1 else own}
    return {"step_seconds": raw["wall_seconds"] / steps, "buckets": {k: v / steps for k, v in seconds.items()},
            "ops": dict(sorted(rows.items(), key=lambda kv: -kv[1]["self_seconds"]))}
