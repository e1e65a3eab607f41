"""`velora` command line: one sub-command per module, dispatched through a small table.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
the module is imported only when its command runs, so ``velora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("velora.cli.demo", "train a tiny LLaMA with and without VeLoRA and print the memory saved"),
    "plan": ("velora.cli.plan", "predict peak training memory for a model/method on fake tensors"),
    "train": ("velora.cli.train", "train a model with one method (full, lora, velora, galore, flora, ...)"),
    "compare": ("velora.experiments.compare", "the main job: pre-train a small LLaMA with every method, compare"),
    "bench": ("velora.experiments.bench", "reproduce one of the papers' ablation tables"),
    "diagnose": ("velora.cli.diagnose", "how much input energy and weight gradient each VeLoRA layer keeps"),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already state its default (flags that
    are off by default and options without a default say what they do instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("default" in help_text.lower() or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS):
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)"


def _version() -> str:
    from velora import __version__

    return __version__


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velora", description="Memory-efficient transformer training.")
    parser.add_argument("--version", action="version", version=f"velora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module_path, help_text) in _available().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"velora {_version()}")
        return 0
    name = argv[0]
    if name not in commands:
        known = ", ".join(sorted(commands))
        print(f"velora: unknown command {name!r}; choose one of: {known}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"velora {name}", description=commands[name][1],
                                     formatter_class=DefaultsHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # user errors are one line, no traceback
        print(f"velora {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
