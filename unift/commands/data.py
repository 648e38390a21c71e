"""`unift data check` and `unift data convert`: see what a run will train on, and change data forms.

`data check` goes through the very code `unift train` uses (validation, template, tokenization, split,
mixing), loading the tokenizer but no model, and prints per-source counts, the formats detected, token
length statistics with a histogram, what --cutoff_len truncates, and the first example of each source with
the trained part marked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unift.data import DataOptions, build_datasets, iter_conversations, load_sources, resolve_dataset
from unift.data.convert import TARGETS, convert_record
from unift.data.quality import Skipped, skipped_summary
from unift.data.registry import expand_names
from unift.data.tokenize import IGNORE_INDEX
from unift.errors import UniftError
from unift.models.flags import DataFlags, OutputFlags
from unift.options import Options, like, opt
from unift.train.args import TrainArgs

CHECK_FIELDS = ("stage", "model_type", "model_name_or_path", "template", "template_check", "trust_remote_code",
                "data", "dataset_dir", "cutoff_len", "truncation", "val_set_size", "max_samples", "train_on_prompt", "data_ratios",
                "streaming", "num_proc", "overwrite_cache", "strict_data", "seed")
OPEN, CLOSE = "⟦", "⟧"  # around trained text in plain output
STREAM_SAMPLE = 1000


def _subset(cls: type, names: tuple[str, ...], name: str) -> type:
    """A dataclass with some of TrainArgs' fields (same flags, help and defaults), and --no_example."""
    chosen: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.name in names:
            chosen.append((f.name, f.type, dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=f.metadata)))
    chosen.append(("show_example", bool, opt(True, "do not print the first example of each source",
                                             negate="--no_example")))
    return dataclasses.make_dataclass(name, chosen, bases=(Options,), namespace={"__module__": __name__})


CheckArgs = _subset(TrainArgs, CHECK_FIELDS, "CheckArgs")


@dataclass
class ConvertOptions(Options):
    data: list[str] = like(DataFlags, "data", required=True)
    to: str = opt(None, "the form to write", choices=TARGETS, required=True)
    output: str = like(OutputFlags, "output", required=True)
    dataset_dir: str | None = like(DataFlags, "dataset_dir")
    max_samples: int | None = like(DataFlags, "max_samples")



def run_check(options: Any) -> None:
    check(options, show=options.show_example)


def run_convert(options: ConvertOptions) -> None:
    n = convert(options.data, options.to, options.output, options.dataset_dir, options.max_samples)
    print(f"wrote {n} {options.to} records to {options.output}")


# action -> (options, run, help, description)
SUBCOMMANDS = {
    "check": (CheckArgs, run_check, "show what a run would train on: counts, formats, token lengths, truncation, "
              "the first example of each source with the trained part marked",
              "Validate the data and show what `unift train` would train on (loads the tokenizer, not the model)."),
    "convert": (ConvertOptions, run_convert, "rewrite data as alpaca, sharegpt or messages records",
                "Read any supported data and write it in another form (.json or .jsonl)."),
}


# ---- check -----------------------------------------------------------------------------------------


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))  # ceiling division: integer-wide bins covering low..high
    counts: dict[int, int] = {}
    for v in values:
        counts[(v - low) // step] = counts.get((v - low) // step, 0) + 1
    top = max(counts.values())
    lines = []
    for b in range(max(counts) + 1):
        start, n = low + b * step, counts.get(b, 0)
        bar = "█" * max(1 if n else 0, round(width * n / top))
        lines.append(f"  {start:>6} - {start + step - 1:<6} {bar:<{width}} {n}")
    return lines


def percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def marked(input_ids: list[int], labels: list[int], tokenizer, color: bool) -> str:
    """The example as text, with the trained runs of tokens marked (colour on a terminal)."""
    out, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            out.append(_mark(tokenizer.decode(run), trained, color))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        out.append(_mark(tokenizer.decode(run), bool(trained), color))
    return "".join(out)


def _mark(text: str, trained: bool, color: bool) -> str:
    if color:
        return f"\033[1;32m{text}\033[0m" if trained else f"\033[2m{text}\033[0m"
    return f"{OPEN}{text}{CLOSE}" if trained else text


def _template_label(template) -> str:
    return f"{template.name} ({template.description})" if template.description else template.name


def check(args: Any, out=None, show: bool = True) -> dict[str, Any]:
    """Print the report; return the figures (for tests)."""
    out = out or sys.stdout
    color = out.isatty() and not os.environ.get("NO_COLOR")
    data = _prepare(args)
    columns, firsts = _columns_and_firsts(data)
    stats = data.bundle.stats
    w = out.write
    _write_header(w, data)
    _write_counts(w, args, data)
    lengths = sorted(columns["length"])
    figures: dict[str, Any] = {"stats": stats, "lengths": lengths}
    if lengths:
        figures.update(_write_lengths(w, lengths, columns, stats, data.options))
    figures["parity"] = _parity(args, data.template, data.tokenizer, w)
    _write_skipped(w, stats)
    figures["skipped"] = stats.get("skipped", 0)
    _write_notes(w, stats)
    if show:
        _write_first_examples(w, stats, firsts, data.tokenizer, color)
    return figures


@dataclass
class _Checked:
    """What `data check` reports on: the data built as `unift train` builds it, and what built it."""

    spec: Any
    kind: str
    options: DataOptions
    sources: list
    path: str
    tokenizer: Any
    template: Any
    bundle: Any


def _prepare(args: Any) -> _Checked:
    from unift.data import resolve_template
    from unift.models import get_model_spec, load_tokenizer
    from unift.models.loading import resolve_model_path

    spec = get_model_spec(args.model_type)
    from unift.train.stages import get_stage

    kind = get_stage(args.stage).kind
    options = DataOptions.from_args(args, stream_length=STREAM_SAMPLE if args.streaming else 0, kind=kind)
    sources = load_sources(options)
    path = resolve_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    template = resolve_template(args.template, spec.template, tokenizer)
    bundle = build_datasets(sources, template, tokenizer, options)
    return _Checked(spec, kind, options, sources, path, tokenizer, template, bundle)


def _columns_and_firsts(data: _Checked) -> tuple[dict[str, list], list]:
    """Length, truncation and trained-token columns (of a sample, when streaming), and each source's first row."""
    from unift.data.streaming import encode_row

    keys = ("length", "truncated", "trained")
    if data.options.streaming:
        sample = _stream_sample(data.bundle)
        columns = {key: [r[key] for r in sample] for key in keys}
        firsts = [encode_row(next(s.iter())[1], data.template, data.tokenizer, data.options) for s in data.sources]
    else:
        parts = (data.bundle.train_full, data.bundle.val_full)
        columns = {key: [v for part in parts for v in part[key]] for key in keys}
        firsts = [table[0] for table in data.bundle.tables]
    return columns, firsts


def _write_header(w: Any, data: _Checked) -> None:
    options = data.options
    w(f"data:      {', '.join(options.data)}\n")
    w(f"tokenizer: {data.path} (model_type {data.spec.name})\n")
    w(f"template:  {_template_label(data.template)}\n")
    w(f"cutoff:    {options.cutoff_len} tokens; loss on {'every token' if options.train_on_prompt else 'assistant turns only'}\n\n")


def _write_counts(w: Any, args: Any, data: _Checked) -> None:
    """The per-source table (and its total), what a preference stage trains on, mixing and streaming."""
    options, stats, kind, bundle = data.options, data.bundle.stats, data.kind, data.bundle
    width = max(6, *(len(s["name"]) for s in stats["sources"]))
    w(f"{'source':<{width}} {'format':<10} {'records':>8} {'dropped':>8} {'train':>7} {'val':>6}  file\n")
    for s in stats["sources"]:
        fmt = ",".join(s["formats"]) or "-"
        cells = [s["records"], s["dropped"], s["train"], s["val"]]
        records, dropped, train, val = ("?" if c is None else c for c in cells)
        w(f"{s['name']:<{width}} {fmt:<10} {records:>8} {dropped:>8} {train:>7} {val:>6}  {s['path']}\n")
    if not options.streaming and len(stats["sources"]) > 1:
        total = sum(s["records"] for s in stats["sources"])
        w(f"{'total':<{width}} {'':<10} {total:>8} {stats['dropped']:>8} {stats['train']:>7} {stats['val']:>6}\n")
    if kind != "sft":
        what = {"pairs": "pairs", "unpaired": "labelled answers", "prompts": "prompts with reference answers"}[kind]
        w(f"{what} (--stage {args.stage}): {stats['examples']}"
          + (f"; desirable {sum(bundle.train_full['label']) + sum(bundle.val_full['label'])}" if kind == "unpaired"
             else "") + "\n")
    if options.data_ratios:
        w(f"mixing: --data_ratios {' '.join(f'{r:g}' for r in options.data_ratios)}\n")
    if options.streaming:
        w(f"streaming: files are read lazily (counts unknown); {stats['val']} validation examples held out "
          "from the start of the stream\n")


def _write_lengths(w: Any, lengths: list[int], columns: dict[str, list], stats: dict[str, Any],
                   options: DataOptions) -> dict[str, int]:
    """Token length statistics and histogram, what the cutoff truncates, and the trained share."""
    scope = f"a sample of {len(lengths)} from the stream" if options.streaming else "train + val"
    w(f"\ntokens per example ({scope}, before the cutoff):\n")
    w(f"  min {lengths[0]}  median {percentile(lengths, 0.5)}  mean {statistics.fmean(lengths):.1f}  "
      f"p95 {percentile(lengths, 0.95)}  max {lengths[-1]}\n")
    for line in histogram(lengths):
        w(line + "\n")
    truncated = sum(columns["truncated"])
    kept = sum(min(n, options.cutoff_len) for n in lengths)
    trained = sum(columns["trained"])
    w(f"truncated by --cutoff_len {options.cutoff_len}: {truncated} of {len(lengths)} "
      f"({100 * truncated / len(lengths):.1f}%) lost prompt or earlier turns")
    w(f"; dropped (no answer token left): {stats['dropped']}\n" if not options.streaming else "\n")
    fate = {"drop": "dropped", "keep": "kept cut at the end, without their end token",
            "split": "cut at the end, sharing the cut with the prompt"}[options.truncation]
    w(f"answers longer than the cutoff on their own: {stats.get('long_answers', 0)} ({fate}; "
      f"--truncation {options.truncation})\n")
    w(f"trained tokens: {trained} of {kept} ({100 * trained / max(1, kept):.0f}%); the rest is masked\n")
    return {"truncated": truncated, "trained": trained}


def _write_skipped(w: Any, stats: dict[str, Any]) -> None:
    skipped = [line for s in stats["sources"] if (line := skipped_summary(s["name"], s.get("skipped")))]
    if skipped:
        w("\nskipped (--strict_data refuses them instead):\n")
        for line in skipped:
            w(f"  {line}\n")


def _write_notes(w: Any, stats: dict[str, Any]) -> None:
    notes = [(s["name"], text, n) for s in stats["sources"] for text, n in s["notes"].items()]
    if notes:
        w("\nnotes:\n")
        for name, text, n in notes:
            w(f"  {name}: {n} {text}\n")


def _write_first_examples(w: Any, stats: dict[str, Any], firsts: list, tokenizer: Any, color: bool) -> None:
    """The first example of each source, the trained part marked."""
    legend = "bright" if color else f"inside {OPEN} {CLOSE}"
    for source, row in zip(stats["sources"], firsts):
        if row is None:
            continue
        if "prompt_ids" in row:
            w(f"\nfirst example of {source['name']} (prompt, then each answer {legend}):\n")
            w(tokenizer.decode(row["prompt_ids"]) + "\n")
            answers = (("chosen", row["chosen_ids"]), ("rejected", row["rejected_ids"])) if "chosen_ids" in row \
                else ((f"completion ({'desirable' if row['label'] else 'undesirable'})", row["completion_ids"]),)
            for name, ids in answers:
                w(f"  {name}: " + marked(ids, ids, tokenizer, color) + "\n")
            continue
        size = len(row["input_ids"])
        where = "at the end: its answer alone is too long" if row.get("long_answer") else "at the front"
        cut = f", cut from {row['length']} {where}" if row["length"] > size else ""
        w(f"\nfirst example of {source['name']} ({size} tokens{cut}; trained text {legend}, the rest masked):\n")
        w(marked(row["input_ids"], row["labels"], tokenizer, color) + "\n")


def _parity(args: Any, template: Any, tokenizer: Any, w: Any) -> Any:
    """The template parity section (unift.data.template_parity); --template_check strict stops on a difference."""
    from unift.data.template_parity import check_parity

    mode = getattr(args, "template_check", "report")
    if mode == "off":
        return None
    report = check_parity(template, tokenizer)
    if report is None:
        w("\ntemplate parity: the checkpoint ships no chat template; nothing to compare\n")
        return None
    w(f"\ntemplate parity: --template {template.name} against the checkpoint's chat template, on "
      f"{len(report.results)} probe conversations (the difference starts after ⟪):\n")
    for line in report.lines():
        w(line + "\n")
    verdict = "identical" if report.identical else \
        "they differ: a server that reads the chat template prompts otherwise than training did (--template model)"
    w(f"  => {verdict}\n")
    if mode == "strict" and not report.identical:
        raise UniftError(f"--template_check strict: {report.summary()}")
    return report


def _stream_sample(bundle) -> list[dict[str, Any]]:
    rows = []
    for row in bundle.train:
        rows.append(row)
        if len(rows) >= STREAM_SAMPLE:
            break
    return rows


# ---- convert ---------------------------------------------------------------------------------------


def convert(data: list[str], target: str, output: str, dataset_dir: str | None = None,
            max_samples: int | None = None) -> int:
    """Write every record of the given data in the target form; returns the number written."""
    if target not in TARGETS:
        raise UniftError(f"--to {target!r}: known forms are {', '.join(TARGETS)}")
    out = Path(output)
    as_list = out.suffix.lower() == ".json"
    if out.suffix.lower() not in (".json", ".jsonl"):
        raise UniftError(f"--output {output}: write .json or .jsonl")
    records = []
    folder = Path(dataset_dir) if dataset_dir else None
    for name in expand_names(data, folder):
        entry = resolve_dataset(name, folder)
        skipped = Skipped()
        for where, conversation in iter_conversations(entry.path, entry.formatting, entry.columns, entry.tags,
                                                      limit=max_samples or entry.num_samples, skipped=skipped):
            records.append(convert_record(conversation, target, where))
        line = skipped_summary(entry.name, skipped.as_dict())
        if line:
            print(f"not converted: {line}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        if as_list:
            json.dump(records, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
        else:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)
