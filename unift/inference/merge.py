"""Folding an adapter into its base model: a folder that plain `transformers` loads without unift.

The merged folder holds the weights, the run's tokenizer with a chat template that renders exactly the
run's prompt template (so `apply_chat_template` prompts as training did), and unift_merged.json. The merge
is checked twice before the folder appears: in memory (the merged model's logits must equal the adapter
model's) and then written, loaded back as the inference commands load it, on records of the run's data
(unift.inference.fidelity: max |Δlogit| and mean KL, refused above --max_kl; the figures go in
unift_merged.json). QLoRA: the adapter is folded into the base re-loaded in full precision and saved at
--compute_dtype (the 4-bit base cannot hold the sum), so the merged model differs from the QLoRA model by
the base's 4-bit rounding, which the check measures and reports; docs/after_training.md says more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unift.data.templates import template_definition
from unift.errors import UniftError
from unift.inference import fidelity
from unift.inference.chat_template import install_chat_template, stop_on_end_of_turn
from unift.inference.gguf import GGUF_NAME, export_gguf, gguf_refusal
from unift.inference.gguf_quant import check_quant, resolve_quant
from unift.inference.ollama import write_modelfile
from unift.loader import load
from unift.models.dtypes import merge_plan, saved_dtype, torch_dtype
from unift.models.hub import is_hub_adapter, resolve_adapter_dir
from unift.models.loading import first_line
from unift.models.runcard import MERGED_CARD, RunCard
from unift.runtime import atomic_folder

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Relative tolerance of the in-memory check before writing: fp32 merges agree to ~1e-5 of the logit scale.
CHECK_RTOL = 1e-3


# ---- can it be merged? -------------------------------------------------------------------------------

def merge_refusal(card: RunCard, peft_config: Any) -> str:
    """'' when the adapter can be folded into the base weights, else the reason it cannot."""
    from unift.peft import registry

    method = registry.METHODS.get(card.peft_type)
    if method is not None:
        refusal = getattr(registry, "merge_refusal", None)
        if refusal is not None:
            reason = refusal(method, peft_config)
        else:
            reason = "" if method.mergeable else (method.merge_note or "")
        if reason:
            return reason
        if not method.mergeable:
            return f"--peft_type {card.peft_type} cannot be merged"
    if getattr(peft_config, "is_prompt_learning", False):
        return ("it learns virtual tokens fed to the model at every step, not changes to its weights, "
                "so there is nothing to fold into the base; serve it with the adapter instead")
    return ""


# ---- merging -----------------------------------------------------------------------------------------

def _fold(model, base_keys: frozenset[str], card: RunCard, probe: fidelity.Probe) -> tuple[Any, float]:
    """merge_and_unload, checked before anything is written: no adapter weight left behind, and the merged
    model's logits on the probe rows equal the adapter model's. Returns (merged model, max |Δlogit|)."""
    try:
        merged = model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError, TypeError, RuntimeError) as err:
        raise UniftError(f"cannot merge --peft_type {card.peft_type}: {first_line(err)}") from err
    leftover = set(merged.state_dict()) - base_keys
    if leftover:
        raise UniftError(f"merging --peft_type {card.peft_type} left adapter weights behind "
                         f"({sorted(leftover)[0]}, ...); it cannot be saved as a plain model")
    diff = fidelity.gap(probe.reference, fidelity.logits_on(merged, probe.rows)).max_abs_logit_diff
    scale = max(r.abs().max().item() for r in probe.reference) or 1.0
    log.debug("merged model vs adapter model in memory: max |Δlogit| = %.2e (logits up to %.1f)", diff, scale)
    if diff > CHECK_RTOL * scale:
        raise UniftError(f"the merged model does not reproduce the adapter model (max |Δlogit| {diff:.3g}); "
                         "nothing was written")
    return merged, diff


def merge(
    adapter_dir: str,
    merged_dir: str,
    *,
    base_model: str | None = None,
    model_type: str | None = None,
    compute_dtype: str | None = None,
    trust_remote_code: bool | None = None,
    overwrite: bool = False,
    export: str | None = None,
    quant: str | None = None,
    device: str | None = None,
    template: str | None = None,
    check: bool = True,
    max_kl: float = fidelity.DEFAULT_MAX_KL,
) -> Path:
    """Fold the adapter of a run folder into its base; write `merged_dir`; return it. `template`: a name or
    a template file overriding the run card's (the merged folder then prompts with it). `check`: load the
    written folder back and compare it with the adapter model (unift.inference.fidelity); above `max_kl` nats
    per token nothing is written. `export`: gguf (also model.gguf at `quant`, and an Ollama Modelfile) or
    gguf-lora (instead of the merged folder: the LoRA adapter and its base as GGUF files, and a Modelfile)."""
    from unift import compat
    from unift.peft.foreign import read_card

    compat.apply()
    given = adapter_dir
    adapter_dir = resolve_adapter_dir(adapter_dir)  # ORG/NAME[@REVISION]: its snapshot in the hub cache
    card = read_card(adapter_dir, base_model=base_model, model_type=model_type, template=template)
    out = Path(merged_dir)
    refuse_before_loading(adapter_dir, out, card, overwrite=overwrite, export=export, quant=quant)
    source = given if is_hub_adapter(given) else str(Path(adapter_dir).resolve())

    trust = card.trust_remote_code if trust_remote_code is None else trust_remote_code
    loaded, saved_dtype = load_for_merge(adapter_dir, card, base_model=base_model, model_type=model_type,
                                         trust=trust, device=device, template=template,
                                         compute_dtype=compute_dtype, export=export)
    tokenizer, template, family = loaded.tokenizer, loaded.template, loaded.spec.name
    if export == "gguf-lora":
        return export_lora(out, loaded, card, source, quant)
    merged, diff, probe = merged_model(loaded, card, adapter_dir, check=check)
    del loaded  # the check loads the written folder back: one model in memory at a time
    merged = prepare_for_saving(merged, tokenizer, template, saved_dtype)

    with atomic_folder(out) as tmp:
        save_merged(tmp, merged, tokenizer, template, export=export, quant=quant, name=out.name)
        del merged
        from unift.runtime import write_json_atomic

        merged_card = merged_card_of(card, family, template, source, saved_dtype, diff, export, quant)
        write_json_atomic(tmp / MERGED_CARD, merged_card)
        if check:
            merged_card["fidelity"] = _check(tmp, probe, family, trust, device, export, quant, card, max_kl,
                                             lambda: load(adapter_dir, base_model=base_model, card=card,
                                                          trust_remote_code=trust, device=device).model)
            write_json_atomic(tmp / MERGED_CARD, merged_card)
    if check:
        log.info("%s", fidelity.summary(merged_card["fidelity"]))
    log.info("wrote the merged model to %s (%s%s)", out, str(saved_dtype).replace("torch.", ""),
             f", and {GGUF_NAME}" if export == "gguf" else "")
    return out


def load_for_merge(adapter_dir: str, card: RunCard, *, base_model: str | None, model_type: str | None,
                   trust: bool, device: str | None, template: str | None, compute_dtype: str | None,
                   export: str | None) -> tuple[Any, torch.dtype]:
    """The run's model loaded for folding, and the dtype the merged model is saved at. Merged in fp32
    (merge_plan); on a GPU when the fp32 weights fit on one, else on the CPU."""
    loaded = load(adapter_dir, base_model=base_model, model_type=model_type, trust_remote_code=trust,
                  device=device, dtype=merge_plan(), card=card, template=template)
    saved_dtype = torch_dtype(saved_dtype_of(compute_dtype, card, loaded.path, trust))
    if card.quantization_bit:
        log.info("the adapter was trained over a %d-bit base; merging it into the base re-loaded in full "
                 "precision and saving at %s", card.quantization_bit, str(saved_dtype).replace("torch.", ""))
    loaded.model.eval()
    if export:
        model = loaded.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        gguf_refusal(inner.config, loaded.tokenizer)  # refuse before the work, not after it
    return loaded, saved_dtype


def export_lora(out: Path, loaded: Any, card: RunCard, source: str, quant: str | None) -> Path:
    """--export gguf-lora: the LoRA adapter and its base as GGUF files (unift.inference.gguf_lora), no merge."""
    from unift.inference.gguf_lora import export_adapter

    return export_adapter(out, loaded.model, loaded.tokenizer, loaded.template, quant=quant, card={
        "model_type": loaded.spec.name, "template": template_definition(loaded.template),
        "peft_type": card.peft_type, "adapter_dir": source, "base_model": card.base_model})


def refuse_before_loading(adapter_dir: str, out: Path, card: RunCard, *, overwrite: bool, export: str | None,
                          quant: str | None) -> None:
    """Every refusal that needs no model: a wrong output folder, an adapter that cannot be merged, a wrong
    --export or --quant. Raised before the (slow) load, so a mistake costs nothing."""
    from peft import PeftConfig

    if out.resolve() == Path(adapter_dir).resolve():
        raise UniftError("--merged_dir must differ from --adapter_dir")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UniftError(f"--merged_dir {out} exists and is not empty; pass --overwrite or choose another folder")
    if not card.holds_model:
        try:
            peft_config = PeftConfig.from_pretrained(adapter_dir)
        except (ValueError, OSError) as err:
            raise UniftError(f"{adapter_dir}: cannot read the adapter config: {first_line(err)}") from err
        reason = merge_refusal(card, peft_config)
        if reason:
            raise UniftError(f"cannot merge --peft_type {card.peft_type}: {reason}")
    if export and export not in ("gguf", "gguf-lora"):
        raise UniftError(f"--export {export!r}: choose gguf or gguf-lora")
    check_quant(quant, export)
    if export == "gguf-lora" and card.holds_model:
        raise UniftError(f"--export gguf-lora: {adapter_dir} holds a whole trained model, not an adapter; "
                         "use --export gguf")


def merged_model(loaded: Any, card: RunCard, adapter_dir: str, *,
                 check: bool) -> tuple[Any, float, fidelity.Probe]:
    """The adapter folded into the base (checked in memory by _fold), or the run's own model where it
    trained the whole model. Returns (model, max |Δlogit| against the adapter model, the probe whose
    reference logits the written folder is checked against)."""
    # The adapter model's logits, kept for the checks: merge_and_unload folds it in place. --no_check: only
    # the fixed probe conversations, for the in-memory check.
    probe = fidelity.make_probe(card if check else None, loaded.template, loaded.tokenizer)
    probe.reference = fidelity.logits_on(loaded.model, probe.rows)
    if not card.holds_model:
        merged, diff = _fold(loaded.model, loaded.base_keys, card, probe)
        return merged, diff, probe
    # Nothing to fold: the run trained the model itself. The merged folder is that model, written as any
    # merge is (the chat template, unift_merged.json), so plain transformers and GGUF take it alike.
    log.info("%s holds the whole trained model (--peft_type %s): nothing to fold in, writing it as it is",
             adapter_dir, card.peft_type)
    return loaded.model, 0.0, probe


def prepare_for_saving(merged: Any, tokenizer: Any, template: Any, saved_dtype: torch.dtype) -> Any:
    """The merged model at its saved dtype, with no quantization config left, and the tokenizer carrying the
    run's chat template and stopping at its end of turn."""
    merged = merged.to(saved_dtype)
    config = merged.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    install_chat_template(tokenizer, template)
    stop_on_end_of_turn(merged, tokenizer, template)
    tokenizer.padding_side = "left"  # what batched generation with a causal LM wants
    return merged


def save_merged(folder: Path, merged: Any, tokenizer: Any, template: Any, *, export: str | None,
                quant: str | None, name: str) -> None:
    """The weights and the tokenizer, and with --export gguf also model.gguf and its Modelfile."""
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if export == "gguf":
        export_gguf(folder, merged, name=name, quant=quant)
        write_modelfile(folder, template, tokenizer, model_file=GGUF_NAME)


def merged_card_of(card: RunCard, model_type: str, template: Any, source: str, saved_dtype: torch.dtype,
                   diff: float, export: str | None, quant: str | None) -> dict[str, Any]:
    """unift_merged.json: where the merged model came from and how; `fidelity` is filled in by the check."""
    from unift.runtime import library_versions

    merged_card = {
        "model_type": model_type, "template": template_definition(template), "peft_type": card.peft_type,
        "adapter_dir": source, "base_model": card.base_model,
        "dtype": str(saved_dtype).replace("torch.", ""), "quantization_bit_trained": card.quantization_bit,
        "probe_max_abs_logit_diff": diff, "fidelity": None, "versions": library_versions(),
    }
    if export:
        merged_card["gguf_quant"] = resolve_quant(quant, saved_dtype != torch_dtype("fp32")).name
    return merged_card


def _check(folder: Path, probe: fidelity.Probe, model_type: str, trust: bool, device: str | None,
           export: str | None, quant: str | None, card: RunCard, max_kl: float,
           trained: Callable[[], Any]) -> dict[str, Any]:
    """The merge check's figures, or UniftError (nothing written) when the merged model is off."""
    fidelity.release()
    figures = fidelity.measure(folder, probe, model_type=model_type, device=device, trust=trust,
                               gguf_file=GGUF_NAME if export == "gguf" else None, max_kl=max_kl, quant=quant,
                               trained=trained if card.quantization_bit else None,
                               quantization_bit=card.quantization_bit)
    why = fidelity.failure(figures)
    if why:
        raise UniftError(f"merge check failed: {why}; nothing was written (--max_kl raises the limit, "
                         "--no_check skips the check)")
    return figures


def saved_dtype_of(compute_dtype: str | None, card: RunCard, path: str, trust: bool) -> str:
    """unift.models.dtypes.saved_dtype, with the checkpoint's dtype read as saved, not as loaded here."""
    if (compute_dtype and compute_dtype != "auto") or card.quantization_bit:
        return saved_dtype(compute_dtype, card, None)
    from transformers import AutoConfig

    stored = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    return saved_dtype(None, card, getattr(stored, "dtype", None) or getattr(stored, "torch_dtype", None))


