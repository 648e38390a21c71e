"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a PEFT method plugin.

The original toolkit shipped them inside an edited copy of peft; here they plug into the real peft through
`register_peft_method`, so an adapter trained by unift is saved in PEFT's folder format (adapter_config.json
records `"peft_type": "BOTTLENECK"`) and loads with `peft.PeftModel.from_pretrained` once `unift` (or
`unift.peft`) is imported.

Math, with down: d -> bottleneck and up: bottleneck -> d (no biases), computed in fp32 and scaled by s:
- houlsby (sequential, input side of each target):  y = W(x + s*up(act(down(drop(x))))) + b
- pfeiffer (sequential, output side of each target): h = Wx + b;  y = h + s*up(act(down(drop(h))))
- parallel (beside each target):                      y = Wx + b + s*up(act(down(drop(x))))
With --non_linearity linear the branch is the matrix M = s*U*D and merges exactly:
W' = W(I + M) (houlsby), W' = (I + M)W and b' = (I + M)b (pfeiffer), W' = W + M (parallel).
With any other non-linearity there is no equivalent weight, so merging is refused with that reason.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import register_peft_method
from torch import nn

from unift.compat import peft_types

NAME = "bottleneck"  # PEFT method name (lower case); the saved peft_type is its upper case
ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("tanh", "relu", "gelu", "silu", "sigmoid", "linear")
INITS = ("bert", "mam_adapter")


# Registering unift's own method (register() below, on import, as the --peft_type registry registers its
# entries) needs a PeftType member for it: peft's enum is closed, so unift.compat extends it.
BOTTLENECK = peft_types.extend_peft_type(NAME.upper())


def parse_scaling(value: Any) -> float | str:
    """A number, or "learned" (a trained scalar per adapted layer, initialised to 1)."""
    if isinstance(value, str) and value.strip().lower() == "learned":
        return "learned"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"adapter scaling must be a number or 'learned', not {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"adapter scaling must be finite, not {value!r}")
    return number


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (see the module docstring for the math)."""

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names (or a regex) to put an adapter on"})
    exclude_modules: list[str] | str | None = field(default=None)
    target_parameters: list[str] | None = field(default=None)  # read by peft's matcher; unused here
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    adapter_type: str = field(default="houlsby", metadata={"help": "houlsby | pfeiffer | parallel"})
    bottleneck_size: int = field(default=256, metadata={"help": "width of the bottleneck"})
    non_linearity: str = field(default="tanh", metadata={"help": "between down and up: " + ", ".join(NON_LINEARITIES)})
    adapter_dropout: float = field(default=0.0)
    scaling: float | str = field(default=1.0, metadata={"help": "a number or 'learned'"})
    # mam_adapter by default: a fresh adapter is the identity, so training starts from the base model. The
    # original toolkit defaulted to bert, whose random up projection perturbs the model before any step.
    init_weights: str = field(default="mam_adapter",
                              metadata={"help": "mam_adapter (up = 0, the identity) or bert (normal 0.02)"})
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, not {self.adapter_type!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, not {self.non_linearity!r}")
        if self.init_weights not in INITS:
            raise ValueError(f"init_weights must be one of {', '.join(INITS)}, not {self.init_weights!r}")
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be positive, not {self.bottleneck_size}")
        if not 0 <= self.adapter_dropout < 1:
            raise ValueError(f"adapter_dropout must be in [0, 1), not {self.adapter_dropout}")
        self.scaling = parse_scaling(self.scaling)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def merge_refusal(self) -> str:
        return merge_refusal(self.non_linearity)


def merge_refusal(non_linearity: str) -> str:
    """'' when adapters with this non-linearity can be merged, else why not."""
    if non_linearity == "linear":
        return ""
    return (f"bottleneck adapters with non_linearity {non_linearity!r} cannot be merged: the non-linearity "
            "between the down and up projections has no equivalent weight matrix (only --non_linearity "
            "linear adapters fold into the base weights)")


def _activation(name: str) -> nn.Module:
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
            "linear": nn.Identity}[name]()


class BottleneckLayer(BaseTunerLayer):
    """Holds one or more named adapters beside a base layer (the PEFT tuner-layer protocol)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_scale")
    other_param_names = ("bottleneck_type", "bottleneck_act", "bottleneck_dropout", "bottleneck_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_scale = nn.ParameterDict({})  # only for scaling="learned"
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_act = nn.ModuleDict({})
        self.bottleneck_type: dict[str, str] = {}
        self.bottleneck_scaling: dict[str, float] = {}  # fixed scaling; learned ones live in bottleneck_scale
        self._disable_adapters = False
        self.merged_adapters = []
        self._premerge: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # exact unmerge
        base = self.get_base_layer()
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        kind = config.adapter_type
        # Houlsby reads the layer input and feeds it back in; Pfeiffer reads and returns the layer output.
        outer = self.in_features if kind == "houlsby" else self.out_features
        inner = self.out_features if kind == "pfeiffer" else self.in_features
        if kind == "parallel":
            inner, outer = self.in_features, self.out_features
        self.bottleneck_down[adapter_name] = nn.Linear(inner, config.bottleneck_size, bias=False,
                                                       dtype=torch.float32)
        self.bottleneck_up[adapter_name] = nn.Linear(config.bottleneck_size, outer, bias=False,
                                                     dtype=torch.float32)
        self.bottleneck_act[adapter_name] = _activation(config.non_linearity)
        self.bottleneck_dropout[adapter_name] = (
            nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity())
        self.bottleneck_type[adapter_name] = kind
        if config.scaling == "learned":
            self.bottleneck_scale[adapter_name] = nn.Parameter(torch.ones(1, dtype=torch.float32))
        else:
            self.bottleneck_scaling[adapter_name] = float(config.scaling)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # "Computed in fp32": keep the adapter in fp32 whatever the base dtype (the move above casts it).
        for name in ("bottleneck_down", "bottleneck_up", "bottleneck_scale"):
            holder = getattr(self, name)
            if adapter_name in holder:
                holder[adapter_name] = holder[adapter_name].to(torch.float32)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_parameters(self, adapter_name: str, init: str) -> None:
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        if init == "bert":  # as BERT initialises its linear layers (the original toolkit's default)
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:  # mam_adapter: the adapter starts as the identity (up = 0)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)

    def scale(self, adapter_name: str) -> torch.Tensor | float:
        if adapter_name in self.bottleneck_scale:
            return self.bottleneck_scale[adapter_name]
        return self.bottleneck_scaling[adapter_name]

    def branch(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """s * up(act(down(drop(h)))) in fp32 (autocast off: small weights, accuracy over speed), in h's dtype."""
        down = self.bottleneck_down[adapter_name]
        device_type = h.device.type
        autocast = torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda", "xpu") else False
        guard = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
        with guard:
            z = self.bottleneck_dropout[adapter_name](h.to(down.weight.dtype))
            z = self.bottleneck_up[adapter_name](self.bottleneck_act[adapter_name](down(z)))
            z = z * self.scale(adapter_name)
        return z.to(h.dtype)

    def delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """M = s*U*D for a linear adapter (fp32)."""
        down = self.bottleneck_down[adapter_name].weight.float()
        up = self.bottleneck_up[adapter_name].weight.float()
        scale = self.scale(adapter_name)
        scale = scale.detach().float() if isinstance(scale, torch.Tensor) else scale
        return (up @ down) * scale


class Linear(nn.Module, BottleneckLayer):
    """A linear layer (plain, or bitsandbytes-quantized) with bottleneck adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.bottleneck_down]
        inp = x
        for a in active:
            if self.bottleneck_type[a] == "houlsby":
                inp = inp + self.branch(a, inp)
        result = self.base_layer(inp, *args, **kwargs)
        for a in active:
            kind = self.bottleneck_type[a]
            if kind == "pfeiffer":
                result = result + self.branch(a, result)
            elif kind == "parallel":
                result = result + self.branch(a, x).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not isinstance(base.weight, nn.Parameter) or not base.weight.dtype.is_floating_point:
            raise ValueError("bottleneck adapters cannot be merged into a quantized layer: reload the base "
                             "model unquantized first")
        for name in adapter_names:
            if name not in self.bottleneck_down:
                continue
            act = self.bottleneck_act[name]
            if not isinstance(act, nn.Identity):
                raise ValueError(merge_refusal(_act_name(act)))
            weight = base.weight.data.float()
            bias = base.bias.data.float() if base.bias is not None else None
            delta = self.delta_matrix(name).to(weight.device)
            kind = self.bottleneck_type[name]
            new_bias = bias
            if kind == "houlsby":
                new_weight = weight + weight @ delta
            elif kind == "pfeiffer":
                new_weight = weight + delta @ weight
                new_bias = None if bias is None else bias + delta @ bias
            else:
                new_weight = weight + delta
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {name} seems broken")
            self._premerge[name] = (base.weight.data.clone(), None if base.bias is None else base.bias.data.clone())
            base.weight.data = new_weight.to(base.weight.dtype)
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the exact weights from before each merge (sequential merges are not exactly invertible
        in floating point, so the originals are kept while merged)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight, bias = self._premerge.pop(name)
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def _act_name(act: nn.Module) -> str:
    names = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}
    return names.get(type(act), type(act).__name__.lower())


# transformers model_type -> default targets per adapter type, used when a config names no target_modules
# (unift itself always passes them from its model registry).
def _default_targets(model_type: str, adapter_type: str) -> list[str] | None:
    from unift.models.registry import family_of_hf_type

    spec = family_of_hf_type(model_type)
    if spec is None:
        return None
    return default_targets(spec, adapter_type)


def default_targets(spec: Any, adapter_type: str) -> list[str]:
    """The original toolkit's placement: Houlsby on the MLP, Pfeiffer on the MLP output, parallel beside the
    attention input projections."""
    if adapter_type == "houlsby":
        return list(spec.mlp_targets)
    if adapter_type == "pfeiffer":
        return [spec.mlp_output]
    return attention_inputs(spec)


ATTENTION_OUTPUTS = ("o_proj", "dense", "out_proj", "c_proj", "wo")


def attention_inputs(spec: Any) -> list[str]:
    """The attention projections that read the hidden states (q/k/v or a fused qkv), not the output one."""
    outputs = (*ATTENTION_OUTPUTS, getattr(spec, "attention_output", ""))
    return [t for t in spec.attention_targets if t not in outputs]


class BottleneckModel(BaseTuner):
    """Injects BottleneckLayer wrappers into the target linear layers of a model."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            targets = _default_targets(model_config.get("model_type", ""), peft_config.adapter_type)
            if targets is None:
                raise ValueError("Please specify `target_modules` in the BottleneckConfig")
            peft_config.target_modules = set(targets)
        return peft_config

    def _create_and_replace(self, peft_config: BottleneckConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"bottleneck adapters wrap linear layers; {current_key} is a {type(base).__name__}")
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name in self.active_adapters:
            reason = self.peft_config[name].merge_refusal
            if reason:
                raise ValueError(reason)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False, adapter_names: list[str] | None = None):
        if not merge:
            # unload(): undo any merge first so the returned base weights are exactly the original ones
            for module in self.model.modules():
                if isinstance(module, BottleneckLayer) and module.merged:
                    module.unmerge()
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if BOTTLENECK in PEFT_TYPE_TO_CONFIG_MAPPING:
        return  # imported twice (e.g. by name and by path): keep the first registration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_peft_method(name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel,
                             prefix=BottleneckModel.prefix)


register()

__all__ = ["BOTTLENECK", "BottleneckConfig", "BottleneckLayer", "BottleneckModel", "Linear", "default_targets"]
