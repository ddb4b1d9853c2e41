"""Multi-process training (issue 14): DDP through ``accelerate launch`` + HF Trainer, FSDP2, FSDP's wrap policy and
DeepSpeed ZeRO-3 injection, on CPU processes over gloo (``examples/train_ddp.py``; what ran is in
docs/distributed.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ders_testing import tiny_model
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_testing import reference_router_aux, single_thread

import ders_peft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_ddp  # noqa: E402

WORLD = 2
BATCH = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}


def _launch(out: Path, *script_args: str, config: Path = EXAMPLES / "accelerate_ddp.yaml") -> None:
    """``accelerate launch --config_file examples/accelerate_ddp.yaml`` with 2 CPU processes (gloo)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(_free_port()), str(EXAMPLES / "train_ddp.py"), "--out", str(out), *script_args,
    ]  # fmt: skip
    env = {**_env(), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _initial_model():
    """``train_ddp.build_model()`` in this process (the tests check it against the launched run's initial
    parameters)."""
    return train_ddp.build_model()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _launch(out, "--cpu", "--steps", "8", "--lr", "5e-2")
    return out


def test_ddp_loss_falls_and_ranks_stay_identical(ddp_run):
    logs = [e for e in json.loads((ddp_run / "log_history.json").read_text()) if "loss" in e]
    losses = [e["loss"] for e in logs]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    init = load_file(ddp_run / "init_params.safetensors")
    ranks = [load_file(ddp_run / f"rank{r}_params.safetensors") for r in range(WORLD)]
    assert _max_diff(ranks[0], ranks[1]) == 0.0  # DDP: the same averaged gradients, the same optimizer steps
    assert _max_diff(ranks[0], init) > 1e-3  # they did train
    assert {k for k in init if "ders_" not in k} == set()  # only DeRS tensors are trainable


def _rank_batches(run: Path, call: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for r in range(WORLD):
        inputs = torch.load(run / f"rank{r}_inputs.pt")[call]
        batches.append({**inputs, "labels": inputs["input_ids"].clone()})
    return batches


def test_ddp_gradients_equal_single_process_on_the_concatenated_batch(ddp_run):
    """Step 1 gradients after DDP's all-reduce = one process's gradient of mean-over-ranks (LM loss + router losses):
    equal token counts per rank, so this is the LM loss of the concatenated batch plus the ranks' mean router loss."""
    got = load_file(ddp_run / "rank0_grads_step1.safetensors")
    batches = _rank_batches(ddp_run, 0)
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    with single_thread():
        model = _initial_model()
        assert _max_diff(train_ddp.trainable_state(model), load_file(ddp_run / "init_params.safetensors")) == 0.0
        model.eval()  # no dropout in this model; the router losses come from the hand-written reference
        total = 0.0
        for batch in batches:
            aux, _ = reference_router_aux(model, batch)
            total = total + (model(**batch).loss + aux) / WORLD
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        want = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    router = [n for n in want if "ders_router" in n]
    assert router and all(want[n].abs().max() > 0 for n in router)


def test_ddp_logged_router_losses_are_the_mean_over_ranks(ddp_run):
    first = next(e for e in json.loads((ddp_run / "log_history.json").read_text()) if "loss" in e)
    with single_thread(), torch.no_grad():
        model = _initial_model()
        cfg = model.peft_config["default"]
        per_rank_lb, per_rank_z, per_rank_lm = [], [], []
        for batch in _rank_batches(ddp_run, 0):
            total, lbs = reference_router_aux(model, batch)
            lb = torch.stack(lbs)
            per_rank_lb.append(float(lb.mean()))
            per_rank_z.append(float((total - cfg.router_aux_loss_coef * lb.sum()) / cfg.router_z_loss_coef) / len(lbs))
            model.eval()
            per_rank_lm.append(float(model(**batch).loss))
    # the ranks saw different data: a log of rank 0's values alone would fail below
    assert abs(per_rank_lb[0] - per_rank_lb[1]) > 1e-4 and abs(per_rank_z[0] - per_rank_z[1]) > 1e-4
    assert first["router_aux_loss"] == pytest.approx(sum(per_rank_lb) / WORLD, abs=2e-6)
    assert first["router_z_loss"] == pytest.approx(sum(per_rank_z) / WORLD, abs=2e-5)
    assert first["loss"] == pytest.approx(sum(per_rank_lm) / WORLD, abs=1e-3)  # Trainer's own cross-rank mean


def _layout(adapter: Path) -> tuple[set[str], dict, dict]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    return {p.name for p in adapter.iterdir()}, shapes, json.loads((adapter / "adapter_config.json").read_text())


def test_ddp_adapter_has_the_single_process_layout(ddp_run, tmp_path):
    with single_thread():
        train_ddp.main(["--out", str(tmp_path), "--steps", "1", "--cpu"])
    files, shapes, config = _layout(ddp_run / "adapter")
    want_files, want_shapes, want_config = _layout(tmp_path / "adapter")
    assert files == want_files and "adapter_model.safetensors" in files
    assert shapes == want_shapes and any("ders_router" in k for k in shapes)
    assert config == want_config
    saved = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    trained = load_file(ddp_run / "rank0_params.safetensors")
    trained = {ders_peft.DeRSModel._remove_adapter_name_from_key(n, "default"): t for n, t in trained.items()}
    assert _max_diff({k: v.float() for k, v in saved.items()}, trained) == 0.0  # the trained values, all of them


# ------------------------------------------------------------------------------------------------------------ FSDP
@pytest.mark.parametrize(
    "settings",
    [
        dict(delta_type="lowrank"),
        dict(delta_type="sparse", sparse_rate=0.5),
        dict(delta_type="full"),
        dict(delta_type="lowrank", shared_expert=True, universal_delta_type="full"),
        dict(delta_type="lowrank", shared_expert=True, shared_expert_gate=True),
        dict(delta_type="quantized", bits=2, group_size=8),
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D projections with biases (per-expert biases)
def test_fsdp_wrap_policy_gives_every_trainable_tensor_its_own_unit(family, settings):
    """peft's ``fsdp_auto_wrap_policy`` (what Trainer's FSDP1 uses for a PeftModel) wraps leaf modules with a
    trainable ``.weight``: every DeRS trainable tensor must be such a leaf's ``.weight`` (quantized deltas' scales
    included)."""
    model = get_peft_model(tiny_model(family), ders_peft.DeRSConfig(num_experts=3, top_k=2, rank=2, **settings))
    picked = set(train_ddp.wrapped_by_policy(model))
    modules = dict(model.named_modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        owner, _, attr = name.rpartition(".")
        assert owner in picked and attr == "weight", name
        assert not list(modules[owner].children()), name
    layers = {n for n, m in modules.items() if type(m).__name__ in model.get_base_model()._no_split_modules}
    assert layers and layers <= picked  # and the decoder layers, as transformer-based wrapping


@pytest.fixture(scope="module", params=["2", "1"], ids=["fsdp2", "fsdp1"])
def fsdp_run(tmp_path_factory, request) -> Path:
    out = tmp_path_factory.mktemp(f"fsdp{request.param}")
    _launch(out, "--fsdp-torch", "--fsdp-version", request.param, "--steps", "3", "--lr", "0.5")
    return out


def test_fsdp_training_equals_single_process(fsdp_run):
    """FSDP2, and FSDP1 with ``use_orig_params=True`` (decoder layers sharded, as accelerate's TRANSFORMER_BASED_WRAP
    does) over 2 gloo processes with SGD give the parameters of one process accumulating both ranks' batches
    (router-loss gradient scale 1/2 each)."""
    info = json.loads((fsdp_run / "fsdp.json").read_text())
    assert info["world_size"] == WORLD and len(info["units"]) == 2
    init = load_file(fsdp_run / "init_params.safetensors")
    full = {n: torch.Size(t.shape) for n, t in init.items()}
    assert any(torch.Size(info["local_shapes"][n]) != full[n] for n in full)  # the parameters were sharded
    ranks = [load_file(fsdp_run / f"rank{r}_params.safetensors") for r in range(WORLD)]
    assert _max_diff(ranks[0], ranks[1]) == 0.0
    with single_thread():
        model = _initial_model()
        assert _max_diff(train_ddp.trainable_state(model), init) == 0.0
        model.train()
        model.base_model.set_router_loss_scale(1.0 / WORLD)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        for step in range(3):
            for r in range(WORLD):
                (model(**train_ddp.fixed_batch(step, r, WORLD, BATCH)).loss / WORLD).backward()
            opt.step()
            opt.zero_grad()
        want = train_ddp.trainable_state(model)
    assert _max_diff(ranks[0], want) < 1e-5
    assert _max_diff(ranks[0], init) > 1e-3


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_units_inside_a_ders_layer_fail_naming_the_fix(version, tmp_path):
    """peft's per-leaf policy (what Trainer sets for a PeftModel under FSDP1) makes each DeRS tensor its own unit; the
    layer reads them unsharded only inside the whole layer's unit, so training stops with an error naming the fix."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
        str(_free_port()), str(EXAMPLES / "train_ddp.py"), "--fsdp-torch", "--fsdp-version", version, "--wrap",
        "peft", "--steps", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "computed on FSDP-sharded tensors" in proc.stderr and "fsdp_version: 2" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or an accelerator probe failing at import
        return f"deepspeed is not importable ({type(exc).__name__}: {exc})"
    return None


ZERO3_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed, torch
    from peft import get_peft_model
    import ders_peft
    sys.path.insert(0, sys.argv[2])
    from ders_testing import tiny_model, ders_layers
    from ders_peft.integrations.deepspeed import gathered, partitioned_params

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    for settings in ({"delta_type": "lowrank", "train_base": True}, {"delta_type": "full"}):
        cfg = ders_peft.DeRSConfig(num_experts=3, top_k=2, rank=2, **settings)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = tiny_model("llama", seed=3)
        assert partitioned_params(model) and model.model.layers[0].mlp.up_proj.weight.numel() == 0
        dense = tiny_model("llama", seed=4)  # the same model unpartitioned: the gathered values copied in
        with gathered(model), torch.no_grad():
            for (n, p), (dn, dp) in zip(model.named_parameters(), dense.named_parameters()):
                assert n == dn
                dp.copy_(p)
        peft_model = get_peft_model(model, cfg)
        reference = get_peft_model(dense, ders_peft.DeRSConfig(**cfg.to_dict()))
        for layer, ref in zip(ders_layers(peft_model), ders_layers(reference)):
            with gathered(layer.base_layer):
                for name in layer.layout.projs:
                    base = getattr(layer.base_layer, name).weight
                    assert torch.equal(base, getattr(ref.base_layer, name).weight)  # same dense model
                    if "ders_base" in dict(layer.named_children()) and "default" in layer.ders_base:
                        assert torch.equal(getattr(layer.ders_base["default"], name).weight, base), name
                    delta = layer.ders_delta["default"][name]
                    if settings["delta_type"] == "full":
                        assert torch.equal(delta.weight, base.unsqueeze(0).expand_as(delta.weight)), name
                assert layer._z3_leaf
            for (n, p), (rn, rp) in zip(layer.named_parameters(), ref.named_parameters()):
                if "ders_" in n:
                    assert n == rn and torch.equal(p, rp), n
        # training through the ZeRO-3 engine (it gathers each DeRS layer's parameters: leaf module) = the
        # unpartitioned model's: the losses of 2 SGD steps, then every trainable tensor
        params = [p for p in peft_model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=peft_model, config={**ds_config, "zero_allow_untested_optimizer": True},
            optimizer=torch.optim.SGD(params, lr=0.1),
        )
        reference.train()
        ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
        initial = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
        ids = torch.arange(32).view(2, 16) % 97
        for step in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            ref_opt.zero_grad()
            ref_loss = reference(input_ids=ids, labels=ids).loss
            ref_loss.backward()
            ref_opt.step()
            got, want = float(loss), float(ref_loss)
            assert abs(got - want) < 1e-5, (step, got, want)
        with gathered(peft_model):
            trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        moved = 0.0
        for n, rp in reference.named_parameters():
            if rp.requires_grad:
                assert torch.allclose(trained[n], rp, atol=1e-5), (n, (trained[n] - rp).abs().max())
                moved = max(moved, float((rp - initial[n]).abs().max()))
        assert moved > 1e-4, moved  # the steps changed the trainable tensors
        print("OK", settings["delta_type"], got, want)
    """
)


@pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
def test_zero3_injection_and_training_equal_the_unpartitioned_run():
    """Under ``deepspeed.zero.Init`` every weight is a shard; injection gathers each FFN block to read shapes and
    copy the base (train_base copy, ``full`` experts), so the DeRS tensors equal an unpartitioned injection's; two
    SGD steps through the ZeRO-3 engine give the unpartitioned model's losses and trainable tensors (the first
    block's input needs no gradient there: ``zero3_input_needs_grad``)."""
    env = {**_env(), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [sys.executable, "-c", ZERO3_SCRIPT, str(_free_port()), str(ROOT / "tests")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("OK") == 2, proc.stdout


def test_zero3_hook_makes_the_input_need_grad_only_when_partitioned():
    """The pre-hook that lets ZeRO-3 reduce a leaf DeRS layer's gradients after they exist: only partitioned
    (``ds_id``), grad-enabled forwards with an input that needs no gradient get a grad-requiring alias (same values);
    the layer's output is unchanged."""
    from ders_testing import ders_layers, tiny_model

    from ders_peft.integrations.deepspeed import deepspeed_installed, zero3_input_needs_grad

    model = get_peft_model(tiny_model("llama", seed=0), ders_peft.DeRSConfig(num_experts=3, top_k=2, rank=2))
    layer = ders_layers(model)[0]
    # registered only where DeepSpeed is installed (a hook slows every call of the layer a little)
    assert (zero3_input_needs_grad in layer._forward_pre_hooks.values()) == deepspeed_installed()
    x = torch.randn(2, 5, model.config.hidden_size)
    assert zero3_input_needs_grad(layer, (x,)) is None  # not partitioned: inputs untouched
    want = layer(x)
    for p in layer.parameters():
        p.ds_id = 0
    try:
        (alias,) = zero3_input_needs_grad(layer, (x,))
        assert alias.requires_grad and not x.requires_grad and alias.data_ptr() == x.data_ptr()
        got = layer(alias)  # same output, now differentiable w.r.t. the input alias
        assert torch.equal(got, want)
        with torch.no_grad():
            assert zero3_input_needs_grad(layer, (x,)) is None
        assert zero3_input_needs_grad(layer, (x.requires_grad_(),)) is None  # already needs grad
    finally:
        for p in layer.parameters():
            del p.ds_id


@pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
def test_zero3_two_processes_train_like_ddp(ddp_run, tmp_path):
    """``accelerate launch`` with DeepSpeed ZeRO-3 (examples/accelerate_zero3.yaml on CPU: 2 processes, every
    parameter partitioned) and HF Trainer: the same run as DDP's gives DDP's losses, identical ranks, and an adapter
    with DDP's layout and values (up to the reduction order, which AdamW amplifies on near-zero gradients)."""
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny tensors
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }))  # fmt: skip
    yaml = (EXAMPLES / "accelerate_zero3.yaml").read_text()
    yaml = yaml.replace("use_cpu: false", "use_cpu: true")
    ignored = ("zero_stage", "offload_", "gradient_", "zero3_save", "mixed_precision")  # set by the JSON file instead
    lines = [line for line in yaml.splitlines() if not line.lstrip().startswith(ignored)]
    lines.insert(lines.index("deepspeed_config:") + 1, f"  deepspeed_config_file: {ds_json}")
    (tmp_path / "zero3_cpu.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    _launch(out, "--cpu", "--steps", "8", "--lr", "5e-2", config=tmp_path / "zero3_cpu.yaml")
    logs = [json.loads((d / "log_history.json").read_text()) for d in (out, ddp_run)]
    losses = [[e["loss"] for e in log if "loss" in e] for log in logs]
    assert len(losses[0]) == 8 and max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses
    assert _max_diff(load_file(out / "rank0_params.safetensors"), load_file(out / "rank1_params.safetensors")) == 0
    got_files, got_shapes, got_config = _layout(out / "adapter")
    assert (got_files, got_shapes, got_config) == _layout(ddp_run / "adapter")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    want = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    start = load_file(ddp_run / "init_params.safetensors")
    start = {ders_peft.DeRSModel._remove_adapter_name_from_key(n, "default"): t for n, t in start.items()}
    moved = max(float((want[k] - start[k]).abs().max()) for k in start)
    assert moved > 0.1 and _max_diff(got, want) < 0.02 * moved
