"""`unift experiment FILE.yaml`: a sweep of train + eval runs, one folder with a results table (Markdown
and CSV), every run's loss curve on one chart, and a bar chart of the final metric. Resumable: a run whose
eval_results.json exists is not redone.

An experiment file:

    name: lora_dropout
    metric: exact_match            # figure of the bar chart and the ranking (a key of the eval figures)
    task: arith_test               # which eval task that figure comes from (default: the first)
    presets:                       # --preset picks one; train/eval settings shared by every run
      small: {train: {data: [arith], max_steps: 40, ...}, eval: {data: [arith_test], max_samples: 50}}
      full:  {train: {model_name_or_path: ..., ...}, eval: {...}}
    runs:                          # each run: a name, train flags over the preset's, eval options over its
      - {name: lora, train: {peft_type: lora}}
      - {name: zero-shot, train: false}              # no training: the base model is evaluated
      - {name: grpo, train: {stage: grpo, adapter_dir: "run:lora"}}  # starts from an earlier run's folder
    sweep: {lora_dropout: [0.1, 0.2, 0.4]}           # every run x every combination (optional)

Train settings are `unift train` options (as in a --config YAML); eval settings are `unift eval`'s
(EvalOptions fields).
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from unift.errors import UniftError
from unift.models.flags import OutputFlags
from unift.options import Options, like, opt

log = logging.getLogger("unift")
RUN_REF = "run:"  # a train setting naming another run of the experiment (adapter_dir: "run:sft")


@dataclass
class Run:
    name: str
    train: dict[str, Any] | None  # None: evaluate the base model without training
    eval: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # the preset's base model, for runs without training


@dataclass
class Experiment:
    name: str
    metric: str
    task: str | None
    runs: list[Run]
    description: str = ""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UniftError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def load_experiment(path: str, preset: str) -> Experiment:
    """Parse and check an experiment file; every run's options are validated before anything trains."""
    import yaml

    from unift.evals.evaluate import EvalOptions
    from unift.train.args import TrainArgs

    file = Path(path)
    if not file.is_file():
        raise UniftError(f"{path}: no such experiment file")
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UniftError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    spec = _mapping(spec, path)
    presets = _mapping(spec.get("presets"), f"{path}: presets")
    if preset not in presets:
        raise UniftError(f"{path}: no preset {preset!r}; it has {', '.join(presets) or 'none'}")
    chosen = _mapping(presets[preset], f"{path}: presets.{preset}")
    base_train = _mapping(chosen.get("train"), f"{path}: presets.{preset}.train")
    base_eval = _mapping(chosen.get("eval"), f"{path}: presets.{preset}.eval")
    sweep = _mapping(spec.get("sweep"), f"{path}: sweep")
    raw_runs = spec.get("runs") or [{"name": spec.get("name", file.stem)}]
    if not isinstance(raw_runs, list):
        raise UniftError(f"{path}: runs must be a list")
    train_fields = {f.name for f in fields(TrainArgs)}
    eval_fields = {f.name for f in fields(EvalOptions)}
    runs = []
    for n, raw in enumerate(raw_runs):
        where = f"{path}: runs[{n}]"
        raw = _mapping(raw, where)
        if "name" not in raw:
            raise UniftError(f"{where}: every run needs a name")
        train = raw.get("train", {})
        combos = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())] if sweep else [{}]
        for combo in combos:
            suffix = "".join(f"-{k}={v}" for k, v in combo.items())
            settings = None if train is False else {**base_train, **_mapping(train, where + ".train"), **combo}
            evaluation = {**base_eval, **_mapping(raw.get("eval"), where + ".eval")}
            for key in settings or {}:
                if key not in train_fields:
                    raise UniftError(f"{where}: unknown train option {key!r}")
            for key in evaluation:
                if key not in eval_fields:
                    raise UniftError(f"{where}: unknown eval option {key!r}")
            model = {k: base_train[k] for k in ("model_name_or_path", "model_type") if base_train.get(k)}
            runs.append(Run(f"{raw['name']}{suffix}", settings, evaluation, model))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UniftError(f"{path}: run names must be unique ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return Experiment(str(spec.get("name", file.stem)), str(spec.get("metric", "exact_match")), spec.get("task"),
                      runs, str(spec.get("description", "")))


def run_one(run: Run, folder: Path) -> dict[str, Any]:
    """Train (unless train: false) and evaluate one run in `folder`; returns its row of figures."""
    from unift.evals.evaluate import EvalOptions, evaluate
    from unift.models.runcard import METRICS
    from unift.options import from_mapping
    from unift.train.args import TrainArgs
    from unift.train.run import train

    results = folder / "eval_results.json"
    if results.exists():
        log.info("%s: done before, kept (%s)", run.name, results)
        return summarise(run, folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = None
    if run.train is not None:
        settings = dict(run.train)
        parent = str(settings.get("adapter_dir") or "")
        if parent.startswith(RUN_REF):  # "run:NAME": that earlier run's folder in this experiment
            earlier = folder.parent / parent[len(RUN_REF):]
            if not (earlier / METRICS).exists():
                raise UniftError(f"run {run.name}: adapter_dir {parent}: no finished run of that name before it")
            settings["adapter_dir"] = str(earlier)
        args = from_mapping(TrainArgs, {**settings, "output_dir": str(folder)}, f"run {run.name}: train")
        train(args)  # the trained model it returns is dropped here: evaluation loads the run folder
        gc.collect()
        if not (folder / METRICS).exists():
            raise UniftError(f"run {run.name}: training wrote no {METRICS}; see the log above")
        adapter = str(folder)
    model = {} if adapter else run.model
    evaluate(adapter, from_mapping(EvalOptions, run.eval, f"run {run.name}: eval"),
             base_model=model.get("model_name_or_path"), model_type=model.get("model_type"), output=str(results))
    gc.collect()
    return summarise(run, folder)


def summarise(run: Run, folder: Path) -> dict[str, Any]:
    from unift.models.runcard import METRICS

    document = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
    row: dict[str, Any] = {"run": run.name, "trained": run.train is not None}
    metrics_file = folder / METRICS
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        curve = [p["loss"] for p in metrics["loss_curve"]]
        tail = curve[-min(5, len(curve)):]
        row.update(trainable=metrics["trainable_parameters"], steps=metrics["global_steps"],
                   first_loss=curve[0] if curve else math.nan,
                   final_loss=sum(tail) / len(tail) if tail else math.nan,
                   train_seconds=round(metrics["wall_seconds"], 1), loss_curve=metrics["loss_curve"])
    setup = document["setups"][-1]  # the tuned model (or the base model for runs without training)
    for task, figures in setup["tasks"].items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and key not in ("seconds",):
                row[f"{task}:{key}"] = value
    return row


# columns of the results table: (row key suffix, title, format)
TABLE = (("trainable", "trainable params", "{:,}"), ("steps", "steps", "{}"), ("first_loss", "first loss", "{:.3f}"),
         ("final_loss", "final loss*", "{:.3f}"), ("perplexity", "held-out perplexity", "{:.3f}"),
         ("exact_match", "exact match", "{:.1%}"), ("accuracy", "accuracy", "{:.1%}"), ("bleu", "BLEU", "{:.2f}"),
         ("rouge_l", "ROUGE-L", "{:.2f}"), ("train_seconds", "train s", "{:.0f}"))


def _value(row: dict[str, Any], key: str, task: str | None) -> Any:
    if key in row:
        return row[key]
    candidates = [k for k in row if k.endswith(f":{key}") and (task is None or k == f"{task}:{key}")]
    return row[candidates[0]] if candidates else None


def write_reports(experiment: Experiment, rows: list[dict[str, Any]], out: Path, command: str) -> list[Path]:
    """results.md, results.csv, loss_curves.png and <metric>.png in `out`."""
    columns = [(k, t, f) for k, t, f in TABLE if any(_value(r, k, experiment.task) is not None for r in rows)]
    ranked = sorted(rows, key=lambda r: -(_value(r, experiment.metric, experiment.task) or -math.inf))
    lines = [f"# {experiment.name}", "", experiment.description.strip(), "",
             f"Command: `{command}`", "",
             "| rank | run | " + " | ".join(t for _, t, _ in columns) + " |", "|---:|---|" + "---:|" * len(columns)]
    for place, r in enumerate(ranked, start=1):
        cells = []
        for key, _, fmt in columns:
            value = _value(r, key, experiment.task)
            cells.append("" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append(f"| {place} | {r['run']} | " + " | ".join(cells) + " |")
    lines += ["", f"Ranked by {experiment.metric}" + (f" on {experiment.task}" if experiment.task else "")
              + ". *final loss: mean of the last 5 logged training losses."]
    written = [out / "results.md", out / "results.csv"]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keys = sorted({k for r in rows for k in r if k != "loss_curve"}, key=lambda k: (k != "run", k))
    with (out / "results.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in keys})
    written += plot_experiment(experiment, rows, out)
    return written


def plot_experiment(experiment: Experiment, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    trained = [r for r in rows if r.get("loss_curve")]
    if trained:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in trained:
            ax.plot([p["step"] for p in r["loss_curve"]], [p["loss"] for p in r["loss_curve"]], label=r["run"],
                    linewidth=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title(f"{experiment.name}: training loss", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append(out / "loss_curves.png")
    values = [(r["run"], _value(r, experiment.metric, experiment.task)) for r in rows]
    values = [(n, v) for n, v in values if v is not None]
    if values:
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(values) + 1.5), 3.6))
        pct = experiment.metric in ("exact_match", "accuracy")
        bars = ax.bar([n for n, _ in values], [v * (100 if pct else 1) for _, v in values], color="#4c72b0")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_ylabel(experiment.metric + (" (%)" if pct else ""))
        ax.set_title(f"{experiment.name}: {experiment.metric}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{experiment.metric}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{experiment.metric}.png")
    return written


def run_experiment(path: str, preset: str = "small", output_dir: str | None = None,
                   only: list[str] | None = None, command: str = "") -> list[dict[str, Any]]:
    """Every run of the experiment (finished ones kept), then the reports; returns the rows."""
    experiment = load_experiment(path, preset)
    out = Path(output_dir or Path("experiments") / f"{experiment.name}-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in experiment.runs if not only or r.name in only]
    if only and len(runs) != len(only):
        missing = sorted(set(only) - {r.name for r in runs})
        raise UniftError(f"--runs: no run named {', '.join(missing)} in {path}")
    rows = []
    for n, run in enumerate(runs, start=1):
        log.info("experiment %s: run %d/%d %s", experiment.name, n, len(runs), run.name)
        rows.append(run_one(run, out / run.name))
    (out / "experiment.json").write_text(json.dumps({"name": experiment.name, "preset": preset, "rows": rows},
                                                    indent=1, ensure_ascii=False), encoding="utf-8")
    for file in write_reports(experiment, rows, out, command or f"unift experiment {path} --preset {preset}"):
        print(f"wrote {file}")
    print((out / "results.md").read_text(encoding="utf-8"))
    return rows


@dataclass
class ExperimentOptions(Options):
    file: str = opt(None, "experiment YAML (see configs/experiments/)", positional=True)
    preset: str = opt("small", "which of the file's presets")
    output_dir: str | None = like(OutputFlags, "output_dir")
    runs: list[str] | None = opt(None, "only these runs (by name)")


OPTIONS = ExperimentOptions


def run(options: ExperimentOptions) -> None:
    command = f"unift experiment {options.file} --preset {options.preset}" + (
        f" --runs {' '.join(options.runs)}" if options.runs else "")
    run_experiment(options.file, options.preset, options.output_dir, options.runs, command=command)
