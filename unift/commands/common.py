"""The option groups of the commands that load a model for inference (generate, chat, predict, eval,
merge, serve), made of the shared groups in unift.models.flags: which model, on which device and dtype, and
how to decode (with the generation settings built from those flags). Each command's options dataclass
inherits the groups it takes."""

from __future__ import annotations

from dataclasses import dataclass

from unift.models.dtypes import parse_dtype
from unift.models.flags import PRESET_NAMES, ConfigFlags, DecodingFlags, DtypeFlags, ModelFlags
from unift.options import Options, like, opt

__all__ = ["PRESET_NAMES", "ConfigOptions", "DecodingOptions", "DtypeOptions", "FindRunOptions", "ModelOptions"]

ModelOptions = ModelFlags  # which model, on which device (unift.models.flags, shared with train)
ConfigOptions = ConfigFlags  # what its config is loaded with


@dataclass
class FindRunOptions(ModelOptions):
    """The original toolkit's way to name a run: by its training data."""

    run_data: list[str] | None = opt(None, "use the run `uniform_finetune.py --model_type T --data NAME` wrote "
                                     "under saved_models/ (the newest if several); the original toolkit's way",
                                     group="model", flag="--data", metavar="NAME")


@dataclass
class DtypeOptions(Options):
    dtype: str | None = like(DtypeFlags, "dtype")


@dataclass
class DecodingOptions(DecodingFlags):
    def decoding(self):
        """The GenerationSettings these flags ask for: the preset, overridden by the flags given."""
        from unift.inference.settings import settings_from

        return settings_from(self.preset, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                             temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                             num_beams=self.num_beams, repetition_penalty=self.repetition_penalty,
                             no_repeat_ngram_size=self.no_repeat_ngram_size, stop=self.stop, seed=self.seed)


def load_generator(options: ModelOptions):
    """The Generator for a command's model options (a run named by --data is found first)."""
    from unift.inference.generator import Generator
    from unift.models.runcard import find_run

    adapter_dir = options.adapter_dir
    if getattr(options, "run_data", None) and not adapter_dir:
        adapter_dir = options.adapter_dir = find_run(options.run_data, options.model_type)
    return Generator.load(adapter_dir, base_model=options.model_name_or_path, model_type=options.model_type,
                          template=options.template, trust_remote_code=options.trust_remote_code,
                          dtype=parse_dtype(getattr(options, "dtype", None)), device=options.device,
                          rope_scaling=getattr(options, "rope_scaling", None),
                          attn_implementation=getattr(options, "attn_implementation", None))
