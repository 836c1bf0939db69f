"""`sophia`: small commands around ms-swift's own CLIs; `sophia COMMAND --help` gives a command's arguments.

The `sophia` script runs this module, which lives outside the `swift_sophia` package and imports nothing of it:
importing the package registers the model with transformers (torch and transformers load, seconds), so `sophia
--help` and a mistyped command answer at once. A command imports its module only when it runs; each module has a
`main(argv) -> int` with its own argument parser. `python -m swift_sophia COMMAND ...` runs the same commands.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Optional, Sequence

# command -> (the module whose main(argv) runs it, what it does)
COMMANDS = {
    "plugin-path": ("sophia_cli", "print the path of the ms-swift plugin file"),
    "build-tiny": ("swift_sophia.tools.tiny", "build the sophia-tiny checkpoint"),
    "build-random": ("swift_sophia.tools.shapes", "build a random-weight checkpoint of a named real shape"),
    "make-data": ("swift_sophia.tools.synthetic", "write the synthetic video QA dataset"),
    "synthetic-shots": ("swift_sophia.tools.synthetic_shots",
                        "write the one-shot-among-many video dataset of the miniature study"),
    "init-from-internvl": ("swift_sophia.tools.convert",
                           "start a Sophia checkpoint from an InternVL one (original or -hf layout)"),
    "precompute-shots": ("swift_sophia.tools.precompute_shots",
                         "detect the shots of a dataset's videos ahead of training (the shot cache)"),
    "contact-sheet": ("swift_sophia.tools.contact_sheet",
                      "draw which shots and frames pruning keeps for one video and one query"),
    "convert-benchmark": ("swift_sophia.evaluation.convert_cli",
                          "turn a benchmark's published files into a local video MCQ set for swift eval"),
    "eval-breakdown": ("swift_sophia.evaluation.breakdown",
                       "accuracy of a swift eval run by any field of the set's questions"),
    "niah": ("swift_sophia.evaluation.niah",
             "video needle-in-a-haystack: build the set, evaluate a checkpoint, draw the heatmap"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sophia", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)  # the command's own parser takes its arguments
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _parser().parse_args(argv[:1]).command
    module = COMMANDS[command][0]
    run = plugin_path_main if module == __name__ else importlib.import_module(module).main
    return run(argv[1:])


def plugin_path_main(argv: Sequence[str]) -> int:
    """`sophia plugin-path`, answered here: found without importing the package (each `swift` command line that
    names the plugin with `$(sophia plugin-path)` would otherwise wait for torch and transformers to load)."""
    argparse.ArgumentParser(prog="sophia plugin-path", description="print the path of the ms-swift plugin file"
                            ).parse_args(argv)
    package = importlib.util.find_spec("swift_sophia")  # locates the package; runs none of it
    print(os.path.join(list(package.submodule_search_locations)[0], "plugin.py"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
