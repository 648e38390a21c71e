"""`unift eval`: exact match, perplexity, BLEU/ROUGE-L and multiple-choice exams; base vs few-shot vs tuned."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DtypeOptions, ModelOptions
from unift.evals.evaluate import EvalOptions
from unift.models.dtypes import parse_dtype
from unift.models.flags import OutputFlags
from unift.options import like, opt


@dataclass
class EvalArgs(EvalOptions, DtypeOptions, ConfigOptions, ModelOptions):
    output: str | None = like(OutputFlags, "output")
    plot: bool = opt(False, "also write PNG bar charts beside the results")


OPTIONS = EvalArgs


def run(options: EvalArgs) -> None:
    from unift.evals.evaluate import evaluate

    scoring = EvalOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(EvalOptions)})
    evaluate(options.adapter_dir, scoring, base_model=options.model_name_or_path, model_type=options.model_type,
             output=options.output, plot=options.plot, device=options.device, dtype=parse_dtype(options.dtype),
             template=options.template, trust_remote_code=options.trust_remote_code,
             rope_scaling=options.rope_scaling, attn_implementation=options.attn_implementation)
