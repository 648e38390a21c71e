"""The one command line: `unift <command>`; the top-level scripts call main() with their command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from unift.args import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Range,
    TrainArgs,
    add_arguments,
    bounded,
    load_yaml_defaults,
    parse_into,
)
from unift.errors import UniftError
from unift.models.devices import DEVICE_HELP

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {}


def command(name: str, help: str, build: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], None]) -> None:
    """Register a subcommand: `build` adds its flags, `run` does the work (importing heavy modules lazily)."""
    COMMANDS[name] = (help, build, run)


# ---- train -------------------------------------------------------------------------------------------

def build_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (flags given on the command line override it)")
    add_arguments(parser, TrainArgs)


def run_train(ns: argparse.Namespace) -> None:
    from unift.train.run import train

    train(parse_into(TrainArgs, ns))


command("train", "fine-tune a model with a PEFT method", build_train, run_train)


# ---- shared inference flags --------------------------------------------------------------------------

def add_model_flags(parser: argparse.ArgumentParser, adapter_required: bool = False,
                    find_by_data: bool = False) -> None:
    group = parser.add_argument_group("model options")
    if find_by_data:
        group.add_argument("--data", nargs="+", dest="run_data", metavar="NAME",
                           help="use the run `uniform_finetune.py --model_type T --data NAME` wrote under "
                                "saved_models/ (the newest if several); the original toolkit's way")
    group.add_argument("--adapter_dir", "--lora_dir", dest="adapter_dir", required=adapter_required,
                       help="run folder written by `unift train` (needs nothing else), or any PEFT adapter folder")
    group.add_argument("--model_name_or_path", "--base_model", dest="model_name_or_path",
                       help="base or merged model folder (default: the run card's, else the embedded model)")
    group.add_argument("--model_type", help="model family (default: the run card's, else llama)")
    group.add_argument("--template", help="prompt template (default: the run card's)")
    group.add_argument("--trust_remote_code", action="store_true", default=None,
                       help="allow modelling code shipped with the checkpoint")
    group.add_argument("--size", help="informational, accepted for the original toolkit's commands")
    group.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP}")


def add_decoding_flags(parser: argparse.ArgumentParser, preset: str) -> None:
    from unift.engine.engine import PRESETS

    group = parser.add_argument_group("decoding options (override the preset)")
    group.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                       help=f"named decoding settings; 'original' = the original toolkit's (default: {preset})")
    group.add_argument("--max_new_tokens", type=bounded(int, POSITIVE_INT))
    group.add_argument("--do_sample", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
    group.add_argument("--temperature", type=bounded(float, POSITIVE))
    group.add_argument("--top_p", type=bounded(float, Range(0, 1, low_open=True)))
    group.add_argument("--top_k", type=bounded(int, NON_NEGATIVE))
    group.add_argument("--num_beams", type=bounded(int, POSITIVE_INT))
    group.add_argument("--repetition_penalty", type=bounded(float, POSITIVE))
    group.add_argument("--no_repeat_ngram_size", type=bounded(int, NON_NEGATIVE))
    group.add_argument("--stop", nargs="+", help="stop strings")
    group.add_argument("--seed", type=bounded(int, NON_NEGATIVE), help="random seed for sampling (reproducible sampled answers)")


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help="weights dtype (default: fp32 on CPU, bf16/fp16 on GPU); bf16 makes "
                             "batched generation ~2.4x faster on CPUs with AVX512-BF16, but greedy answers then "
                             "depend on the batch size")


def load_engine(ns: argparse.Namespace):
    from unift.engine.engine import Engine
    from unift.models.dtypes import parse_dtype
    from unift.models.runcard import find_run

    if getattr(ns, "run_data", None) and not ns.adapter_dir:
        ns.adapter_dir = find_run(ns.run_data, ns.model_type)

    return Engine.load(ns.adapter_dir, base_model=ns.model_name_or_path, model_type=ns.model_type,
                       template=ns.template, trust_remote_code=ns.trust_remote_code,
                       dtype=parse_dtype(getattr(ns, "dtype", None)), device=ns.device)


def decoding(ns: argparse.Namespace):
    from unift.engine.engine import settings_from

    return settings_from(ns.preset, max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample,
                         temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, num_beams=ns.num_beams,
                         repetition_penalty=ns.repetition_penalty, no_repeat_ngram_size=ns.no_repeat_ngram_size,
                         stop=ns.stop, seed=getattr(ns, "seed", None))


# ---- generate / chat ---------------------------------------------------------------------------------

def build_generate(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, find_by_data=True)
    add_dtype_flag(parser)
    parser.add_argument("--prompt", help="answer this once and exit (without it: an interactive chat)")
    parser.add_argument("--system", help="system prompt")
    add_decoding_flags(parser, preset="greedy")


def run_generate(ns: argparse.Namespace) -> None:
    from unift.engine.chat import answer_once, chat_loop

    engine = load_engine(ns)
    if ns.prompt is not None:
        answer_once(engine, ns.prompt, decoding(ns), ns.system)
    else:
        chat_loop(engine, decoding(ns), ns.system)


command("generate", "answer one --prompt, or chat in the terminal", build_generate, run_generate)


def build_chat(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, find_by_data=True)
    add_dtype_flag(parser)
    parser.add_argument("--system", help="system prompt")
    add_decoding_flags(parser, preset="chat")


def run_chat(ns: argparse.Namespace) -> None:
    from unift.engine.chat import chat_loop

    chat_loop(load_engine(ns), decoding(ns), ns.system)


command("chat", "chat in the terminal with streaming answers (server.py)", build_chat, run_chat)


# ---- predict -----------------------------------------------------------------------------------------

def build_predict(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    add_dtype_flag(parser)
    parser.add_argument("--input", "--data", dest="input", required=True,
                        help="prompts: alpaca / sharegpt / messages / plain prompt records, JSON or JSONL "
                             "(or .txt, one prompt per line)")
    parser.add_argument("--result_dir", required=True, help="folder for predictions.jsonl (resumed if there)")
    parser.add_argument("--batch_size", "--predict_batch_size", dest="batch_size", default=16,
                        type=bounded(int, POSITIVE_INT), help="prompts generated together, left-padded (default: 16)")
    parser.add_argument("--cutoff_len", type=bounded(int, POSITIVE_INT),
                        help="keep at most this many prompt tokens (the last ones)")
    parser.add_argument("--max_samples", type=bounded(int, POSITIVE_INT), help="only the first N records")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    add_decoding_flags(parser, preset="greedy")


def run_predict(ns: argparse.Namespace) -> None:
    from unift.engine.predict import predict

    predict(load_engine(ns), ns.input, ns.result_dir, decoding(ns), batch_size=ns.batch_size,
            max_samples=ns.max_samples, max_prompt_tokens=ns.cutoff_len, overwrite=ns.overwrite,
            adapter_dir=ns.adapter_dir)


command("predict", "answer every record of a file into predictions.jsonl, resumably (predict.py)", build_predict, run_predict)


# ---- merge -------------------------------------------------------------------------------------------

def build_merge(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, adapter_required=True)
    parser.add_argument("--merged_dir", "--output_dir", dest="merged_dir", required=True,
                        help="folder for the merged model (loads with plain transformers)")
    parser.add_argument("--compute_dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="dtype of the saved weights (default: the base checkpoint's; QLoRA: the run's)")
    parser.add_argument("--export", choices=["gguf"], help="also write a GGUF file (llama-type families)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --merged_dir")


def run_merge(ns: argparse.Namespace) -> None:
    from unift.engine.merge import merge

    merge(ns.adapter_dir, ns.merged_dir, base_model=ns.model_name_or_path, model_type=ns.model_type,
          compute_dtype=ns.compute_dtype, trust_remote_code=ns.trust_remote_code, overwrite=ns.overwrite,
          export=ns.export, device=ns.device)


command("merge", "fold the adapter into the base model (merge.py)", build_merge, run_merge)


# ---- serve -------------------------------------------------------------------------------------------

def build_serve(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, find_by_data=True)
    add_dtype_flag(parser)
    group = parser.add_argument_group("service options")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=bounded(int, Range(0, 65535)), default=7860, help="port (default: 7860)")
    group.add_argument("--api_key", default=os.environ.get("UNIFT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (and the key as the UI password); "
                            "default: $UNIFT_API_KEY")
    group.add_argument("--no_ui", action="store_true", help="serve the /v1 API alone, without the chat UI at /")
    group.add_argument("--max_queue", type=bounded(int, POSITIVE_INT), default=256,
                       help="requests admitted at once (generating + waiting); more are answered 429 with "
                            "Retry-After (default: 256)")
    group.add_argument("--max_batch", type=bounded(int, POSITIVE_INT), default=16,
                       help="concurrent requests generated together in one batch (default: 16)")
    group.add_argument("--served_model_name", help="model id in the API (default: the run folder's name)")
    group.add_argument("--max_tokens_limit", type=bounded(int, POSITIVE_INT), default=4096, help="the largest max_tokens accepted")
    group.add_argument("--cutoff_len", type=bounded(int, POSITIVE_INT), help="keep at most this many prompt tokens (the last ones)")
    add_decoding_flags(parser, preset="chat")


def run_serve(ns: argparse.Namespace) -> None:
    from unift.serve.app import serve

    engine = load_engine(ns)
    engine.max_queue = ns.max_queue
    engine.scheduler.max_batch = ns.max_batch
    serve(engine, decoding(ns), host=ns.host, port=ns.port, api_key=ns.api_key, ui=not ns.no_ui,
          served_name=ns.served_model_name, max_tokens_limit=ns.max_tokens_limit, max_prompt_tokens=ns.cutoff_len)


command("serve", "web service: OpenAI-compatible API under /v1 and a chat UI at / (web.py)", build_serve, run_serve)


# ---- eval --------------------------------------------------------------------------------------------

def build_eval(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    add_dtype_flag(parser)
    parser.add_argument("--data", nargs="+", default=None,
                        help="held-out conversations, the last answer being the reference (default: arith_test "
                             "unless --exam is given)")
    parser.add_argument("--dataset_dir", help="folder with dataset_info.json")
    parser.add_argument("--exam", nargs="+", default=[],
                        help="multiple-choice exam files or folders (MMCU JSON, C-Eval / CMMLU / MMLU CSV)")
    parser.add_argument("--metrics", nargs="+", default=["em", "ppl"], help="for --data: em ppl bleu rouge "
                        "(default: em ppl)")
    parser.add_argument("--extractor", default="answer",
                        help="what exact match compares: answer (the Answer:/答案： line, default), last_number, "
                             "final_line, exact, or regex:PATTERN (its first group)")
    parser.add_argument("--compare_base", action="store_true", help="also score the base model (adapter off)")
    parser.add_argument("--num_shots", type=bounded(int, NON_NEGATIVE), default=0,
                        help="also score the base model with this many solved examples in context")
    parser.add_argument("--shots_from", nargs="+",
                        help="where the solved examples come from (default: the run's training data; for "
                             "--exam: the other questions of the same subject)")
    parser.add_argument("--choice", default="letter", choices=["letter", "text"],
                        help="exams: score the option letter (default) or the option text")
    parser.add_argument("--max_samples", type=bounded(int, POSITIVE_INT))
    parser.add_argument("--max_new_tokens", type=bounded(int, POSITIVE_INT),
                        help="longest generated answer (default: the longest reference answer's length and a "
                             "quarter more)")
    parser.add_argument("--batch_size", type=bounded(int, POSITIVE_INT), default=16)
    parser.add_argument("--cutoff_len", type=bounded(int, POSITIVE_INT), default=2048,
                        help="longest scored sequence (tokens)")
    parser.add_argument("--show", type=bounded(int, NON_NEGATIVE), default=3, help="print this many questions with each answer")
    parser.add_argument("--output", help="results file (default: <adapter_dir or .>/eval_results.json)")
    parser.add_argument("--plot", action="store_true", help="also write PNG bar charts beside the results")


def run_eval(ns: argparse.Namespace) -> None:
    from unift.evals.evaluate import EvalOptions, evaluate
    from unift.models.dtypes import parse_dtype

    data = ns.data if ns.data is not None else ([] if ns.exam else ["arith_test"])
    options = EvalOptions(
        data=data, exam=ns.exam, metrics=tuple(ns.metrics), extractor=ns.extractor, compare_base=ns.compare_base,
        num_shots=ns.num_shots, shots_from=ns.shots_from, choice=ns.choice, max_samples=ns.max_samples,
        max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size, cutoff_len=ns.cutoff_len, show=ns.show,
        dataset_dir=ns.dataset_dir,
    )
    evaluate(ns.adapter_dir, options, base_model=ns.model_name_or_path, model_type=ns.model_type,
             output=ns.output, plot=ns.plot, device=ns.device, dtype=parse_dtype(ns.dtype))


command("eval", "exact match, perplexity, BLEU/ROUGE-L and multiple-choice exams; base vs few-shot vs tuned",
        build_eval, run_eval)


# ---- experiment --------------------------------------------------------------------------------------

def build_experiment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment YAML (see configs/experiments/)")
    parser.add_argument("--preset", default="small", help="which of the file's presets (default: small)")
    parser.add_argument("--output_dir", help="folder of the runs and reports (default: experiments/NAME-PRESET)")
    parser.add_argument("--runs", nargs="+", help="only these runs (by name)")


def run_experiment(ns: argparse.Namespace) -> None:
    from unift.commands.experiment import run_experiment as run

    command_text = f"unift experiment {ns.file} --preset {ns.preset}" + (f" --runs {' '.join(ns.runs)}" if ns.runs else "")
    run(ns.file, ns.preset, ns.output_dir, ns.runs, command=command_text)


command("experiment", "a sweep of train + eval runs: results table, loss curves, bar chart (resumable)",
        build_experiment, run_experiment)


# ---- list --------------------------------------------------------------------------------------------

def build_list(parser: argparse.ArgumentParser) -> None:
    pass


def run_list(ns: argparse.Namespace) -> None:
    from unift.peft.support import support_table

    print(support_table())


command("list", "print the model_type x peft_type support matrix", build_list, run_list)


# ---- data --------------------------------------------------------------------------------------------

def build_data(parser: argparse.ArgumentParser) -> None:
    from unift.commands.data import CheckArgs
    from unift.data.convert import TARGETS

    sub = parser.add_subparsers(dest="data_command", required=True, metavar="action")
    check = sub.add_parser("check", help="show what a run would train on: counts, formats, token lengths, "
                           "truncation, the first example of each source with the trained part marked",
                           description="Validate the data and show what `unift train` would train on "
                           "(loads the tokenizer, not the model).")
    add_arguments(check, CheckArgs)
    check.add_argument("--no_example", dest="show_example", action="store_false",
                       help="do not print the first example of each source")
    conv = sub.add_parser("convert", help="rewrite data as alpaca, sharegpt or messages records",
                          description="Read any supported data and write it in another form (.json or .jsonl).")
    conv.add_argument("--data", nargs="+", required=True, help="dataset names or paths")
    conv.add_argument("--to", required=True, choices=TARGETS, help="the form to write")
    conv.add_argument("--output", required=True, help="file to write (.json: a list; .jsonl: one per line)")
    conv.add_argument("--dataset_dir", help="folder with dataset_info.json")
    conv.add_argument("--max_samples", type=bounded(int, POSITIVE_INT), help="convert at most this many records per entry")


def run_data(ns: argparse.Namespace) -> None:
    from unift import data_tools

    if ns.data_command == "check":
        data_tools.check(parse_into(data_tools.CheckArgs, ns), show=ns.show_example)
    else:
        n = data_tools.convert(ns.data, ns.to, ns.output, ns.dataset_dir, ns.max_samples)
        print(f"wrote {n} {ns.to} records to {ns.output}")


command("data", "check data (what a run would train on) or convert it between forms", build_data, run_data)


# ---- entry -------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unift", description="Parameter-efficient fine-tuning, end to end.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, build, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        build(sp)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = make_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "config", None):
        sub = parser._subparsers._group_actions[0].choices[ns.command]  # the chosen subcommand's parser
        sub.set_defaults(**load_yaml_defaults(ns.config, TrainArgs, sub))
        ns = parser.parse_args(argv)
    return ns


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (callers and tests swap it after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """unift's own messages as `[unift] ...` (rank 0 only); other libraries keep their own format."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    ours = logging.getLogger("unift")
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[unift] %(message)s"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # transformers 5 renamed gradient checkpointing; peft still calls the old name. Not the user's to fix.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    # bitsandbytes warns at import on every CPU machine about an optional kernels package: not actionable.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None, command_name: str | None = None) -> int:
    own_process = argv is None  # a command line (console script or top-level script), not a caller's argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if command_name and not (argv and argv[0] == command_name):
        argv = [command_name, *argv]
    debug = "--debug" in argv
    if own_process and argv and argv[0] == "train":
        from unift.runtime import keep_bitsandbytes_out, keep_deepspeed_out

        keep_bitsandbytes_out(argv)
        keep_deepspeed_out(argv)
    setup_logging()
    try:
        ns = parse(argv)
        COMMANDS[ns.command][2](ns)
    except UniftError as err:
        if debug:
            raise
        print(f"unift: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nunift: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
