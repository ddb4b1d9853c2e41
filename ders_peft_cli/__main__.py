"""``python -m ders_peft_cli``: the ``ders-peft`` command line."""

import sys

from . import main

sys.exit(main())
