"""The ``llmreg`` command line."""

import subprocess
import sys

import llmreg
from llmreg.cli import main


def test_version_from_the_installed_entry_point():
    result = subprocess.run([sys.executable, "-m", "llmreg", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"llmreg {llmreg.__version__}"


def test_lab_info_for_a_model_not_built_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMREG_CACHE", str(tmp_path))
    assert main(["lab", "info", "--seed", "7"]) == 1
    printed = capsys.readouterr().out
    assert "not built yet" in printed and "llmreg lab build" in printed and str(tmp_path) in printed
