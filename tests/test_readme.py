"""README.md and CI stay in step: `.ci/run` runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(readme: str) -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", readme)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = _commands(readme)
    tests = [c for c in commands if "pytest" in c]
    demos = [c for c in commands if "examples/demo.py" in c]
    assert len(tests) == 1 and len(demos) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests[0].strip() in ci_lines
    assert (ROOT / "examples" / "demo.py").is_file()
