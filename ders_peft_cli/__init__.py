"""``ders-peft`` console script: a light entry package.

``import ders_peft`` registers the method with peft and so imports torch, transformers and peft (seconds). This
package imports none of them: it builds the argument parser (:mod:`ders_peft_cli.parser`), so ``--help`` and
``--version`` answer at once, and imports the library only to run a subcommand (:mod:`ders_peft.cli`).
"""

from __future__ import annotations

import sys

from .parser import EPILOG, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, build_parser

__all__ = ["EPILOG", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REFUSED", "build_parser", "main"]


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.replace("\n  ", "; ").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ders-peft`` console script; returns the exit code (see ``EPILOG``)."""
    args = build_parser().parse_args(argv)
    from ders_peft.cli import COMMANDS

    run = COMMANDS[args.command]
    if args.debug:
        return run(args)
    from ders_peft.export import ExportCheckError

    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"ders-peft {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, ExportCheckError) as err:
        print(f"ders-peft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        print(
            f"ders-peft {args.command}: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
