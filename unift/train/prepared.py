"""What a run knows before its model loads, as typed values: the data, tokenizer and template
(PreparedData, from `prepare`), then the device, dtype plan and batch shape (PreparedRun). Every later
phase of a run (unift.train.run) and every stage's trainer reads these, never a loose dict."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from unift.data import DataOptions, build_datasets, load_sources, resolve_template
from unift.data.template_parity import parity_at_start
from unift.models import ModelSpec, load_tokenizer
from unift.models.dtypes import DtypePlan
from unift.models.loading import resolve_model_path
from unift.peft import MethodSpec
from unift.runtime import is_main_process, world_size
from unift.train.scaling import Scaling
from unift.train.stages.registry import StageSpec, get_stage

log = logging.getLogger("unift")


@dataclass(frozen=True)
class PreparedData:
    """The run's family, method and stage, its base folder, tokenizer and template, and its tokenized
    datasets with their statistics (counts, truncation, skipped records per source)."""

    spec: ModelSpec
    method: MethodSpec
    stage: StageSpec
    path: str  # the base model's folder
    tokenizer: Any
    template: Any  # unift.data.templates: FormatTemplate or TokenizerTemplate
    train: Any  # datasets.Dataset (or a stream) of token ids
    val: Any
    stats: dict[str, Any]


@dataclass(frozen=True)
class PreparedRun(PreparedData):
    """PreparedData and what the machine decided: the device, the engine it scales out with, the dtype plan,
    the multiple every batch is padded to (the speed levers' choice) and the collator that pads them."""

    device: str = "cpu"
    scaling: Scaling = Scaling()
    plan: DtypePlan | None = None
    shape_multiple: int = 1
    collator: Any = None

    @classmethod
    def of(cls, data: PreparedData, **decided: Any) -> PreparedRun:
        return cls(**{f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, **decided)


def prepare(args: Any) -> PreparedData:
    """Everything before the model: validates data first so bad input fails before any weights load."""
    spec, method = args.spec, args.method  # the pair was checked when the arguments were built
    # A stream has no length of its own: it reports the rows the run will consume.
    stream_length = max(0, args.max_steps) * args.per_gpu_train_batch_size * args.gradient_accumulation_steps
    stage = get_stage(args.stage)
    options = DataOptions.from_args(args, stream_length=stream_length * world_size(), kind=stage.kind)
    sources = load_sources(options)  # every record validated here, before the tokenizer or model loads
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    template = resolve_template(args.template, spec.template, tokenizer)
    # every rank checks (strict stops them all); the main one says it
    parity = parity_at_start(template, tokenizer, getattr(args, "template_check", "report"))
    if parity and is_main_process():
        log.info("%s", parity)
    data = build_datasets(sources, template, tokenizer, options)
    return PreparedData(spec=spec, method=method, stage=stage, path=path, tokenizer=tokenizer, template=template,
                        train=data.train, val=data.val, stats=data.stats)
