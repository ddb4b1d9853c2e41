"""``python -m ders_peft.cli``: the ``ders-peft`` command line (same as ``python -m ders_peft_cli``)."""

import sys

from ders_peft_cli import main

sys.exit(main())
