"""The file to pass to ms-swift's `--external_plugins` (swift_sophia/plugin.py), for Python callers; the `sophia
plugin-path` command (sophia_cli.py) finds the same file without importing the package."""
from __future__ import annotations

import os


def plugin_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin.py")


__all__ = ["plugin_path"]
