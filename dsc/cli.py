"""The ``dsc`` command line. Each subcommand lives in the module that owns the concept; a module exposes
``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports inside ``run``."""
from __future__ import annotations

import argparse
import importlib
import sys

# (command path, module, one-line help)
COMMANDS = [
    (("demo",), "dsc.demo", "run the main job on the embedded model and print a short report"),
    (("calibrate",), "dsc.calibration.cli", "rank each head's channels on calibration text; write a channel config"),
    (("explain",), "dsc.passes.explain", "list attention sites and what the dsparse backend makes of each"),
    (("bench", "decode"), "dsc.bench.decode", "end-to-end decode throughput and per-step latency"),
    (("bench", "attention"), "dsc.bench.attention", "decode attention op: dense SDPA vs Double Sparsity"),
    (("bench", "offload"), "dsc.bench.offload", "decode attention over host-held K/V: whole-layer vs selected rows"),
    (("eval", "ppl"), "dsc.evaluation.ppl", "perplexity on the evaluation essays"),
    (("eval", "retrieval"), "dsc.evaluation.retrieval", "passkey and line retrieval under each policy"),
    (("eval", "sweep"), "dsc.evaluation.sweep", "perplexity vs budget per policy, retrieval vs length; plot"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsc", description="Double Sparsity compiler for long-context decoding")
    parser.add_argument("--version", action="version", version=f"dsc {importlib.import_module('dsc').__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        subs = top
        for word in path[:-1]:
            if word not in groups:
                groups[word] = top.add_parser(word, help=f"{word} subcommands").add_subparsers(
                    dest=f"{word}_command", required=True, metavar="SUBCOMMAND")
            subs = groups[word]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet in this checkout
        p = subs.add_parser(path[-1], help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves (--tp)
    from dsc.assets import AssetError

    try:
        return int(args._run(args) or 0)
    except (AssetError, ValueError, FileNotFoundError) as e:
        print(f"dsc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
