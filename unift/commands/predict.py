"""`unift predict` (predict.py): answer every record of a file into predictions.jsonl, resumably."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, ModelOptions, load_engine
from unift.options import POSITIVE_INT, opt


@dataclass
class PredictOptions(DecodingOptions, DtypeOptions, ConfigOptions, ModelOptions):
    input: str = opt(None, "prompts: alpaca / sharegpt / messages / plain prompt records, JSON or JSONL (or .txt, "
                     "one prompt per line)", aliases=("--data",), required=True)
    result_dir: str = opt(None, "folder for predictions.jsonl (resumed if there)", required=True)
    batch_size: int = opt(16, "prompts generated together, left-padded", aliases=("--predict_batch_size",),
                          range=POSITIVE_INT)
    cutoff_len: int | None = opt(None, "keep at most this many prompt tokens (the last ones)", range=POSITIVE_INT)
    max_samples: int | None = opt(None, "only the first N records", range=POSITIVE_INT)
    overwrite: bool = opt(False, "start over instead of resuming")


OPTIONS = PredictOptions


def run(options: PredictOptions) -> None:
    from unift.engine.predict import predict

    predict(load_engine(options), options.input, options.result_dir, options.decoding(),
            batch_size=options.batch_size, max_samples=options.max_samples, max_prompt_tokens=options.cutoff_len,
            overwrite=options.overwrite, adapter_dir=options.adapter_dir)
