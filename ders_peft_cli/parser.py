"""The ``ders-peft`` argument parser: every subcommand, option and example, with no heavy import.

The choices that mirror library constants (``ARCHITECTURES``, ``BITS``) are literals here so that ``--help`` needs
no torch; ``tests/test_cli_entry.py`` checks that they equal the library's.
"""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_INTERNAL, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = """exit status:
  0    success
  2    refused input: a usage error, a bad option, a missing, corrupt or foreign file or directory (named in
       the message), a model or adapter with no exact result, a failed export check, or a file-system error
  1    unexpected internal error (a bug): rerun with --debug and report the traceback
  130  interrupted (Ctrl-C); the output directory is left as it was
Errors are one line on stderr; --debug shows the traceback."""
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "granitemoeshared")  # ders_peft.export
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)  # ders_peft.compression.config
DTYPES = ("auto", "float32", "bfloat16", "float16")

EXAMPLES = {
    "export": """examples:
  ders-peft export --base out/demo/dense_base --adapter out/demo/adapter --out out/demo/mixtral
  ders-peft export --base out/demo/dense_base --adapter out/demo/adapter --out out/qwen3 --architecture qwen3_moe""",
    "compress": """examples:
  ders-peft compress --base out/dense --moe out/trained_mixtral --method dare --drop-rate 0.9 --out out/dare90
  ders-peft compress --base out/dense --adapter out/ders_full --method quantize --bits 4 \
      --group-size 64 --out out/q4""",
    "train": """examples:
  ders-peft train --base out/demo/dense_base --data notes.jsonl --out out/run --max-steps 200 --rank 4
  ders-peft train --base out/demo/dense_base --data docs/ --out out/run --max-steps 400 --save-steps 100 --resume""",
    "eval-ppl": """examples:
  ders-peft eval-ppl out/demo/adapter --base out/demo/dense_base --data heldout.txt
  ders-peft eval-ppl out/demo/mixtral --data heldout.txt --max-length 512 --stride 256 --json""",
    "params": """examples:
  ders-peft params path/to/llama-7b --num-experts 8 --top-k 2 --delta-type lowrank --rank 4
  ders-peft params out/demo/dense_base --adapter out/demo/adapter --json""",
    "lm-eval": """examples:
  ders-peft lm-eval run --model hf --model_args pretrained=out/demo/dense_base,peft=out/demo/adapter \
      --tasks mytask --include_path my_tasks/ --device cpu
  ders-peft lm-eval run --model hf --model_args pretrained=out/demo/mixtral --tasks mytask --include_path my_tasks/""",
    "inspect": """examples:
  ders-peft inspect out/demo/adapter --base out/demo/dense_base --text notes.txt --out out/inspect
  ders-peft inspect out/demo/mixtral --out out/inspect-mixtral""",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ders_peft")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``ders-peft`` console script (see :data:`EPILOG` for the exit codes)."""
    parser = argparse.ArgumentParser(
        prog="ders-peft",
        description="DeRS Mixture-of-Experts upcycling tools (local directories only, never the Hub).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"ders-peft {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            epilog=f"{EXAMPLES[name]}\n\n{EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help=help,
            description=description,
        )

    _export(add)
    _compress(add)
    _train(add)
    _eval_ppl(add)
    _params(add)
    _inspect(add)
    _lm_eval(add)
    return parser


def _export(add) -> None:
    p = add(
        "export",
        "write a DeRS model as a standard transformers MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE / GraniteMoE)",
        "Merge a DeRS adapter into its dense base model and save the exact standard MoE equivalent; the logits of "
        "the saved checkpoint are checked against the DeRS model's.",
    )
    p.add_argument("--base", required=True, help="local directory of the dense base model")
    p.add_argument("--adapter", required=True, help="local directory of the DeRS adapter (adapter_config.json)")
    p.add_argument(
        "--out", required=True, help="output directory: new, empty or a previous export (replaced only on success)"
    )
    p.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=None,
        help="target architecture (default: the first exact one)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load and save the model in")
    p.add_argument("--no-verify", action="store_true", help="skip the logit check against the DeRS model")


def _compress(add) -> None:
    p = add(
        "compress",
        "compress a trained vanilla-upcycled MoE into a DeRS adapter with sparse or quantized deltas",
        "Split a trained MoE into its dense model's FFN (the shared base) plus per-expert deltas, compressed by DARE, "
        "magnitude pruning or k-bit quantization, and save it as a DeRS adapter over the dense model.",
    )
    p.add_argument("--base", required=True, help="local directory of the dense model the MoE was upcycled from")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="local directory of a DeRS adapter with delta_type='full' over --base")
    src.add_argument("--moe", help="local directory of a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint")
    p.add_argument(
        "--method",
        choices=("dare", "magnitude", "quantize"),
        required=True,
        help="how the deltas are compressed (D2-MoE, which needs calibration data, is the Python API's "
        "compress(method='d2moe'))",
    )
    p.add_argument("--drop-rate", type=float, default=None, help="dare/magnitude: share of entries dropped [0, 1)")
    p.add_argument("--bits", type=int, choices=BITS, default=None, help="quantize: bits per entry")
    p.add_argument("--group-size", type=int, default=None, help="quantize: entries per scale (default: per row)")
    p.add_argument("--seed", type=int, default=None, help="dare: seed of the kept entries (default 0)")
    p.add_argument(
        "--no-compress-shared", action="store_true", help="keep the universal FFN / shared expert's delta whole"
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the models in")
    p.add_argument("--out", required=True, help="output directory for the adapter: new or empty")


def add_ders_options(p: argparse.ArgumentParser) -> None:
    """The DeRS options of ``params`` and ``train`` (turned into a config by ``ders_peft.cli.options``)."""
    g = p.add_argument_group("DeRS options")
    g.add_argument("--num-experts", type=int, default=8, help="experts per upcycled block (default 8)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    g.add_argument("--delta-type", default="lowrank", help="lowrank, sparse, full or quantized (default lowrank)")
    g.add_argument("--rank", type=int, default=4, help="lowrank: rank of each delta (default 4)")
    g.add_argument("--sparse-rate", type=float, default=0.9, help="sparse: share of zero entries (default 0.9)")
    g.add_argument("--bits", type=int, default=None, help="quantized: bits per entry")
    g.add_argument("--shared-expert", action="store_true", help="add the always-on universal FFN")


def _train(add) -> None:
    p = add(
        "train",
        "upcycle a dense model with DeRS and train it with TRL's SFTTrainer; saves the adapter",
        "Train a DeRS adapter on text with TRL's SFTTrainer (CPU-safe defaults: no bf16 on CPU, no logging "
        "services). Checkpoints go to OUT/trainer, the final adapter to OUT/adapter.",
    )
    p.add_argument("--base", required=True, help="local directory of the dense model (with its tokenizer)")
    p.add_argument(
        "--data",
        required=True,
        help="a .jsonl file (a string 'text' per line), a .txt file (documents split on blank lines) or a directory "
        "of .txt files (one document each)",
    )
    p.add_argument("--out", required=True, help="output directory (adapter/ and trainer/ checkpoints)")
    add_ders_options(p)
    g = p.add_argument_group("training options (SFTConfig)")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    g.add_argument("--batch-size", type=int, default=4, help="per-device batch size (default 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--max-length", type=int, default=512, help="tokens per example, longer ones cut (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps into OUT/trainer (0: none)")
    g.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT/trainer")


def _eval_ppl(add) -> None:
    p = add(
        "eval-ppl",
        "perplexity and bits per byte of a model, a DeRS adapter or an exported MoE on a text file",
        "Tokenise the whole file with the model's tokenizer and score it in windows of --max-length tokens every "
        "--stride tokens (each token predicted once, with carried-over context).",
    )
    p.add_argument("model", help="local directory: a DeRS adapter, a dense model or an exported MoE")
    p.add_argument("--base", default=None, help="base model directory of an adapter (default: the one it names)")
    p.add_argument("--data", required=True, help="UTF-8 text file (.txt), or .jsonl with a 'text' field per line")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _params(add) -> None:
    p = add(
        "params",
        "parameter report (added / trainable / total) of a DeRS config or adapter on a local model's config",
        "Build the model from its config.json on the meta device (no weights are read, so a 7B config answers in "
        "seconds), apply the DeRS config given by --adapter or the options, and print the report.",
    )
    p.add_argument("model", help="local model directory (only its config.json is read)")
    p.add_argument("--adapter", default=None, help="DeRS adapter directory whose adapter_config.json is used")
    add_ders_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _inspect(add) -> None:
    p = add(
        "inspect",
        "diagnostics of a DeRS adapter or a transformers MoE: expert similarity, router load, delta spectra",
        "Write diagnostics.json, summary.txt and PNG plots: per layer the cosine similarity of each expert's weights "
        "to the base and to each other, the singular-value energy of the deltas and, with --text, the router's load "
        "(token share, balance, entropy) on that text.",
    )
    p.add_argument("path", help="local directory of a DeRS adapter (adapter_config.json) or of a MoE model")
    p.add_argument("--base", default=None, help="dense base model directory of an adapter (default: the one it names)")
    p.add_argument("--text", default=None, help="text file for the router load (without it: no router statistics)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --text used (default 4096)")
    p.add_argument("--out", required=True, help="output directory (files of the same names are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _lm_eval(add) -> None:
    p = add(
        "lm-eval",
        "run lm-evaluation-harness (its own arguments) with DeRS registered, so peft=ADAPTER loads a DeRS adapter",
        "lm-eval's command line, run after `import ders_peft`: every argument after `lm-eval` goes to lm-eval "
        "unchanged (lm-eval's own help: `ders-peft lm-eval run --help`). Needs lm-eval: pip install "
        "'ders_peft[eval]'.",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of lm-eval (e.g. run --model hf ...)")
