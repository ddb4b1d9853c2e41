"""``ders-peft train``: upcycle a local dense model with DeRS and train it with TRL's ``SFTTrainer``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_ders_options, ders_config

EXAMPLE = """examples:
  ders-peft train --base out/demo/dense_base --data notes.jsonl --out out/run --max-steps 200 --rank 4
  ders-peft train --base out/demo/dense_base --data docs/ --out out/run --max-steps 400 --save-steps 100 --resume"""


def add_parser(sub, common, epilog: str) -> None:
    """Register the ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        parents=[common],
        epilog=f"{EXAMPLE}\n\n{epilog}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="upcycle a dense model with DeRS and train it with TRL's SFTTrainer; saves the adapter",
        description="Train a DeRS adapter on text with TRL's SFTTrainer (CPU-safe defaults: no bf16 on CPU, no "
        "logging services). Checkpoints go to OUT/trainer, the final adapter to OUT/adapter.",
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


def read_documents(path: str) -> list[str]:
    """Training documents of ``--data`` (see the option's help); ``ValueError`` naming the file otherwise."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise ValueError(f"--data={path!r} is invalid: the directory holds no .txt files")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif p.suffix == ".jsonl":
        from .eval_ppl import read_jsonl_texts

        docs = read_jsonl_texts(path)
    elif p.is_file():
        docs = p.read_text(encoding="utf-8", errors="replace").split("\n\n")
    else:
        raise ValueError(f"--data={path!r} is invalid: it is neither a file nor a directory")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"--data={path!r} is invalid: it holds no non-empty document")
    return docs


def _check(args: argparse.Namespace) -> None:
    for flag in ("max_steps", "batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid: must be at least 1")
    if args.save_steps < 0 or not args.lr > 0:
        raise ValueError(f"--save-steps={args.save_steps} / --lr={args.lr} are invalid: need >= 0 and > 0")


def run(args: argparse.Namespace) -> int:
    """Train, save the adapter atomically into OUT/adapter and print where it went."""
    _check(args)
    from . import _check_model_dir, _load_tokenizer

    base = Path(args.base)
    _check_model_dir("base", base)
    docs = read_documents(args.data)
    config = ders_config(args)
    out = Path(args.out)
    trainer_dir = out / "trainer"
    if args.resume and not list(trainer_dir.glob("checkpoint-*")):
        raise ValueError(f"--resume: {str(trainer_dir)!r} holds no checkpoint-* directory to resume from")
    tokenizer = _load_tokenizer(base)
    if tokenizer is None:
        raise ValueError(f"--base={args.base!r} is invalid: it has no tokenizer files")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from ..atomic import write_dir

    on_cpu = not torch.cuda.is_available()
    sft = SFTConfig(
        output_dir=str(trainer_dir),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=on_cpu,
        bf16=not on_cpu and torch.cuda.is_bf16_supported(),
        disable_tqdm=False,
    )
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    trainer = SFTTrainer(
        model=model,
        peft_config=config,
        args=sft,
        train_dataset=Dataset.from_dict({"text": docs}),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    adapter = out / "adapter"
    write_dir(adapter, trainer.model.save_pretrained, what="--out")
    tokenizer.save_pretrained(str(adapter))
    print(
        f"trained {trainer.state.global_step} steps on {len(docs):,} documents (final train loss "
        f"{result.training_loss:.4f}); adapter saved to {adapter}"
    )
    return 0
