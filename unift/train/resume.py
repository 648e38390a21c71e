"""Resume anywhere: a checkpoint written under one engine and world size continues under another.

Every checkpoint holds, beside the engine's own state (DeepSpeed's partitions, FSDP's shards, optimizer.pt),
an engine-neutral form of the trained state, gathered whole: each trained parameter and its optimizer state
by parameter name (unift_resume.pt), and what wrote it (unift_resume.json: engine, world size, batch shape,
method, the trained parameters' shapes). The learning-rate schedule goes in the same file; trainer_state.json
and the RNG files are the Trainer's own. A resume under the same engine and world size takes the engine's
own state, as the Trainer does; under another one it loads the neutral form: the weights into the model
before the engine wraps it (so every engine shards them itself), the optimizer state into the optimizer the
engine built. The global batch stays the checkpoint's (the accumulation adjusts), so every later step trains
on the same examples as the uninterrupted run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unift.compat.trainer_resume import ResumeOverrides
from unift.errors import UniftError
from unift.runtime import write_json_atomic
from unift.train.scaling import Scaling

log = logging.getLogger("unift")

STATE_FILE = "unift_resume.pt"
CARD_FILE = "unift_resume.json"
FORMAT = 1
# Wrappers that engines put around modules; a parameter's name without them is the same under every engine.
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def canonical(name: str) -> str:
    for part in WRAPPERS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def engine_key(name: str, stage: int) -> str:
    """single, ddp, fsdp, zero1, zero2 or zero3: engines whose checkpoints differ in layout."""
    return f"zero{stage}" if name == "deepspeed" else name


def trained_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(canonical(name), p) for name, p in model.named_parameters() if p.requires_grad]


# ---- writing the neutral form (every rank: the whole tensors are gathered) ----------------------------

def _whole(tensor: Any) -> Any:
    from torch.distributed.tensor import DTensor

    value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return value.detach().to("cpu", copy=True)


def _torch_state(optimizer: Any, named: list[tuple[str, Any]]) -> tuple[dict, str | None]:
    """Per parameter name, the optimizer's state (moments whole), from a torch optimizer (single, DDP, FSDP)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    names = {id(p): name for name, p in named}
    state: dict[str, dict] = {}
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                return {}, "the optimizer holds tensors that are not the model's trained parameters"
            entry = {}
            for key, value in inner.state.get(p, {}).items():
                if not (torch.is_tensor(value) or isinstance(value, (int, float))):
                    return {}, f"{type(inner).__name__} keeps {key} as {type(value).__name__}, not a tensor"
                entry[key] = _whole(value) if torch.is_tensor(value) else value
            state[names[id(p)]] = entry
    return state, None


def _zero_optimizer(trainer: Any) -> tuple[Any, Any]:
    """DeepSpeed's ZeRO optimizer and the torch optimizer inside it (which holds flat partitions)."""
    zero = trainer.model_wrapped.optimizer
    return zero, zero.optimizer


def _flat_partitions(zero: Any, base: Any) -> list:
    """This rank's flat fp32 partitions, the tensors the torch optimizer keeps state for. ZeRO-1/2 keep
    them in the optimizer's groups; ZeRO-3 puts each one there only while it steps, and lists them in
    fp32_partitioned_groups_flat."""
    return list(getattr(zero, "fp32_partitioned_groups_flat", None) or
                [flat for group in base.param_groups for flat in group["params"]])


def _deepspeed_state(trainer: Any, named: list[tuple[str, Any]]) -> tuple[dict, str | None]:
    """The same from DeepSpeed's ZeRO partitions, gathered whole with DeepSpeed's own accessors."""
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, base = _zero_optimizer(trainer)
    group = base.param_groups[0]
    first = base.state.get(_flat_partitions(zero, base)[0], {})
    keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
    step = first.get("step", group.get("step"))  # torch's AdamW keeps it per tensor, fused ones per group
    state = {}
    for name, p in named:
        entry = {key: safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True) for key in keys}
        if step is not None:
            entry["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        state[name] = entry
    return state, None


def gather_state(trainer: Any) -> tuple[dict | None, str | None]:
    """(the neutral state, or None and why not). A collective under FSDP and DeepSpeed: every rank calls it;
    only the main process keeps the tensors."""
    method = getattr(trainer, "method", None)
    if method is not None and method.holds_model:
        return None, f"--peft_type {method.name} trains the whole model; its checkpoints are the engine's own"
    named = trained_parameters(trainer.model)
    if getattr(trainer, "is_deepspeed_enabled", False):
        from deepspeed.utils import safe_get_full_fp32_param

        params = {name: safe_get_full_fp32_param(p).detach().to("cpu", copy=True) for name, p in named}
        optimizer, why = _deepspeed_state(trainer, named)
    else:
        params = {name: _whole(p) for name, p in named}
        optimizer, why = _torch_state(trainer.optimizer, named)
    if why:
        return None, why
    schedule = trainer.lr_scheduler.state_dict() if trainer.lr_scheduler is not None else None
    return {"format": FORMAT, "params": params, "optimizer": optimizer, "schedule": schedule}, None


def live_engine(trainer: Any) -> tuple[str, int]:
    """(engine key, world size) as the Trainer's accelerator runs them: not what the flags asked for."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    world = int(trainer.accelerator.num_processes)
    if state.distributed_type == DistributedType.DEEPSPEED:
        return engine_key("deepspeed", int(state.deepspeed_plugin.zero_stage)), world
    if state.distributed_type == DistributedType.FSDP:
        return "fsdp", world
    return ("ddp" if world > 1 else "single"), world


def save_neutral(trainer: Any, folder: Path) -> None:
    """Write the neutral form into a staged checkpoint; every rank calls it."""
    import torch

    state, why = gather_state(trainer)
    if not trainer.is_world_process_zero():
        return
    key, world = live_engine(trainer)
    args = trainer.args
    card = {
        "format": FORMAT, "engine": key, "world_size": world, "step": trainer.state.global_step,
        "per_device_batch": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "method": getattr(getattr(trainer, "method", None), "name", None), "state": state is not None,
        "why_not": why,
        "shapes": {name: list(p.shape) for name, p in state["params"].items()} if state else {},
    }
    if state is not None:
        torch.save(state, folder / STATE_FILE)
    write_json_atomic(folder / CARD_FILE, card)


# ---- reading it back ----------------------------------------------------------------------------------

@dataclass
class ResumePlan:
    checkpoint: Path
    written: dict | None  # unift_resume.json of the checkpoint; None for one written before it existed
    neutral: bool  # load the engine-neutral form: the engine or the world size differ
    accumulation: int  # the gradient accumulation that keeps the checkpoint's global batch

    def record(self) -> dict[str, Any]:
        written = self.written or {}
        return {"checkpoint": str(self.checkpoint), "engine": written.get("engine"),
                "world_size": written.get("world_size"), "global_batch": written.get("global_batch"),
                "loaded": "engine-neutral state" if self.neutral else "the engine's own state"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as err:
        raise UniftError(f"{path}: unreadable ({err})") from None


def plan_resume(args: Any, checkpoint: str | Path, scaling: Scaling) -> ResumePlan:
    """Check that `checkpoint` can continue as this run and decide how; one clear line when it cannot. Sets
    args.gradient_accumulation_steps so that the global batch stays the checkpoint's."""
    folder = Path(checkpoint)
    card = _read_json(folder / "unift_run.json") or {}
    for field, flag, mine in (("peft_type", "--peft_type", args.method.name), ("stage", "--stage", args.stage),
                              ("model_type", "--model_type", args.spec.name)):
        if card.get(field) is not None and card[field] != mine:
            raise UniftError(f"--resume_from_checkpoint {folder}: trained with {flag} {card[field]}, this run "
                             f"asks for {flag} {mine}; resume with the flags it was trained with")
    written = _read_json(folder / CARD_FILE)
    key, world = scaling.key, scaling.world_size
    if written is None:
        ranks = len(list(folder.glob("rng_state_*.pth")))
        if ranks > 1 and ranks != world:
            raise UniftError(f"--resume_from_checkpoint {folder}: written by {ranks} processes before unift kept "
                             f"an engine-neutral state; resume it on {ranks} processes")
        return ResumePlan(folder, None, False, args.gradient_accumulation_steps)
    neutral = (written["engine"], written["world_size"]) != (key, world)
    if neutral and not written.get("state"):
        raise UniftError(f"--resume_from_checkpoint {folder}: written by {written['world_size']} process(es) under "
                         f"{written['engine']} without an engine-neutral state ({written.get('why_not')}); resume "
                         f"it with the same engine on {written['world_size']} process(es)")
    per_step = args.per_gpu_train_batch_size * world
    accumulation, rest = divmod(written["global_batch"], per_step)
    if rest or not accumulation:
        raise UniftError(f"--resume_from_checkpoint {folder}: its global batch is {written['global_batch']} examples "
                         f"per step; {args.per_gpu_train_batch_size} per device x {world} process(es) cannot make "
                         f"it with a whole gradient accumulation; pass a --per_gpu_train_batch_size that divides "
                         f"{written['global_batch'] // world or written['global_batch']}")
    if accumulation != args.gradient_accumulation_steps:
        log.info("resuming %s (global batch %d): --gradient_accumulation_steps %d, not %d, keeps it",
                 folder.name, written["global_batch"], accumulation, args.gradient_accumulation_steps)
        args.gradient_accumulation_steps = accumulation
    if neutral:
        log.info("resuming %s, written under %s by %d process(es), under %s on %d: from its engine-neutral state",
                 folder.name, written["engine"], written["world_size"], key, world)
    return ResumePlan(folder, written, neutral, accumulation)


def check_shapes(plan: ResumePlan, model: Any) -> None:
    """The checkpoint's trained parameters are this model's, with the same shapes (another --lora_r, other
    target modules or another method fail here in one line, before anything trains)."""
    shapes = (plan.written or {}).get("shapes")
    if not shapes:
        return
    mine = {name: list(p.shape) for name, p in trained_parameters(model)}
    where = f"--resume_from_checkpoint {plan.checkpoint}"
    for name in sorted(set(mine) | set(shapes)):
        if name not in mine or name not in shapes:
            side = "this run does not train" if name not in mine else "the checkpoint does not hold"
            raise UniftError(f"{where}: {side} {name}; resume with the flags it was trained with "
                             "(--peft_type, --lora_target_modules)")
        if mine[name] != shapes[name]:
            raise UniftError(f"{where}: {name} is {'x'.join(map(str, shapes[name]))} there and "
                             f"{'x'.join(map(str, mine[name]))} here; resume with the flags it was trained with "
                             "(--lora_r ...)")


def load_state(plan: ResumePlan) -> dict:
    import torch

    path = plan.checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise UniftError(f"{path}: unreadable ({err})") from None


def load_weights(model: Any, state: dict) -> None:
    """Into the plain model, before the Trainer hands it to the engine (which then shards what it holds)."""
    import torch

    saved = state["params"]
    with torch.no_grad():
        for name, p in trained_parameters(model):
            p.copy_(saved[name].to(p.dtype))


def _like(full: Any, p: Any) -> Any:
    """`full` laid out as parameter `p` is: sharded as p under FSDP2 (each rank cuts its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                 src_data_rank=None)
    return full.to(p.device)


def _fit_groups(schedule: dict, groups: int) -> dict:
    """The schedule's per-group lists for this optimizer's group count: engines drop the Trainer's empty
    no-decay group (DeepSpeed) or keep it, and every group follows the same schedule."""
    fitted = dict(schedule)
    for key, value in schedule.items():
        if isinstance(value, list) and value and len(value) != groups:
            if any(item != value[0] for item in value):
                raise UniftError(f"the checkpoint's learning-rate schedule differs between its {len(value)} "
                                 f"parameter groups ({key}); this run's optimizer has {groups}")
            fitted[key] = [value[0]] * groups
    return fitted


def load_optimizer(trainer: Any, state: dict) -> None:
    """Into the optimizer the engine built (every rank), then the schedule and the learning rate it reached."""
    import torch

    saved = state["optimizer"]
    named = trained_parameters(trainer.model)
    if getattr(trainer, "is_deepspeed_enabled", False):
        from deepspeed.utils import safe_set_full_optimizer_state

        zero, base = _zero_optimizer(trainer)
        sample = next(iter(saved.values()), {})
        keys = [k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0]
        step = sample.get("step")
        for flat in _flat_partitions(zero, base):
            entry = base.state[flat]
            for key in keys:
                entry.setdefault(key, torch.zeros_like(flat))
            if step is not None and not any("step" in group for group in base.param_groups):
                entry["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        for group in base.param_groups:
            if step is not None and "step" in group:
                group["step"] = int(step)
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link fragments once state exists
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            for key in keys:
                safe_set_full_optimizer_state(p, saved[name][key], key)
    else:
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        by_id = {id(p): name for name, p in named}
        for group in inner.param_groups:
            for p in group["params"]:
                entry = saved.get(by_id.get(id(p), ""))
                if entry:
                    inner.state[p] = {key: (_like(value, p) if torch.is_tensor(value) and value.dim() > 0
                                            else value) for key, value in entry.items()}
    if state.get("schedule") is not None and trainer.lr_scheduler is not None:
        inner = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # accelerate wraps it
        trainer.lr_scheduler.load_state_dict(_fit_groups(state["schedule"], len(inner.optimizer.param_groups)))
        last = trainer.lr_scheduler.get_last_lr()
        for i, group in enumerate(trainer.optimizer.param_groups):
            group["lr"] = last[min(i, len(last) - 1)]


def rng_file(checkpoint: Path, rank: int) -> Path | None:
    """This rank's RNG state in the checkpoint: rank r's of the old run, or the one process's for rank 0. A
    rank the old run did not have keeps the state its seed gave it."""
    files = [checkpoint / f"rng_state_{rank}.pth"] + ([checkpoint / "rng_state.pth"] if rank == 0 else [])
    return next((f for f in files if f.is_file()), None)


class NeutralResume(ResumeOverrides):
    """Trainer mixin: with `resume_plan.neutral`, the Trainer's own loading of the engine's state is skipped
    and the neutral state loaded instead (the Trainer's private steps: unift.compat.trainer_resume)."""

    resume_plan: ResumePlan | None = None
    resume_state: dict | None = None

    def neutral_resume(self, checkpoint: Any) -> bool:
        plan = self.resume_plan
        return checkpoint is not None and plan is not None and plan.neutral

    def load_neutral_optimizer(self) -> None:
        load_optimizer(self, self.resume_state)

    def neutral_rng_file(self, checkpoint: Any) -> Path | None:
        return rng_file(Path(checkpoint), self.args.process_index)  # type: ignore[attr-defined]


def prepare_resume(trainer: Any, model: Any, plan: ResumePlan | None) -> None:
    """Before trainer.train: hand the plan to the Trainer and, for a neutral resume, load the weights."""
    if plan is None:
        return
    trainer.resume_plan = plan
    if plan.neutral:
        trainer.resume_state = load_state(plan)
        load_weights(model, trainer.resume_state)

