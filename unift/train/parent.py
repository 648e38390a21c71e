"""--adapter_dir: a run that starts from an earlier one (SFT, then DPO or GRPO on top of its adapter).

The folder decides what the run trains: its method and the method's settings (rank, targets, ...), its
base model, family, template and quantization. A flag that contradicts the folder is an error, not a
silent override: the adapter's shape is fixed by its saved weights. The adapter loads trainable and trains
further; a full or freeze run folder is the model that trains further."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from unift.errors import UniftError


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def adopt_parent(args: Any) -> None:
    """Fill the run's arguments from the --adapter_dir folder (before any other check reads them)."""
    if not args.adapter_dir:
        return
    from unift.models.hub import is_hub_adapter
    from unift.models.runcard import RUN_CARD
    from unift.peft.foreign import read_card

    folder = Path(args.adapter_dir)
    if not is_hub_adapter(args.adapter_dir) and not folder.is_dir():
        raise UniftError(f"--adapter_dir {args.adapter_dir}: no such folder")
    fields = {f.name: f for f in dataclasses.fields(args)}
    card = read_card(args.adapter_dir, base_model=args.model_name_or_path,
                     model_type=None if args.model_type == _default(fields["model_type"]) else args.model_type)
    where = f"--adapter_dir {args.adapter_dir}"
    if (args.stage == "rm") != (card.stage == "rm"):
        raise UniftError(f"{where} was trained with --stage {card.stage}: a reward model (rm) continues only as a "
                         "reward model, and a language-model adapter never becomes one")
    if args.peft_type not in (_default(fields["peft_type"]), card.peft_type):
        raise UniftError(f"{where} holds a {card.peft_type} adapter; --peft_type {args.peft_type} contradicts it "
                         "(leave the flag out)")
    if args.model_type not in (_default(fields["model_type"]), card.model_type):
        raise UniftError(f"{where} was trained on --model_type {card.model_type}, not {args.model_type}")
    if card.holds_model and args.model_name_or_path not in (None, args.adapter_dir):
        raise UniftError(f"{where} holds the whole trained model (--peft_type {card.peft_type}); it is the model "
                         "that trains further: leave --model_name_or_path out")
    from unift.peft import get_method

    method = get_method(card.peft_type)
    saved = card.arguments if (folder / RUN_CARD).exists() else {}
    own = [f for f in (dataclasses.fields(method.flags) if method.flags else ()) if f.name in fields]
    changed = [f"--{f.name}" for f in own if getattr(args, f.name) != _default(f)
               and getattr(args, f.name) != saved.get(f.name, getattr(args, f.name))]
    if changed:
        raise UniftError(f"{', '.join(changed)}: the adapter in {args.adapter_dir} fixes "
                         f"{'it' if len(changed) == 1 else 'them'}; leave {'it' if len(changed) == 1 else 'them'} out")
    for f in own:  # the run card records the adapter's real settings
        if f.name in saved:
            setattr(args, f.name, saved[f.name])
    args.peft_type, args.model_type = card.peft_type, card.model_type
    args.model_name_or_path = args.adapter_dir if card.holds_model else (args.model_name_or_path or card.base_model)
    args.template = args.template or card.template
    args.rope_scaling = args.rope_scaling or card.rope_scaling  # the positions the adapter learned with
    args.attn_implementation = args.attn_implementation or card.attn_implementation
    if args.quantization_bit is None and not args.load_in_8bit:
        args.quantization_bit = card.quantization_bit


def parent_record(adapter_dir: str | None) -> dict[str, Any] | None:
    """What the run card keeps of the run it started from."""
    if not adapter_dir:
        return None
    from unift.peft.foreign import read_card

    card = read_card(adapter_dir)
    return {"folder": str(Path(adapter_dir).resolve()) if Path(adapter_dir).is_dir() else adapter_dir,
            "stage": card.stage, "peft_type": card.peft_type, "created": card.created}
