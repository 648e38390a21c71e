"""What a run will need, said before it trains: its peak memory per process and, with `--plan`, its time.

Every `unift train` estimates its peak memory once the model is loaded and wrapped, before the first step:
what the process holds then (measured: the libraries, the data, the weights as loaded) plus what training
adds (gradients and optimizer state of the trainable weights, the engine's buffers or shards, the
activations of the largest micro-batch the data can make) and stops, in one line, where that exceeds the
memory available (RAM on a CPU, the GPU's on CUDA) unless --force. `--plan` adds a timed probe (the run's
first steps on its longest examples, unift.train.probe) whose measured peak and step time replace the
estimate, and prints the plan instead of training (docs/plan.md has the formulas and their accuracy).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unift.errors import UniftError
from unift.runtime import is_main_process, peak_rss_mib, rss_mib, world_size
from unift.train.prepared import PreparedRun

log = logging.getLogger("unift")

MIB = 2**20
# For tests and rehearsals: pretend each process has this many MiB available (the refusal is then testable
# on any machine). Not for production use: it hides what the machine really has.
AVAILABLE_ENV = "UNIFT_AVAILABLE_MIB"

# Optimizer state in bytes per trainable parameter (transformers' optimizer names, matched by prefix):
# AdamW keeps two fp32 moments; the 8-bit ones two 1-byte moments; momentum-only optimizers one moment;
# Adafactor factored second moments (rows + columns: negligible); GaLore/APOLLO low-rank moments (a
# quarter is a rank-128 projection of 512-wide matrices; smaller for wider ones).
OPTIMIZER_BYTES = (("sgd", 0.0), ("adafactor", 0.0), ("galore", 2.0), ("apollo", 2.0), ("lion_8bit", 1.0),
                   ("lion", 4.0), ("rmsprop", 4.0), ("adagrad", 4.0), ("paged_adamw_8bit", 2.0),
                   ("adamw_8bit", 2.0), ("adamw_bnb_8bit", 2.0), ("paged_adamw", 8.0), ("adam", 8.0))


@dataclass
class Batches:
    """The micro-batches the run will make, in tokens the model computes on (padding included)."""

    largest: int  # tokens of the largest micro-batch (the activations' peak)
    mean_step: float  # mean tokens per optimizer step of one process
    steps: int  # optimizer steps of the whole run
    examples: int


@dataclass
class Estimate:
    """The predicted peak of one process, by part, in MiB."""

    device: str
    engine: str
    world_size: int
    parameters: int
    trainable: int
    optimizer: str
    held_mib: float  # measured: what the process holds once the model is loaded (weights included)
    weights_mib: float  # of which the model's parameters and buffers (trainable ones included)
    gradients_mib: float
    optimizer_mib: float
    engine_mib: float  # DDP's gradient buckets; minus the shards FSDP/ZeRO-3 drop (negative)
    activations_mib: float
    largest_batch_tokens: int
    gradient_checkpointing: bool
    peak_so_far_mib: float  # the process's peak before training (loading can be its highest point)
    available_mib: float | None
    available_what: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def peak_mib(self) -> float:
        training = (self.held_mib + self.gradients_mib + self.optimizer_mib + self.engine_mib
                    + self.activations_mib)
        return max(self.peak_so_far_mib, training)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_mib": self.peak_mib}


def optimizer_bytes(name: str) -> float:
    for prefix, per_parameter in OPTIMIZER_BYTES:
        if name.startswith(prefix) or prefix in name:
            return per_parameter
    return 8.0  # an optimizer not listed: assume AdamW's two moments (the common case, and the larger)


def _cfg(config: Any, *names: str, default: int = 0) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in names:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def activation_bytes(config: Any, tokens: int, *, compute_bytes: int, checkpointing: bool, label_tokens: int,
                     eager_attention: bool = False, rows: int = 1) -> float:
    """Bytes autograd keeps for one micro-batch of `tokens` tokens in `rows` rows. Per decoder layer and
    token (a pre-norm transformer, gated or plain MLP): the inputs of the q/k/v, o, up/gate and down
    projections, q, k, v after the rotary embedding and the attention output (h, h + 2 kv, 2 h), the MLP's
    intermediate tensors (4 i: gate, up, activation, product) in the compute dtype, and the two norms'
    fp32 inputs (2 h x 4 bytes). Gradient checkpointing keeps each layer's input only and recomputes one
    layer at a time. The head: fp32 logits and their gradient over the tokens with a loss (`label_tokens`;
    all tokens without the label_loss lever). Eager attention also keeps its score matrices."""
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model")
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head", default=1)
    kv_heads = _cfg(config, "num_key_value_heads", "multi_query_group_num", default=heads)
    head_dim = _cfg(config, "head_dim", "kv_channels", default=max(1, hidden // heads))
    inner = _cfg(config, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * hidden)
    vocab = _cfg(config, "vocab_size", "padded_vocab_size", default=32000)
    kv = kv_heads * head_dim
    per_layer = compute_bytes * (6 * hidden + 2 * kv + 4 * inner) + 4 * 2 * hidden
    if eager_attention:
        per_row = tokens / max(1, rows)
        per_layer += compute_bytes * heads * per_row * 2  # scores and probabilities, per token of a row
    if checkpointing:
        body = layers * compute_bytes * hidden * tokens + per_layer * tokens
    else:
        body = layers * per_layer * tokens
    head = label_tokens * vocab * 4 * 2 + tokens * hidden * 4
    return body + head


def planned_batches(lengths: list[int], args: Any, *, padding_free: bool, multiple: int, steps: int,
                    seed: int = 0) -> Batches:
    """The run's micro-batches from the examples' token counts, as its sampler would draw them (random
    order, `per_gpu_train_batch_size` each, padded to `multiple` tokens; padded batches: every row to the
    longest): the largest micro-batch the data can make, and the mean tokens per optimizer step."""
    import random

    batch = args.per_gpu_train_batch_size
    multiple = max(1, multiple)

    def tokens(rows: list[int]) -> int:
        if not rows:
            return 0
        if padding_free:
            total = sum(rows)
            return total + -total % multiple
        width = max(rows)
        return len(rows) * (width + -width % multiple)

    longest = sorted(lengths, reverse=True)[:batch]
    order = list(lengths)
    random.Random(seed).shuffle(order)
    micro = [tokens(order[i:i + batch]) for i in range(0, len(order), batch)] or [0]
    mean_micro = sum(micro) / len(micro)
    return Batches(largest=tokens(longest), mean_step=mean_micro * args.gradient_accumulation_steps,
                   steps=steps, examples=len(lengths))


def token_counts(dataset: Any, column: str) -> list[int]:
    """The length of each row's `column` (a list of token ids), read by Arrow: a column of a million rows
    made into Python lists would cost more memory than the run."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def example_lengths(dataset: Any, args: Any) -> list[int]:
    """Token counts of the training examples (a stream's are unknown: each counts as --cutoff_len). A
    preference pair is trained as prompt + chosen and prompt + rejected: its longer half counts, twice."""
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        n = max(1, args.max_steps) * args.per_gpu_train_batch_size * args.gradient_accumulation_steps
        return [args.cutoff_len] * n
    if "input_ids" in columns:
        return token_counts(dataset, "input_ids")
    prompts = token_counts(dataset, "prompt_ids") if "prompt_ids" in columns else [0] * len(dataset)
    if "chosen_ids" in columns:
        answers = [max(c, r) for c, r in zip(token_counts(dataset, "chosen_ids"), token_counts(dataset, "rejected_ids"))]
        return [n for p, a in zip(prompts, answers) for n in (p + a, p + a)]
    if "completion_ids" in columns:
        return [p + c for p, c in zip(prompts, token_counts(dataset, "completion_ids"))]
    completion = getattr(args, "max_completion_length", 0)  # grpo: prompts, each sampled num_generations times
    return [p + completion for p in prompts for _ in range(getattr(args, "num_generations", 1))]


def _meminfo() -> dict[str, int]:
    found = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


def _cgroup_room() -> float | None:
    """What the container's memory limit leaves (cgroup v2), in bytes; None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0.0, int(limit) - used)


def local_processes() -> int:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return world_size()


def available_mib(device: str) -> tuple[float | None, str]:
    """(MiB one process may grow to, what that is): on CUDA the GPU's free memory plus what torch already
    holds; on a CPU the system's MemAvailable (or the container's limit, if lower) shared by the processes
    of this machine, plus what this process already holds. None where it cannot be read."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        try:
            return float(override), f"{AVAILABLE_ENV}"
        except ValueError:
            raise UniftError(f"{AVAILABLE_ENV}={override}: expected a number of MiB") from None
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return (free + torch.cuda.memory_reserved()) / MIB, "GPU memory"
    room = _meminfo().get("MemAvailable")
    cgroup = _cgroup_room()
    if room is None and cgroup is None:
        return None, "RAM"
    room = min(x for x in (room, cgroup) if x is not None)
    return room / MIB / local_processes() + (rss_mib() or 0.0), "RAM"


def estimate(args: Any, prepared: PreparedRun, model: Any, *, padding_free: bool, label_loss: bool,
             multiple: int, steps: int, optimizer: str) -> tuple[Estimate, Batches]:
    """The predicted peak of this process for the run, from the loaded model and the data's lengths."""
    import torch

    device = prepared.device
    on_gpu = device.startswith("cuda")
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trained = [p for p in params if p.requires_grad]
    trainable = sum(p.numel() for p in trained)
    grads = 4.0 * trainable  # fp32 gradients: the weights that train are fp32 on every plan
    opt_state = optimizer_bytes(optimizer) * trainable
    if optimizer == "badam":  # AdamW over one block (decoder layer) at a time
        opt_state = 8.0 * trainable / max(1, _cfg(model.config, "num_hidden_layers", "n_layer", default=1))
    elif optimizer == "muon":  # one momentum buffer per Muon matrix, AdamW's two moments for the other tensors
        from unift.train.muon import split_parameters

        matrices, others = split_parameters(model)
        opt_state = 4.0 * sum(p.numel() for _, p in matrices) + 8.0 * sum(p.numel() for _, p in others)
    scaling = prepared.scaling
    name, world = scaling.engine, scaling.world_size
    extra = 0.0
    if name == "ddp":
        extra = grads  # the gradient buckets all-reduce works on: a second copy of the gradients
    elif scaling.sharded:
        extra = -weights * (1 - 1 / world)  # every rank loaded the whole model; each keeps its shard
        grads, opt_state = grads / world, opt_state / world
    elif name == "deepspeed" and scaling.zero_stage in (1, 2):
        grads, opt_state = (grads if scaling.zero_stage == 1 else grads / world), opt_state / world
    lengths = example_lengths(prepared.train, args)
    batches = planned_batches(lengths, args, padding_free=padding_free, multiple=multiple, steps=steps,
                              seed=args.seed)
    label_share = 1.0
    if label_loss and "labels" in getattr(prepared.train, "column_names", ()):
        sample = prepared.train.select(range(min(256, len(prepared.train))))["labels"]
        total = sum(len(x) for x in sample)
        label_share = sum(1 for row in sample for t in row if t >= 0) / total if total else 1.0
    compute_bytes = prepared.plan.compute_dtype.itemsize
    rows = 1 if padding_free else args.per_gpu_train_batch_size
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    acts = activation_bytes(model.config, batches.largest, compute_bytes=compute_bytes,
                            checkpointing=args.gradient_checkpointing, label_tokens=math.ceil(
                                batches.largest * label_share), eager_attention=eager, rows=rows)
    if on_gpu:
        held, before = torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB
    else:
        held, before = rss_mib() or peak_rss_mib(), peak_rss_mib()
    room, what = available_mib(device)
    result = Estimate(device=device, engine=name, world_size=world, parameters=sum(p.numel() for p in params),
                      trainable=trainable, optimizer=optimizer, held_mib=held, weights_mib=weights / MIB,
                      gradients_mib=grads / MIB, optimizer_mib=opt_state / MIB, engine_mib=extra / MIB,
                      activations_mib=acts / MIB, largest_batch_tokens=batches.largest,
                      gradient_checkpointing=args.gradient_checkpointing, peak_so_far_mib=before,
                      available_mib=room, available_what=what)
    return result, batches


def refusal(peak: float, available: float | None, what: str, *, measured: bool) -> str | None:
    """The one line that stops a run predicted not to fit, or None."""
    if available is None or peak <= available:
        return None
    source = "measured by the --plan probe" if measured else "predicted"
    return (f"peak memory {peak:,.0f} MiB per process {source} exceeds the {available:,.0f} MiB of {what} "
            "available: lower --per_gpu_train_batch_size or --cutoff_len, add --gradient_checkpointing, "
            "see the parts with --plan, or pass --force to train anyway")


def check_memory(args: Any, prepared: PreparedRun, model: Any, accel: Any, steps: int) -> tuple[Estimate, Batches]:
    """Every run, before the first step: the estimate, logged in one line, and the refusal unless --force."""
    optimizer = args.optim or prepared.method.optimizer_name()
    label_loss = any(name.startswith("label_loss") for name in accel.applied)
    found, batches = estimate(args, prepared, model, padding_free=accel.padding_free, label_loss=label_loss,
                              multiple=accel.shape_multiple, steps=steps, optimizer=optimizer)
    room = "" if found.available_mib is None else f" of {found.available_mib:,.0f} MiB {found.available_what} available"
    if is_main_process():
        log.info("memory: about %s MiB per process predicted%s (held now %s, gradients %s, optimizer %s, "
                 "activations %s for %d tokens)", f"{found.peak_mib:,.0f}", room, f"{found.held_mib:,.0f}",
                 f"{found.gradients_mib:,.0f}", f"{found.optimizer_mib:,.0f}", f"{found.activations_mib:,.0f}",
                 found.largest_batch_tokens)
    line = refusal(found.peak_mib, found.available_mib, found.available_what, measured=False)
    if line and not args.force:
        raise UniftError(line)
    if line:
        log.warning("warning: --force: %s", line.split(": lower")[0])
    return found, batches
