"""The ``loraprune`` command: parses arguments and makes one library call per subcommand.

A subcommand is a pair of functions in COMMANDS: one adds its arguments, one runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from loraprune import __version__
from loraprune.errors import LoraPruneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, shared by every subcommand that loads a model."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in 'smollm2-135m', a Hugging Face model folder, a .gguf file or a hub id (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, default_data: str) -> None:
    """--data, --austen-dir, --seq-len and --max-tokens, shared by commands that read text."""
    parser.add_argument(
        "--data",
        default=default_data,
        help="austen, pydoc, text:PATH, or (with loraprune[eval] and network) wikitext2, ptb, c4, "
        "alpaca (default: %(default)s)",
    )
    parser.add_argument(
        "--austen-dir",
        default=None,
        help="folder with the Austen novels (default: $LORAPRUNE_AUSTEN_DIR or a "
        "shared/data/austen found in this folder or a parent)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: %(default)s)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="use only the first N tokens of the text (default: all)",
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune eval`."""
    add_model_arguments(parser)
    add_data_arguments(parser, default_data="pydoc")
    parser.add_argument(
        "--split",
        default="validation",
        choices=["validation", "train"],
        help="which part of the text to score (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """Measure perplexity and print it with the text, window length and token count."""
    from loraprune.evaluate import evaluate_model

    result = evaluate_model(
        model=args.model,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
        split=args.split,
        austen_dir=args.austen_dir,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({"model": args.model, **result.to_dict()}))
    else:
        print(
            f"perplexity {result.ppl:.3f} on {result.data} ({result.split}), "
            f"{result.n_windows} windows of {result.seq_len} tokens, "
            f"{result.n_tokens} tokens predicted, {result.tokens_per_second:.0f} tokens/s"
        )
    return 0


# name -> (help, add_arguments, run). Each new subcommand is one entry and two functions.
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "eval": ("measure perplexity on a text", add_eval_arguments, run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="loraprune",
        description="LoRA-guided structured pruning of LLaMA-family models.",
    )
    parser.add_argument("--version", action="version", version=f"loraprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the loraprune command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run a parsed command, turning user errors into one line on stderr and exit code 2."""
    try:
        return args.run(args)
    except LoraPruneError as e:
        print(f"loraprune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("loraprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
