"""lm-evaluation-harness with DeRS adapters.

lm-eval's ``hf`` model loads a peft adapter itself (``--model_args pretrained=BASE,peft=ADAPTER``) through
``PeftModel.from_pretrained``, which knows ``PeftType.DERS`` only once ``ders_peft`` is imported. Two ways:

- Python: ``import ders_peft`` before ``lm_eval.simple_evaluate(model="hf", model_args=...)``.
- Command line: ``ders-peft lm-eval <lm-eval arguments>`` or ``python -m ders_peft.integrations.lm_eval <...>``:
  lm-eval's own command line (same arguments, same output) run after ``import ders_peft``.

An exported MoE (:func:`ders_peft.export_moe`) needs neither: it is a standard transformers checkpoint
(``pretrained=EXPORT_DIR``). ``tests/test_lm_eval.py`` checks that both give the same scores on a local task.
"""

from __future__ import annotations

import importlib.util
import sys


def cli_evaluate(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``) with DeRS registered; returns 0."""
    import ders_peft  # noqa: F401 - registers PeftType.DERS with peft

    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("lm-eval is not installed: pip install 'ders_peft[eval]' (or lm-eval==0.4.13)")
    from lm_eval.__main__ import cli_evaluate as lm_eval_cli

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        lm_eval_cli()  # lm-eval reads sys.argv
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(cli_evaluate())
