"""README.md stays true: `.ci/run` runs exactly the README's test command, and the quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(readme: str) -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", readme)


def _quickstart(readme: str) -> str:
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert len(blocks) == 1, f"the Quickstart section must hold exactly one python block, found {len(blocks)}"
    return blocks[0]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = _commands(readme)
    tests = [c for c in commands if "pytest" in c]
    demos = [c for c in commands if "examples/demo.py" in c]
    assert len(tests) == 1 and len(demos) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests[0].strip() in ci_lines
    assert (ROOT / "examples" / "demo.py").is_file()


def test_readme_says_what_the_demo_costs_and_writes():
    setup = (ROOT / "README.md").read_text().split("## Quickstart")[0]
    assert "minute" in setup and "out/demo/" in setup and "~/.cache/ders_peft/base/" in setup
    assert "docs/cli.md" in (ROOT / "README.md").read_text()


def test_quickstart_runs_as_written(tmp_path):
    code = _quickstart((ROOT / "README.md").read_text())
    for step in ("get_peft_model(", "SFTTrainer(", "peft_config=config", "use_cpu=True", "bf16=False",
                 "save_pretrained(", "PeftModel.from_pretrained(", "export_moe("):
        assert step in code, f"the quickstart no longer shows {step}"
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reloaded adapter gives the same logits: True" in proc.stdout, proc.stdout[-2000:]
    assert "exported: ['MixtralForCausalLM']" in proc.stdout
    assert "added parameters:" in proc.stdout  # the parameter report
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "mixtral" / "config.json").is_file()
