"""The tensor types of a GGUF export (`unift merge --export gguf --quant NAME`).

Full precision and the block quantizations the gguf package writes itself (q8_0, q4_0, q4_1, q5_0, q5_1):
each weight matrix is quantized here, norms and biases stay F32 (as llama.cpp's converter does). The K-quants
(q4_k_m, q6_k, ...) choose a type per tensor and need llama.cpp's own quantizer, reached through the
llama-cpp-python package's bindings (llama_model_quantize) when it is installed.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unift.errors import UniftError


@dataclass(frozen=True)
class Quant:
    """One --quant choice: the file type the GGUF metadata records, and the tensor type the gguf package
    writes for weight matrices (None: llama.cpp's quantizer decides per tensor)."""

    name: str
    file_type: str  # gguf.LlamaFileType member
    tensor_type: str | None  # gguf.GGMLQuantizationType member

    @property
    def lossy(self) -> bool:
        """Quantized below 16 bits: its gap to the adapter model is reported, never refused."""
        return self.name not in ("f32", "f16", "bf16")


QUANTS = {q.name: q for q in (
    Quant("f32", "ALL_F32", "F32"),
    Quant("f16", "MOSTLY_F16", "F16"),
    Quant("bf16", "MOSTLY_BF16", "BF16"),
    Quant("q8_0", "MOSTLY_Q8_0", "Q8_0"),
    Quant("q5_1", "MOSTLY_Q5_1", "Q5_1"),
    Quant("q5_0", "MOSTLY_Q5_0", "Q5_0"),
    Quant("q4_1", "MOSTLY_Q4_1", "Q4_1"),
    Quant("q4_0", "MOSTLY_Q4_0", "Q4_0"),
    Quant("q6_k", "MOSTLY_Q6_K", None),
    Quant("q5_k_m", "MOSTLY_Q5_K_M", None),
    Quant("q5_k_s", "MOSTLY_Q5_K_S", None),
    Quant("q4_k_m", "MOSTLY_Q4_K_M", None),
    Quant("q4_k_s", "MOSTLY_Q4_K_S", None),
    Quant("q3_k_l", "MOSTLY_Q3_K_L", None),
    Quant("q3_k_m", "MOSTLY_Q3_K_M", None),
    Quant("q3_k_s", "MOSTLY_Q3_K_S", None),
    Quant("q2_k", "MOSTLY_Q2_K", None),
)}
LLAMA_CPP = "llama-cpp-python"


def resolve_quant(quant: str | Quant | None, half: bool) -> Quant:
    """The Quant for a --quant value; "auto"/None: F16 for half-precision weights, else F32 (lossless)."""
    if isinstance(quant, Quant):
        return quant
    if quant in (None, "auto"):
        return QUANTS["f16" if half else "f32"]
    try:
        return QUANTS[quant]
    except KeyError:
        raise UniftError(f"--quant {quant!r}: unknown; choose from auto, {', '.join(QUANTS)}") from None


def check_quant(quant: str | None, export: str | None) -> None:
    """Refuse, before any work, a --quant without a GGUF export or one whose quantizer is not installed."""
    if quant in (None, "auto"):
        return
    chosen = resolve_quant(quant, False)
    if export not in ("gguf", "gguf-lora"):
        raise UniftError(f"--quant {quant} applies to a GGUF file: add --export gguf (or gguf-lora)")
    if chosen.tensor_type is None:
        llama_cpp()


def llama_cpp() -> Any:
    """llama-cpp-python's module, or one line naming the package."""
    try:
        import llama_cpp
    except (ImportError, OSError) as err:  # OSError: the package is there but its shared library is not
        raise UniftError(f"the K-quants (q4_k_m, q6_k, ...) need llama.cpp's quantizer: pip install {LLAMA_CPP} "
                         "(or use --quant q8_0 / q4_0, which need nothing more)") from err
    return llama_cpp


def tensor_array(data: Any, quant: Quant) -> tuple[Any, Any]:
    """(array, tensor type) for GGUFWriter.add_tensor: a float32 torch tensor at the type `quant` writes for
    it. Vectors (norms, biases) stay F32; a matrix whose rows do not split into the type's blocks is F16."""
    import gguf

    array = data.numpy()
    qtype = getattr(gguf.GGMLQuantizationType, quant.tensor_type or "F32")
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype("float32"), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype("float16"), qtype
    return gguf.quants.quantize(array.astype("float32"), qtype), qtype


def quantize_file(source: Path, target: Path, quant: Quant) -> None:
    """Quantize the GGUF file `source` into `target` with llama.cpp's quantizer (its per-tensor choices)."""
    import gguf

    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, quant.file_type))
    params.nthread = int(os.environ.get("OMP_NUM_THREADS") or 0)  # 0: llama.cpp uses every core
    failed = lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed or not target.exists():
        raise UniftError(f"--quant {quant.name}: llama.cpp's quantizer failed on {source.name} (code {failed})")
