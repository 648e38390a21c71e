"""The one command line: `unift <command>`; the top-level scripts call main() with their command.

Dispatch only: each command is a module of unift.commands with HELP, an options dataclass OPTIONS (its flags
are generated from the fields), run(options), and optionally CONFIG (takes --config FILE.yaml) or
SUBCOMMANDS (action -> (options, run, help, description)). Command modules are imported only when their
command runs, so `unift list` does not load what `unift train` needs."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from unift.console import drop_held, held_stderr, setup_logging
from unift.errors import UniftError

# command -> (module under unift.commands, one line of help); the order of `unift --help`
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune a model with a PEFT method"),
    "generate": ("generate", "answer one --prompt, or chat in the terminal"),
    "chat": ("chat", "chat in the terminal with streaming answers (server.py)"),
    "predict": ("predict", "answer every record of a file into predictions.jsonl, resumably (predict.py)"),
    "merge": ("merge", "fold the adapter into the base model (merge.py)"),
    "serve": ("serve", "web service: OpenAI-compatible API under /v1 and a chat UI at / (web.py)"),
    "eval": ("eval", "exact match, perplexity, BLEU/ROUGE-L and multiple-choice exams; base vs few-shot vs tuned"),
    "experiment": ("experiment", "a sweep of train + eval runs: results table, loss curves, bar chart (resumable)"),
    "list": ("list", "print the model_type x peft_type support matrix"),
    "data": ("data", "check data (what a run would train on) or convert it between forms"),
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"unift.commands.{COMMANDS[name][0]}")


def _add_options(parser: argparse.ArgumentParser, options: type, config: bool = False) -> None:
    from unift.options import add_arguments

    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if config:
        parser.add_argument("--config", help="YAML file of options (flags given on the command line override it)")
    add_arguments(parser, options)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, as every other bad input is (the flags are one --help away)."""

    def error(self, message: str):
        drop_held()  # as for a UniftError: the usage line alone, not what importing the flags' modules logged
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's flags are built (the others need not be imported)."""
    parser = _Parser(prog="unift", description="Parameter-efficient fine-tuning, end to end.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        module = command_module(name)
        actions = getattr(module, "SUBCOMMANDS", None)
        if actions is None:
            _add_options(sp, module.OPTIONS, getattr(module, "CONFIG", False))
            continue
        inner = sp.add_subparsers(dest="action", required=True, metavar="action")
        for action, (options, _, action_help, description) in actions.items():
            _add_options(inner.add_parser(action, help=action_help, description=description), options)
    return parser


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def parse(argv: list[str]) -> argparse.Namespace:
    chosen = _chosen(argv)
    parser = make_parser(chosen)
    ns = parser.parse_args(argv)
    if getattr(ns, "config", None):
        from unift.options import load_yaml_defaults

        sub = parser._subparsers._group_actions[0].choices[ns.command]  # the chosen subcommand's parser
        sub.set_defaults(**load_yaml_defaults(ns.config, command_module(ns.command).OPTIONS))
        ns = parser.parse_args(argv)
    return ns


def options_and_run(ns: argparse.Namespace):
    """(options dataclass instance, run function) of the parsed command."""
    from unift.options import parse_into

    module = command_module(ns.command)
    actions = getattr(module, "SUBCOMMANDS", None)
    if actions is not None:
        options, run, _, _ = actions[ns.action]
        return parse_into(options, ns), run
    return parse_into(module.OPTIONS, ns), module.run


def main(argv: list[str] | None = None, command_name: str | None = None) -> int:
    own_process = argv is None  # a command line (console script or top-level script), not a caller's argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if command_name and not (argv and argv[0] == command_name):
        argv = [command_name, *argv]
    debug = "--debug" in argv
    from unift import compat

    if own_process and argv and argv[0] == "train" and "--help" not in argv and "-h" not in argv:
        from unift.allocator import reexec_with_allocator

        reexec_with_allocator()  # jemalloc where the system has it: returns only if nothing changes
        compat.keep_out.apply(argv)  # before anything imports peft or transformers
    setup_logging()
    with held_stderr() as stderr:  # other libraries' lines wait until the command is under way
        try:
            options, run = options_and_run(parse(argv))
            run(options)
        except UniftError as err:
            if debug:
                stderr.release()
                raise
            stderr.drop()  # the one line below says what is wrong
            print(f"unift: error: {err}", file=stderr.target)
            return 2
        except KeyboardInterrupt:
            stderr.release()
            print("\nunift: interrupted", file=stderr.target)
            return 130
        except BaseException:
            stderr.release()  # a crash: what the libraries said may explain it
            raise
        stderr.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
