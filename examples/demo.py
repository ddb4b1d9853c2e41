"""End-to-end DeRS demo, fully offline.

1. Pretrain (or load from the cache) a small Llama on text every Python install has: the standard library's
   documentation (pydoc_data) and part of its source.
2. Upcycle it with DeRS-LM (N routed experts sharing one trainable base FFN, low-rank deltas).
3. Continue training with TRL's SFTTrainer on a held-apart domain (other stdlib packages' source).
4. Save the adapter, reload it with PeftModel.from_pretrained, check the logits are identical.
5. Print the parameter report and the held-out loss before and after.

Run: python examples/demo.py  (about 5 minutes on 2 CPU cores; --quick for a smoke run)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import ders_peft
from ders_peft import local_corpus as lc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where the adapter and the base copy are written")
    parser.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the pretrained base")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps after upcycling")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (< 1 min)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base_kw = dict(steps=300, seq_len=128, hidden_size=128, num_layers=4)
    seq_len, sft_steps, domain_chars = 128, args.steps, 1_500_000
    if args.quick:
        base_kw = dict(steps=20, seq_len=64, hidden_size=32, num_layers=2, max_chars=300_000, vocab_size=512)
        seq_len, sft_steps, domain_chars = 64, 10, 200_000

    t0 = time.perf_counter()
    base, tokenizer = lc.pretrained_base(args.cache, **base_kw)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"[1] pretrained base: {n_params:,} parameters ({time.perf_counter() - t0:.0f} s)")

    train_files, val_files, test_files = lc.split_by_file(lc.code_domain_files(), seed=0)
    train_blocks = lc.pack_tokens(tokenizer, lc.read_texts(train_files, max_chars=domain_chars), seq_len)
    test_blocks = lc.pack_tokens(tokenizer, lc.read_texts(test_files, max_chars=domain_chars // 5), seq_len)[:128]
    loss_before = lc.evaluate_loss(base, test_blocks)
    print(f"[2] new domain (held-apart stdlib packages): {len(train_blocks)} train blocks, {len(test_blocks)} test")
    print(f"    held-out loss of the dense base: {loss_before:.3f} (ppl {math.exp(loss_before):.1f})")

    # keep a copy of the dense base on disk: the adapter is loaded on top of it later
    base_dir = Path(args.out) / "dense_base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    config = ders_peft.DeRSConfig(
        num_experts=4, top_k=2, delta_type="lowrank", rank=4, delta_scale=4.0, task_type="CAUSAL_LM"
    )
    dataset = Dataset.from_dict({"input_ids": train_blocks.tolist()})
    sft_args = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"),
        max_steps=sft_steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, sft_steps // 10),
        logging_steps=max(1, sft_steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # CPU: keep fp32 (TRL would otherwise wrap the forward in bf16 autocast)
        max_length=seq_len,
        packing=False,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = SFTTrainer(
        model=base, args=sft_args, train_dataset=dataset, processing_class=tokenizer, peft_config=config
    )
    t1 = time.perf_counter()
    trainer.train()
    print(f"[3] SFTTrainer: {sft_steps} steps in {time.perf_counter() - t1:.0f} s")
    for row in trainer.state.log_history:
        if "loss" in row:
            aux = row.get("router_aux_loss", float("nan"))
            print(f"    step {row['step']:>4}  loss {row['loss']:.3f}  router_aux_loss {aux:.4f}")

    model = trainer.model.eval()
    report = ders_peft.parameter_report(model)
    print(report)

    adapter_dir = Path(args.out) / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        ids = test_blocks[:2]
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    print(f"[4] saved to {adapter_dir} and reloaded: max |logit difference| = {diff}")

    loss_after = lc.evaluate_loss(reloaded, test_blocks)
    print(
        f"[5] held-out loss: dense base {loss_before:.3f} -> DeRS-LM {loss_after:.3f} (ppl {math.exp(loss_after):.1f})"
    )
    return {"loss_before": loss_before, "loss_after": loss_after, "reload_diff": diff, "added": report.added_params}


if __name__ == "__main__":
    main()
