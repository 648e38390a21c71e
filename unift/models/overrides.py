"""--rope_scaling and --attn_implementation: two settings of the model's config chosen when it loads, for
`unift train` and every command that loads a model for inference. The run card records both, so a run folder
loads again with the setting it was trained with unless the flag says otherwise.

The flag fields are made here (as unift.peft.flags makes the methods' shared ones) so that training and the
inference commands share one definition of each.
"""

from __future__ import annotations

from typing import Any

from unift.errors import UniftError
from unift.options import opt

ROPE_TYPES = ("linear", "dynamic", "yarn")
# transformers' own attention implementations (its kernel-hub ids are left out: they are downloads)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                        "flex_attention")
NO_SCALING = "none"


def check_rope_scaling(value: str) -> str:
    """TYPE:FACTOR normalised (`Linear:2.0` -> `linear:2`), or `none`; anything else is one line."""
    text = str(value).strip().lower()
    if text == NO_SCALING:
        return text
    kind, colon, factor = text.partition(":")
    if kind not in ROPE_TYPES or not colon:
        raise UniftError(f"--rope_scaling {value!r}: write TYPE:FACTOR with TYPE one of {', '.join(ROPE_TYPES)} "
                         "(e.g. linear:2), or none")
    try:
        number = float(factor)
    except ValueError:
        raise UniftError(f"--rope_scaling {value!r}: the factor {factor!r} is not a number") from None
    if not number >= 1:  # also NaN: a factor stretches the trained context, it never shrinks it
        raise UniftError(f"--rope_scaling {value!r}: the factor must be ≥ 1 (the trained context length is "
                         "multiplied by it)")
    return f"{kind}:{number:g}"


def rope_scaling_flag() -> Any:
    return opt(None, "stretch the rotary position embeddings: linear:FACTOR, dynamic:FACTOR (NTK) or "
               "yarn:FACTOR (from the checkpoint's max_position_embeddings), e.g. linear:2; none = the "
               "checkpoint's own (default: a run folder's setting, else none)", group="model",
               check=check_rope_scaling, metavar="TYPE:FACTOR")


def attn_implementation_flag() -> Any:
    return opt(None, "transformers' attention implementation (flash_attention_* need a GPU and the package; "
               "an explicit choice turns unift's cpu_attention off) (default: a run folder's setting, else "
               "transformers' own, sdpa)", group="model", choices=ATTN_IMPLEMENTATIONS)


def scaling_of(value: str | None) -> str | None:
    """What a run card records: a TYPE:FACTOR, or None for the checkpoint's own."""
    return None if value in (None, NO_SCALING) else value


def apply_rope_scaling(config: Any, value: str | None) -> None:
    """Put --rope_scaling into a loaded config, before the model is built from it (the rotary embedding reads
    it then). The RoPE base and partial factor stay the checkpoint's; its own scaling, if any, is replaced."""
    value = scaling_of(value)
    if value is None:
        return
    kind, factor = value.split(":")
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise UniftError(f"--rope_scaling {value}: this {config.model_type} checkpoint has no rotary position "
                         "embeddings that transformers scales")
    nested = config.nested_rope_parameter_keys(params)  # per layer type (sliding and full attention)
    for target in [params[key] for key in nested if params[key]] or [params]:
        kept = ["rope_theta", "partial_rotary_factor"] + (["original_max_position_embeddings"] if kind == "yarn" else [])
        values = {key: target[key] for key in kept if key in target}
        target.clear()
        target.update(values, rope_type=kind, factor=float(factor))
    config.standardize_rope_params()  # yarn: the pre-scaling length defaults to max_position_embeddings
    config.validate_rope()
