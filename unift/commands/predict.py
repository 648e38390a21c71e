"""`unift predict` (predict.py): answer every record of a file into predictions.jsonl, resumably."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, ModelOptions, load_generator
from unift.models.flags import DataFlags, OutputFlags
from unift.options import like, opt


@dataclass
class PredictOptions(DecodingOptions, DtypeOptions, ConfigOptions, ModelOptions):
    input: str = opt(None, "prompts: alpaca / sharegpt / messages / plain prompt records, JSON or JSONL (or .txt, "
                     "one prompt per line)", aliases=("--data",), required=True)
    result_dir: str = opt(None, "folder for predictions.jsonl (resumed if there)", required=True)
    batch_size: int = like(DataFlags, "batch_size")
    cutoff_len: int | None = like(DataFlags, "cutoff_len")
    max_samples: int | None = like(DataFlags, "max_samples")
    overwrite: bool = like(OutputFlags, "overwrite")


OPTIONS = PredictOptions


def run(options: PredictOptions) -> None:
    from unift.inference.predict import predict

    predict(load_generator(options), options.input, options.result_dir, options.decoding(),
            batch_size=options.batch_size, max_samples=options.max_samples, max_prompt_tokens=options.cutoff_len,
            overwrite=options.overwrite, adapter_dir=options.adapter_dir)
