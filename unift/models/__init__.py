"""Model families: the registry of ModelSpecs and the code that loads tokenizers and models."""

from unift.models.loading import EMBEDDED_MODEL_NAME, embedded_model_dir, load_model, load_tokenizer
from unift.models.registry import MODELS, ModelSpec, get_model_spec

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "MODELS",
    "ModelSpec",
    "embedded_model_dir",
    "get_model_spec",
    "load_model",
    "load_tokenizer",
]
