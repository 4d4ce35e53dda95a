"""The command line as a terminal sees it: nothing on standard error but karyo's own line."""

import os
import subprocess
import sys


def _karyo(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "karyo", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


def test_a_tensorflow_command_prints_only_its_error_line(tmp_path):
    """TensorFlow's start-up lines (CUDA stubs, CPU features) do not reach the terminal."""
    missing = tmp_path / "missing.csv"
    result = _karyo("train", "vgg16_original", "--data", str(missing), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"karyo: error: {missing}: manifest not found"], result.stderr
    assert not (tmp_path / "run").exists()


def test_debug_keeps_tensorflow_visible(tmp_path):
    result = _karyo("train", "vgg16_original", "--data", str(tmp_path / "missing.csv"),
                    "--out", str(tmp_path / "run"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_closed_pipe_is_not_an_error():
    """`karyo list | head -1`: the reader has gone; karyo stops without a message."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before karyo writes anything
    try:
        result = subprocess.run([sys.executable, "-m", "karyo", "list"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == "", result.stderr
    assert result.returncode == 141


def _commands(parser):
    """Every command line a user can ask --help of: ``list``, ``data synth``, ..."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append([name])
                found += [[name, *rest] for rest in _commands(sub)]
    return found


def test_every_command_explains_itself(capsys):
    import pytest

    from karyo.cli import build_parser, main

    commands = _commands(build_parser())
    assert ["train"] in commands and ["data", "synth"] in commands and ["reproduce"] in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith("usage: karyo " + " ".join(command)), command
        assert len(out.splitlines()) > 3, command  # more than a usage line: a description
