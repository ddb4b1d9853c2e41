"""Multi-process DeRS training with HF ``Trainer``: DDP or FSDP, launched by ``accelerate launch`` (or torchrun).

    accelerate launch --config_file examples/accelerate_ddp.yaml examples/train_ddp.py --out runs/ddp
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_ddp.py --out runs/fsdp
    accelerate launch --config_file examples/accelerate_zero3.yaml examples/train_ddp.py --out runs/zero3

On a machine without GPUs the same command runs CPU processes over gloo (``--cpu`` here), which is what
``tests/test_distributed.py`` does with a tiny Llama built from a config (offline). On GPUs drop ``--cpu`` and set
``num_processes`` (and ``num_machines``/``machine_rank``/``main_process_ip`` for several machines) in the config.

What it writes under ``--out`` (used by the test):
- ``log_history.json`` (rank 0): the Trainer's logs (``loss``, ``router_aux_loss``, ``router_z_loss`` per step);
- ``rank{R}_params.safetensors``: every trainable parameter after training, full (FSDP, ZeRO-3: gathered), per rank;
- ``rank{R}_inputs.pt``: the inputs of every training forward of that rank;
- ``rank0_grads_step1.safetensors`` (DDP only): the DeRS gradients of the first optimizer step after DDP's
  all-reduce (``max_grad_norm=0``: unclipped);
- ``init_params.safetensors`` (rank 0): the trainable parameters before training;
- ``adapter/``: ``trainer.save_model`` (the DeRS adapter, saved by the main process).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import ders_peft
from ders_peft.integrations.deepspeed import gathered

VOCAB, SEQ_LEN, NUM_SEQUENCES = 64, 16, 32


def build_model(seed: int = 0, **ders_kwargs):
    """A tiny random Llama (2 layers, hidden 32) upcycled by DeRS (4 low-rank experts, top-2, router losses on)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg)
    settings = dict(
        num_experts=4,
        top_k=2,
        delta_type="lowrank",
        rank=4,
        router_aux_loss_coef=0.1,
        router_z_loss_coef=0.01,
        seed=seed,
    )
    settings.update(ders_kwargs)
    return get_peft_model(base, ders_peft.DeRSConfig(**settings))


class PatternDataset(Dataset):
    """Learnable token sequences: each one counts up from its own start with its own stride (mod the vocabulary)."""

    def __len__(self) -> int:
        return NUM_SEQUENCES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stride = (7 * i) % VOCAB, 1 + i % 3
        ids = (start + stride * torch.arange(SEQ_LEN)) % VOCAB
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": ids.clone()}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def unwrap_name(name: str) -> str:
    """A parameter or module name inside FSDP wrappers, as in the unwrapped PeftModel."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_fsdp_wrapped_module", "").strip(".")


def fixed_batch(step: int, rank: int, world: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s share of step ``step``'s global batch (sequences taken in order, wrapping around)."""
    data = PatternDataset()
    rows = [data[(step * world * batch_size + rank * batch_size + j) % len(data)] for j in range(batch_size)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def wrapped_by_policy(model) -> list[str]:
    """Names of the modules peft's ``fsdp_auto_wrap_policy`` puts in their own FSDP unit (besides the root)."""
    from peft.utils.other import fsdp_auto_wrap_policy

    policy = fsdp_auto_wrap_policy(model)
    return [n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)]


def decoder_layers(model) -> list[str]:
    """Names of the model's ``_no_split_modules`` (its decoder layers): accelerate's FSDP2 TRANSFORMER_BASED_WRAP."""
    classes = set(model.get_base_model()._no_split_modules)
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full (FSDP2 shards them as DTensors, ZeRO-3 partitions them: gathered), fp32 on
    CPU. Under ZeRO-3 every rank must call it (the gather is collective)."""
    out = {}
    with gathered(model):
        for n, p in model.named_parameters():
            if p.requires_grad:
                t = p.detach()
                out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu().clone()
    return out


def fsdp_loop(args) -> None:
    """FSDP with plain SGD, in torch directly: accelerate's FSDP plugin (what ``Trainer`` uses) refuses CPU
    processes, so this is how FSDP runs without GPUs (gloo). ``--fsdp-version 2`` (default): ``fully_shard``;
    ``1``: ``FullyShardedDataParallel`` with ``use_orig_params=True`` (a unit then may mix frozen and trainable
    tensors, as a decoder layer with a DeRS layer does).

    ``--wrap layers`` (default) shards each decoder layer, then the root, as accelerate's TRANSFORMER_BASED_WRAP does;
    ``--wrap peft`` gives every module peft's ``fsdp_auto_wrap_policy`` picks its own unit (each DeRS router, delta
    factor, ...; what ``Trainer`` sets for a PeftModel under FSDP1): that fails with a ``RuntimeError`` naming the
    fix, because a DeRS layer reads those tensors without calling their modules' ``forward`` (where FSDP gathers a
    unit's parameters)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    if rank == 0:
        save_file(trainable_state(model), str(args.out / "init_params.safetensors"))
    model.train()
    units = wrapped_by_policy(model) if args.wrap == "peft" else decoder_layers(model)
    modules = dict(model.named_modules())
    if args.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        unit_ids = {id(modules[n]) for n in units}
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=lambda module, recurse, **_: recurse or id(module) in unit_ids,
            device_id=torch.device("cpu"), use_orig_params=True,
        )  # fmt: skip
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for name in sorted(units, key=lambda n: -n.count(".")):  # innermost first, as FSDP's auto-wrapping does
            fully_shard(modules[name], mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        loss = model(**fixed_batch(step, rank, world, args.batch_size)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    if args.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        local = {unwrap_name(n): tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            state = {unwrap_name(n): t for n, t in trainable_state(model).items()}
    else:
        local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if p.requires_grad}
        state = full_trainable_state(model)
    save_file(state, str(args.out / f"rank{rank}_params.safetensors"))
    if rank == 0:
        info = {"units": units, "local_shapes": local, "losses": losses, "world_size": world}
        (args.out / "fsdp.json").write_text(json.dumps(info, indent=1))
    dist.destroy_process_group()


class Recorder(TrainerCallback):
    """Keeps each training forward's inputs and (once) the gradients of the first optimizer step."""

    def __init__(self, model, out: Path, rank: int, save_grads: bool) -> None:
        self.out, self.rank, self.save_grads = out, rank, save_grads
        self.inputs: list[dict[str, torch.Tensor]] = []
        model.get_base_model().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.inputs.append({k: kwargs[k].detach().cpu().clone() for k in ("input_ids", "attention_mask")})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.save_grads and self.rank == 0 and state.global_step == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
            save_file(grads, str(self.out / "rank0_grads_step1.safetensors"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo) even if GPUs are visible")
    parser.add_argument(
        "--fsdp-torch", action="store_true", help="FSDP in torch directly with SGD (no Trainer; runs on CPU, gloo)"
    )
    parser.add_argument("--wrap", choices=("layers", "peft"), default="layers", help="FSDP units of --fsdp-torch")
    parser.add_argument("--fsdp-version", type=int, choices=(1, 2), default=2, help="FSDP1 or FSDP2 (--fsdp-torch)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # one thread per process on a shared CPU; a single in-process run keeps the caller's
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fsdp_torch:
        return fsdp_loop(args)

    model = build_model()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        save_file(trainable_state(model), str(args.out / "init_params.safetensors"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    recorder = Recorder(model, args.out, rank, save_grads=not fsdp)
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=args.cpu,
        dataloader_num_workers=0,
        seed=0,
        # every DeRS parameter gets a gradient at every step (routers, stacked deltas, biases): no unused-parameter
        # search needed; DDP would raise at the next step if one were unused
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=PatternDataset(), callbacks=[recorder])
    trainer.train()

    torch.save(recorder.inputs, args.out / f"rank{rank}_inputs.pt")
    state = full_trainable_state(model)
    save_file(state, str(args.out / f"rank{rank}_params.safetensors"))
    trainer.save_model(str(args.out / "adapter"))
    if trainer.is_world_process_zero():
        (args.out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


if __name__ == "__main__":
    main()
