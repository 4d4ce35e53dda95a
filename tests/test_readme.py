"""The README's quick start: exactly two commands, usable on a stock Debian/Ubuntu python3, and the
second is what CI runs."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_in_a_virtual_environment():
    commands = quick_start()
    assert len(commands) == 2
    for command in commands:
        # PEP 668: a bare pip install is refused by a stock Debian/Ubuntu python3.
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install ")
        assert not re.search(r"(^|&& )pip3? install", command)
    assert "karyo reproduce --preset quick" in commands[0]
    assert commands[1].endswith("-m pytest")


def test_ci_runs_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    extract = re.search(r"test_command=\$\((.*)\)\n", script).group(1)
    printed = subprocess.run(["bash", "-c", extract], cwd=REPO, capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == quick_start()[1]
    assert 'bash -euo pipefail -c "$test_command"' in script
    assert f"#   {quick_start()[1]}" in script  # the comment naming the command stays true
