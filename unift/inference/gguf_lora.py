"""`unift merge --export gguf-lora`: a LoRA adapter alone in llama.cpp's adapter GGUF format, beside its base
model as a GGUF file and an Ollama Modelfile that puts the two together.

The adapter file follows llama.cpp's convert_lora_to_gguf.py: general.type=adapter, adapter.type=lora,
adapter.lora.alpha, and for each adapted weight the base's GGUF tensor name with `.lora_a` (A, rank x in) and
`.lora_b` (B, out x rank, its rows in the base weight's GGUF order). llama.cpp scales B·A by alpha / rank,
rank read from B: alpha is written as PEFT's scaling x rank, so plain LoRA keeps its lora_alpha and rsLoRA
(alpha / sqrt(rank)) is expressed exactly; modules whose rank or scaling differs from the first (rank_pattern,
alpha_pattern) carry the difference in their B. The file is read back and every ΔW compared with PEFT's
before the folder appears.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unift.errors import UniftError
from unift.inference.chat_template import install_chat_template
from unift.inference.gguf import export_gguf, gguf_refusal, gguf_tensor_names, new_writer, to_gguf_layout
from unift.inference.ollama import write_modelfile

log = logging.getLogger(__name__)

ADAPTER_NAME = "adapter.gguf"
BASE_NAME = "base.gguf"
# |ΔW| read back against PEFT's, relative to the largest |ΔW|: F32 tensors differ only by the rescaling.
READBACK_RTOL = 1e-5


def lora_refusal(peft_config: Any) -> str:
    """'' when llama.cpp's adapter format can hold this adapter exactly, else why not."""
    kind = str(getattr(peft_config, "peft_type", "")).split(".")[-1].upper()
    if kind != "LORA":
        return f"llama.cpp's adapter format holds LoRA only (this adapter is {kind.lower() or 'unknown'})"
    if getattr(peft_config, "use_dora", False):
        return "DoRA's magnitude vectors have no place in llama.cpp's adapter format; use --export gguf"
    if getattr(peft_config, "modules_to_save", None):
        return (f"it trains whole modules ({', '.join(peft_config.modules_to_save)}) besides the LoRA matrices; "
                "use --export gguf")
    if getattr(peft_config, "lora_bias", False):
        return "its LoRA B matrices have biases, which llama.cpp's adapter format does not hold"
    return ""


def lora_weights(model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight key: (A, B, PEFT's scaling)} of the active adapter, in the base model's key names."""
    found = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not lora_a:
            continue
        adapter = next(iter(module.active_adapters))
        if adapter not in lora_a:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        found[key] = (lora_a[adapter].weight.detach().float().cpu(), lora_b[adapter].weight.detach().float().cpu(),
                      float(module.scaling[adapter]))
    if not found:
        raise UniftError("--export gguf-lora: the adapter has no LoRA matrices")
    return found


def write_lora_gguf(path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], config: Any,
                    name: str) -> float:
    """Write llama.cpp's LoRA adapter file; return the alpha written."""
    import gguf

    first_a, _, first_scale = next(iter(weights.values()))
    alpha = first_scale * first_a.shape[0]
    names = gguf_tensor_names(config)
    writer = new_writer(path, config, name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, (lora_a, lora_b, scale) in weights.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight",))
        if gguf_name is None:
            raise UniftError(f"--export gguf-lora: the adapter targets {key}, which has no GGUF name "
                             "(llama.cpp adapts the base's linear layers only)")
        rank = lora_a.shape[0]
        # llama.cpp applies alpha / rank to every module; this module's own scaling goes into its B.
        factor = scale * rank / alpha
        writer.add_tensor(gguf_name + ".lora_a", lora_a.numpy().astype("float32"))
        writer.add_tensor(gguf_name + ".lora_b", (to_gguf_layout(key, lora_b, config) * factor).numpy()
                          .astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return alpha


def read_back(path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], config: Any) -> float:
    """The largest |ΔW| difference, relative to the largest |ΔW|, between the file as llama.cpp computes ΔW
    (alpha / rank · B·A) and PEFT's (scaling · B·A, in GGUF row order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    names = gguf_tensor_names(config)
    worst, scale = 0.0, 0.0
    for key, (lora_a, lora_b, peft_scale) in weights.items():
        base = names.get_name(key, try_suffixes=(".weight",))
        got_a, got_b = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        got = alpha / got_b.shape[-1] * (got_b.reshape(-1, got_b.shape[-1]) @ got_a.reshape(got_b.shape[-1], -1))
        want = to_gguf_layout(key, peft_scale * (lora_b @ lora_a), config)
        worst = max(worst, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return worst / (scale or 1.0)


def export_adapter(out: Path, model: Any, tokenizer: Any, template: Any, *, quant: str | None,
                   card: dict[str, Any]) -> Path:
    """Write `out`: adapter.gguf, base.gguf (the base at `quant`), a Modelfile and `card`; whole or not at all."""
    from unift.models.runcard import MERGED_CARD
    from unift.runtime import atomic_folder, write_json_atomic

    why = lora_refusal(model.peft_config[model.active_adapter])
    if why:
        raise UniftError(f"--export gguf-lora: cannot export this adapter: {why}")
    inner = model.get_base_model()
    gguf_refusal(inner.config, tokenizer)
    install_chat_template(tokenizer, template)  # the base file's chat template is the run's
    weights = lora_weights(model)
    base = model.unload()  # the base model's own weights, the LoRA layers taken out (not merged)
    with atomic_folder(out) as tmp:
        alpha = write_lora_gguf(tmp / ADAPTER_NAME, weights, base.config, out.name)
        off = read_back(tmp / ADAPTER_NAME, weights, base.config)
        if not off <= READBACK_RTOL:
            raise UniftError(f"--export gguf-lora: the adapter file read back departs from the adapter "
                             f"(max |ΔW| off by {off:.3g} of its scale); nothing was written")
        tokenizer_dir = Path(tempfile.mkdtemp(dir=tmp))  # export_gguf reads the tokenizer files from a folder
        tokenizer.save_pretrained(tokenizer_dir)
        export_gguf(tokenizer_dir, base, path=tmp / BASE_NAME, name=f"{out.name} base", quant=quant)
        shutil.rmtree(tokenizer_dir)
        write_modelfile(tmp, template, tokenizer, model_file=BASE_NAME, adapter_file=ADAPTER_NAME)
        card = {**card, "export": "gguf-lora", "quant": quant or "auto", "lora_alpha_written": alpha,
                "adapter_readback_max_rel_diff": off, "modules": len(weights)}
        write_json_atomic(tmp / MERGED_CARD, card)
    log.info("wrote %s (%d LoRA modules, alpha %g, read back to %.1g of ΔW), %s and a Modelfile to %s "
             "(ollama create NAME -f %s)", ADAPTER_NAME, len(weights), alpha, off, BASE_NAME, out,
             out / "Modelfile")
    return out
