"""``ders-peft train``: upcycle a local dense model with DeRS and train it with TRL's ``SFTTrainer``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import ders_config


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
