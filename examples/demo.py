"""End-to-end DeRS demo, fully offline: pretrain -> upcycle -> SFTTrainer -> save/reload -> export.

1. Pretrain a small Llama (1.25M parameters) on text every Python install has: the standard library's documentation
   (pydoc_data) and part of its source. About 30-60 s on 2 CPU cores, cached afterwards (``--cache``).
2. Upcycle it with DeRS-LM (4 routed experts sharing one trainable base FFN, rank-4 deltas).
3. Train it with TRL's SFTTrainer on a held-apart domain (the source of other stdlib packages).
4. Save the adapter, reload it with PeftModel.from_pretrained, check the logits are identical.
5. Export a standard MixtralForCausalLM checkpoint and reload it with transformers alone.
6. Print the parameter report and the held-out loss before and after.

Run: python examples/demo.py  (1-2 minutes on 2 CPU cores the first time, under a minute once the base is cached;
--quick for a smoke run). Writes ``out/demo/`` (dense base copy, adapter, Mixtral export) and the pretrained base
under ``~/.cache/ders_peft/base/``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

# Settings of the pretrained base (a cache entry of its own; the benchmarks use local_corpus' larger defaults).
BASE = dict(steps=300, seq_len=128, hidden_size=128, num_layers=4, batch_size=16, max_chars=1_500_000)
QUICK_BASE = dict(steps=20, seq_len=64, hidden_size=32, num_layers=2, max_chars=300_000, vocab_size=512)


def _say(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where the base copy, adapter and export are written")
    parser.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the pretrained base")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps after upcycling")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (< 1 min)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    t0 = time.perf_counter()
    out = Path(args.out)
    print(
        f"DeRS demo: 6 steps, 1-2 min on 2 CPU cores (under 1 min once the base is cached).\n"
        f"Writes {out}/ (dense_base, adapter, mixtral) and caches the pretrained base in {args.cache}.",
        flush=True,
    )
    _say(t0, "loading torch, transformers, peft, trl ...")
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    import ders_peft
    from ders_peft import local_corpus as lc

    torch.manual_seed(0)
    base_kw, seq_len, sft_steps, batch, domain_chars = BASE, 128, args.steps, 8, 600_000
    if args.quick:
        base_kw, seq_len, sft_steps, domain_chars = QUICK_BASE, 64, min(args.steps, 10), 200_000

    _say(t0, f"[1/6] pretrained base: loading it from the cache, or pretraining {base_kw['steps']} steps")
    base, tokenizer = lc.pretrained_base(args.cache, log_every=max(1, base_kw["steps"] // 10), **base_kw)
    n_params = sum(p.numel() for p in base.parameters())
    _say(t0, f"      {n_params:,} parameters, stored in {base.name_or_path}")

    train_files, _, test_files = lc.split_by_file(lc.code_domain_files(), seed=0)
    train_blocks = lc.pack_tokens(tokenizer, lc.read_texts(train_files, max_chars=domain_chars), seq_len)
    test_blocks = lc.pack_tokens(tokenizer, lc.read_texts(test_files, max_chars=domain_chars // 4), seq_len)[:64]
    loss_before = lc.evaluate_loss(base, test_blocks)
    _say(t0, f"[2/6] new domain (held-apart stdlib code): {len(train_blocks)} train blocks, {len(test_blocks)} test")
    _say(t0, f"      held-out loss of the dense base: {loss_before:.3f} (ppl {math.exp(loss_before):.1f})")

    base_dir = out / "dense_base"  # the adapter is loaded on top of this copy later
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    config = ders_peft.DeRSConfig(
        num_experts=4, top_k=2, delta_type="lowrank", rank=4, delta_scale=4.0, task_type="CAUSAL_LM"
    )
    sft_args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=sft_steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, sft_steps // 10),
        logging_steps=max(1, sft_steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # CPU: keep fp32 (TRL would otherwise wrap the forward in bf16 autocast)
        max_length=seq_len,
        packing=False,
        gradient_checkpointing=False,
        seed=0,
    )
    _say(t0, f"[3/6] upcycling with DeRS-LM and training {sft_steps} steps with SFTTrainer (the bar shows the ETA)")
    trainer = SFTTrainer(
        model=base,
        args=sft_args,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks.tolist()}),
        processing_class=tokenizer,
        peft_config=config,
    )
    t1 = time.perf_counter()
    trainer.train()
    _say(t0, f"      {sft_steps} steps in {time.perf_counter() - t1:.0f} s")
    for row in trainer.state.log_history:
        if "loss" in row:
            aux = row.get("router_aux_loss", float("nan"))
            print(f"      step {row['step']:>4}  loss {row['loss']:.3f}  router_aux_loss {aux:.4f}")

    model = trainer.model.eval()
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        ids = test_blocks[:2]
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    _say(t0, f"[4/6] saved to {adapter_dir} and reloaded: max |logit difference| = {diff}")

    export_dir = ders_peft.export_moe(reloaded, out / "mixtral", tokenizer=tokenizer)
    moe = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        export_diff = (moe(ids).logits - reloaded(ids).logits).abs().max().item()
    _say(t0, f"[5/6] exported {type(moe).__name__} to {export_dir}: max |logit difference| = {export_diff:.1e}")

    report = ders_peft.parameter_report(model)
    loss_after = lc.evaluate_loss(reloaded, test_blocks)
    _say(t0, "[6/6] parameter report and held-out loss")
    print(report)
    print(
        f"held-out loss: dense base {loss_before:.3f} (ppl {math.exp(loss_before):.1f}) -> "
        f"DeRS-LM {loss_after:.3f} (ppl {math.exp(loss_after):.1f}); total {time.perf_counter() - t0:.0f} s"
    )
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "reload_diff": diff,
        "export_diff": export_diff,
        "added": report.added_params,
        "export_class": type(moe).__name__,
    }


if __name__ == "__main__":
    main()
