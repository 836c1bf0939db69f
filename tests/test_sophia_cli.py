"""`sophia` (sophia_cli.py): one route table; `sophia --help` lists every command without importing torch or
transformers (nor the package, whose import registers the model with transformers); each command's module has a
`main(argv)` whose parser is named after the command."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sophia_cli

SOPHIA = shutil.which("sophia", path=str(Path(sys.executable).parent)) or "sophia"
HEAVY = ("torch", "transformers", "swift", "swift_sophia")


def _imported(stderr: str) -> set:
    """Top-level names of the modules `python -X importtime` (PYTHONPROFILEIMPORTTIME) reports."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_help_lists_every_command_without_importing_torch_or_transformers():
    proc = subprocess.run([SOPHIA, "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for command, (_, help_text) in sophia_cli.COMMANDS.items():
        assert f"    {command}" in proc.stdout, (command, proc.stdout)
    imported = _imported(proc.stderr)
    assert "argparse" in imported and "sophia_cli" in imported, sorted(imported)  # the import times were recorded
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_an_unknown_command_is_refused_at_once():
    proc = subprocess.run([SOPHIA, "no-such-command"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in proc.stderr, proc.stderr[-3000:]
    assert not _imported(proc.stderr) & set(HEAVY)


@pytest.mark.parametrize("command", sorted(sophia_cli.COMMANDS))
def test_each_command_has_a_main_with_its_own_parser(command, capsys):
    module = importlib.import_module(sophia_cli.COMMANDS[command][0])
    with pytest.raises(SystemExit) as exit_info:
        sophia_cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sophia {command} ")
    assert callable(module.main if module is not sophia_cli else sophia_cli.plugin_path_main)


def test_python_m_swift_sophia_runs_the_same_commands():
    from swift_sophia.ms_swift.plugin_path import plugin_path

    for cmd in ([SOPHIA, "plugin-path"], [sys.executable, "-m", "swift_sophia", "plugin-path"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == plugin_path() and os.path.isfile(plugin_path())


def test_plugin_path_answers_without_importing_the_package():
    """Every `swift` command line of the docs names the plugin with `$(sophia plugin-path)`."""
    from swift_sophia.ms_swift.plugin_path import plugin_path

    proc = subprocess.run([SOPHIA, "plugin-path"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert proc.returncode == 0 and proc.stdout.strip() == plugin_path(), proc.stderr[-3000:]
    assert not _imported(proc.stderr) & set(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))
