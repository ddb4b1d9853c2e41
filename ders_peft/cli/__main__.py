"""``python -m ders_peft.cli``: the ``ders-peft`` command line."""

import sys

from . import main

sys.exit(main())
