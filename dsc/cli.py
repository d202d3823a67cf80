"""The ``dsc`` command line. Each subcommand lives in the module that owns the concept; a module exposes
``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports inside ``run``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# PyTorch's switch that puts CPU tensors of 2 MB and more on transparent huge pages (read once, at its first
# allocation, so set before torch allocates anything).
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"

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


def prefer_huge_pages() -> None:
    """Put the commands' large CPU tensors (K/V cache, labels, weights) on 2 MB pages unless the user chose
    (``THP_MEM_ALLOC_ENABLE=0`` keeps 4 KB pages). Why: a decode step reads 1/16 of the K/V rows, scattered, and on
    4 KB pages nearly every row is on a page of its own (a page walk per row); dense attention streams and gains
    less. The benchmarks run dense and Double Sparsity under the same setting and print it."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def main(argv: list[str] | None = None) -> int:
    prefer_huge_pages()
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
