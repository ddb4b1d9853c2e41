"""The light ``ders_peft_cli`` entry package: ``--help`` / ``--version`` import no torch, and its literals match."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ders_peft.compression.config import BITS
from ders_peft.export import ARCHITECTURES
from ders_peft_cli import parser as cli_parser

SUBCOMMANDS = ("export", "compress", "train", "eval-ppl", "params", "inspect", "lm-eval")

_PROBE = """
import contextlib, io, json, sys
from ders_peft_cli import main
helps = {}
for argv in [["--help"], ["--version"]] + [[name, "--help"] for name in sys.argv[1:]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
    helps[" ".join(argv)] = {"code": code, "text": out.getvalue()}
heavy = sorted(m for m in ("torch", "transformers", "peft", "ders_peft") if m in sys.modules)
print(json.dumps({"helps": helps, "heavy": heavy}))
"""


def test_help_and_version_import_nothing_heavy():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *SUBCOMMANDS], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout)
    assert result["heavy"] == [], f"--help imported {result['heavy']}"
    helps = result["helps"]
    assert all(h["code"] == 0 for h in helps.values()), {k: h["code"] for k, h in helps.items()}
    assert helps["--version"]["text"].startswith("ders-peft ")
    for name in SUBCOMMANDS:
        assert name in helps["--help"]["text"]
        text = helps[f"{name} --help"]["text"]
        assert f"ders-peft {name} " in text.split("examples:")[1], f"{name} --help has no example"
        assert "exit status:" in text


def test_literals_match_the_library():
    assert cli_parser.ARCHITECTURES == ARCHITECTURES
    assert cli_parser.BITS == BITS


@pytest.mark.parametrize("module", ["ders_peft_cli", "ders_peft.cli"])
def test_python_m_entry_points(module):
    proc = subprocess.run([sys.executable, "-m", module, "params"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the following arguments are required: model" in proc.stderr


def test_console_script_points_at_the_light_package():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ders-peft"]
    assert script.value == "ders_peft_cli:main"
