"""`sophia plugin-path`: the file to pass to ms-swift's `--external_plugins` (swift_sophia/plugin.py)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


def plugin_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin.py")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argparse.ArgumentParser(prog="sophia plugin-path", description="print the path of the ms-swift plugin file"
                            ).parse_args(argv)
    print(plugin_path())
    return 0


__all__ = ["plugin_path", "main"]
