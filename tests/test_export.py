"""Export to standard transformers MoE checkpoints: exactness (checked in a process that never imports ders_peft),
refusals, atomic writes, the model card and the ``ders-peft export`` CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from ders_testing import VOCAB, randomize_adapter, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import ders_peft
from ders_peft import cli
from ders_peft.export import VERIFY_TOLERANCE, convert_to_moe, export_moe, plan_export

NEW_TOKENS = 8


def perturb_dense(model: torch.nn.Module, std: float = 0.05, seed: int = 3) -> None:
    """Move every dense weight (norms, biases, embeddings...) off its initial value, so that a tensor the export
    failed to carry over (or carried to the wrong place) shows up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def tiny_granite(layers: int = 3, **kw):
    """Granite with non-trivial multipliers (embedding, attention, residual, logits), which the export must carry."""
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        embedding_multiplier=3.0,
        logits_scaling=2.5,
        residual_multiplier=0.4,
        attention_multiplier=0.2,
        **kw,
    )
    return transformers.GraniteForCausalLM(cfg).eval()


def ders_model(family: str, model_kw: dict | None = None, **cfg_kw):
    build = tiny_granite if family == "granite" else lambda **kw: tiny_model(family, **kw)
    model = build(layers=3, **(model_kw or {}))
    perturb_dense(model)
    cfg = ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "rank": 3, "sparse_rate": 0.5, **cfg_kw})
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    return peft_model.eval()


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )


# name -> (family, architecture, model kwargs, DeRSConfig kwargs, expected class)
EXACT_CASES = {
    "llama->mixtral": ("llama", None, {}, {"delta_type": "lowrank"}, "MixtralForCausalLM"),
    "mistral(sliding)->mixtral": (
        "mistral",
        "mixtral",
        {"sliding_window": 4},
        {"delta_type": "sparse", "top_k": 1},
        "MixtralForCausalLM",
    ),
    "llama(partial)->qwen2_moe": (
        "llama",
        "qwen2_moe",
        {},
        {"delta_type": "full", "layers_to_transform": [0, 2], "normalize_top_k": False},
        "Qwen2MoeForCausalLM",
    ),
    "llama(universal)->qwen2_moe": ("llama", None, {}, {"shared_expert": True}, "Qwen2MoeForCausalLM"),
    "qwen2(tied,universal,partial)->qwen2_moe": (
        "qwen2",
        None,
        {"tie_word_embeddings": True},
        {"delta_type": "sparse", "shared_expert": True, "layers_to_transform": [1]},
        "Qwen2MoeForCausalLM",
    ),
    "qwen3(partial)->qwen3_moe": (
        "qwen3",
        None,
        {},
        {"layers_to_transform": [0, 1], "normalize_top_k": False, "num_experts": 3},
        "Qwen3MoeForCausalLM",
    ),
    "qwen2->qwen2_moe": ("qwen2", None, {}, {"delta_type": "lowrank", "top_k": 1}, "Qwen2MoeForCausalLM"),
    "mistral(universal)->qwen2_moe": (
        "mistral",
        "qwen2_moe",
        {"sliding_window": 4},
        {"delta_type": "sparse", "shared_expert": True},
        "Qwen2MoeForCausalLM",
    ),
    "qwen3->qwen3_moe": ("qwen3", None, {}, {"delta_type": "full"}, "Qwen3MoeForCausalLM"),
    "granite->granitemoe": ("granite", None, {}, {"delta_type": "sparse"}, "GraniteMoeForCausalLM"),
    "granite(attention_bias,universal)->granitemoeshared": (
        "granite",
        None,
        {"attention_bias": True},
        {"shared_expert": True},
        "GraniteMoeSharedForCausalLM",
    ),
}

_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    dirs, ids_path, out_path, new_tokens = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
    ids = torch.load(ids_path)
    results = {}
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        results[d] = {"class": type(model).__name__, "logits": logits, "generated": gen}
    results["ders_peft imported"] = "ders_peft" in sys.modules
    torch.save(results, out_path)
    """
)


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    """Export every case, then load all of them in ONE fresh Python process that never imports ders_peft."""
    root = tmp_path_factory.mktemp("exports")
    ids = input_ids()
    expected, dirs = {}, {}
    for name, (family, arch, model_kw, cfg_kw, _cls) in EXACT_CASES.items():
        model = ders_model(family, model_kw, **cfg_kw)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        expected[name] = {"logits": logits, "generated": greedy(model, ids)}
        out = root / name.replace(">", "").replace("(", "_").replace(")", "_").replace(",", "_")
        export_moe(model, out, architecture=arch)
        dirs[name] = str(out)
    torch.save(ids, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, ",".join(dirs.values()), str(root / "ids.pt"), str(root / "out.pt")]
        + [str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(root / "out.pt")
    return expected, dirs, loaded


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_export_exact_in_fresh_process(fresh_process_results, name):
    expected, dirs, loaded = fresh_process_results
    assert loaded["ders_peft imported"] is False
    got = loaded[dirs[name]]
    assert got["class"] == EXACT_CASES[name][4]
    torch.testing.assert_close(got["logits"], expected[name]["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(got["generated"], expected[name]["generated"])
    assert got["generated"].shape[1] == 10 + NEW_TOKENS
    cfg = json.loads((Path(dirs[name]) / "config.json").read_text())
    assert cfg["architectures"] == [EXACT_CASES[name][4]]
    assert (Path(dirs[name]) / "model.safetensors").is_file()


def test_checkpoint_uses_per_expert_keys_and_dense_blocks(fresh_process_results):
    """The files hold the per-expert layout other engines read; non-upcycled blocks stay dense (mlp_only_layers)."""
    from safetensors import safe_open

    _, dirs, _ = fresh_process_results
    d = Path(dirs["llama(partial)->qwen2_moe"])
    with safe_open(d / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.gate_proj.weight" in keys  # dense block
    assert not any(k.startswith("model.layers.1.mlp.experts") for k in keys)
    assert json.loads((d / "config.json").read_text())["mlp_only_layers"] == [1]


def test_expert_weights_are_synthesised(tmp_path):
    """Expert e of the export holds W_base + Delta_e (gate/up) and 0.5 (W_base + Delta_e) (down) with a universal
    FFN, whose own synthesised weights become the shared expert."""
    model = ders_model("llama", shared_expert=True)
    moe = convert_to_moe(model, "qwen2_moe")
    layer = model.base_model.model.model.layers[1].mlp
    w = layer.expert_weights("default")
    block = moe.model.layers[1].mlp
    torch.testing.assert_close(block.experts.gate_up_proj[2, :48], w["gate_proj"][2])
    torch.testing.assert_close(block.experts.gate_up_proj[2, 48:], w["up_proj"][2])
    torch.testing.assert_close(block.experts.down_proj[2], 0.5 * w["down_proj"][2])
    torch.testing.assert_close(block.shared_expert.down_proj.weight, w["down_proj"][4])
    torch.testing.assert_close(block.gate.weight, layer.ders_router["default"].weight)
    # DeRS's fixed 0.5 average: every gate weight is 1e-20 (sigmoid = 0.5 exactly; finite in llama.cpp's silu(x)/x)
    assert torch.equal(block.shared_expert_gate.weight, torch.full_like(block.shared_expert_gate.weight, 1e-20))
    assert not torch.allclose(w["gate_proj"][0], w["gate_proj"][1])  # the deltas really differ


def test_merge_and_unload_returns_standard_moe():
    model = ders_model("qwen2", shared_expert=True)
    ids = input_ids(1)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    moe = model.merge_and_unload()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert not any("ders" in name for name, _ in moe.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,model_kw,arch",
    [
        ("mistral", {"sliding_window": 3}, "qwen2_moe"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}, "qwen2_moe"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0}, "qwen3_moe"),
    ],
)
def test_sliding_window_sources(family, model_kw, arch):
    """Sliding-window attention (per block for Qwen2: full and sliding blocks mixed) carries over exactly; the
    12-token input is longer than the window, so a dropped window would change the logits."""
    model = ders_model(family, model_kw, layers_to_transform=[0, 2])
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    moe = convert_to_moe(model, arch)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    if arch == "qwen2_moe":
        want = ["full_attention", "sliding_attention", "sliding_attention"] if family == "qwen2" else None
        assert moe.config.layer_types == (want or ["sliding_attention"] * 3)
    else:
        assert moe.config.sliding_window == 3


def test_modules_to_save_copy_is_carried_over():
    model = tiny_model("llama", layers=2)
    peft_model = get_peft_model(model, ders_peft.DeRSConfig(num_experts=3, top_k=2, modules_to_save=["lm_head"]))
    randomize_adapter(peft_model, std=0.1)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.5)
    ids = input_ids(2)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = convert_to_moe(peft_model)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


REFUSALS = [
    ("llama", "mixtral", {}, {"layers_to_transform": [0]}, "every MixtralForCausalLM block is MoE"),
    ("llama", "mixtral", {}, {"shared_expert": True}, "MixtralForCausalLM has no shared"),
    ("llama", "mixtral", {}, {"normalize_top_k": False}, "normalize_top_k=False"),
    ("qwen3", None, {}, {"shared_expert": True}, "Qwen3MoeForCausalLM has no shared"),
    ("qwen2", "mixtral", {}, {}, "allowed targets for 'qwen2'"),
    ("qwen3", "qwen2_moe", {}, {}, "allowed targets for 'qwen3'"),
    ("llama", None, {"attention_bias": True}, {}, "attention_bias=True"),
    ("llama", "qwen2_moe", {"mlp_bias": True}, {}, "mlp_bias"),
    ("gemma", None, {}, {}, "model_type='gemma'"),
    ("granite", None, {}, {"layers_to_transform": [1]}, "every GraniteMoeForCausalLM block is MoE"),
    ("granite", None, {}, {"normalize_top_k": False}, "normalize_top_k=False"),
    ("granite", "granitemoe", {}, {"shared_expert": True}, "architecture='granitemoeshared'"),
    ("llama", "granitemoe", {}, {}, "allowed targets for 'llama'"),
    ("phi", None, {}, {}, "model_type='phi'"),
    ("gpt2", None, {}, {}, "model_type='gpt2'"),
    ("gemma2", None, {}, {}, "model_type='gemma2': Gemma-2 has extra post-norms"),
    ("olmo", None, {}, {}, "model_type='olmo': OLMo uses a non-parametric LayerNorm"),
    ("olmo2", None, {}, {}, "model_type='olmo2': OLMo-2 normalises after attention/FFN"),
    ("phi3", None, {}, {}, "model_type='phi3': PhiMoE uses LayerNorm"),
    ("stablelm", None, {}, {}, "model_type='stablelm': StableLM uses LayerNorm"),
    ("gpt_neox", None, {}, {}, "model_type='gpt_neox': GPT-NeoX has parallel attention/FFN"),
    (
        "qwen3",
        None,
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        {},
        "mixes attention types",
    ),
]


def _tiny_unlisted(family: str, **kw):
    """Tiny Gemma-2 / OLMo-2 models (families ``ders_testing.FAMILIES`` does not list)."""
    cfg_cls, model_cls = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    cfg = cfg_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **({"head_dim": 8} if family == "gemma2" else {}), **kw,
    )  # fmt: skip
    return model_cls(cfg).eval()


@pytest.mark.parametrize("family,arch,model_kw,cfg_kw,message", REFUSALS)
def test_refusals_name_the_reason(family, arch, model_kw, cfg_kw, message):
    if family == "granite":
        model = tiny_granite(2, **model_kw)
    elif family in ("gemma2", "olmo2"):
        model = _tiny_unlisted(family, **model_kw)
    else:
        model = tiny_model(family, layers=2, **model_kw)
    peft_model = get_peft_model(model, ders_peft.DeRSConfig(num_experts=3, top_k=2, **cfg_kw))
    with pytest.raises(ValueError, match="No exact standard MoE target") as err:
        plan_export(peft_model, arch)
    assert message in str(err.value)
    if arch is None:  # the default target is refused too: merge_and_unload() has nothing exact to return
        with pytest.raises(ValueError, match="No exact standard MoE target"):
            peft_model.merge_and_unload()


def test_bad_architecture_name():
    model = get_peft_model(tiny_model("llama"), ders_peft.DeRSConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"architecture='olmoe' is invalid: allowed values are \('mixtral'"):
        plan_export(model, "olmoe")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_refused_export_leaves_existing_checkpoint_unchanged(tmp_path):
    out = tmp_path / "ckpt"
    export_moe(ders_model("llama"), out)
    before = _snapshot(out)
    refused = ders_model("llama", layers_to_transform=[0, 1])
    with pytest.raises(ValueError, match="Nothing was written"):
        export_moe(refused, out, architecture="mixtral")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_write_leaves_existing_checkpoint_unchanged(tmp_path, monkeypatch):
    """A crash while saving (after some files are written) neither replaces nor half-writes the checkpoint."""
    out = tmp_path / "ckpt"
    export_moe(ders_model("llama"), out)
    before = _snapshot(out)

    def crashing_save(self, save_directory, *args, **kwargs):
        Path(save_directory, "config.json").write_text("{}")
        raise OSError("disk full")

    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        export_moe(ders_model("llama", seed=5), out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_out_dir_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out_dir=.*is invalid: it is not empty"):
        export_moe(ders_model("llama"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_only_a_previous_export_is_ever_replaced(tmp_path):
    """Exporting into the dense base model's own folder is refused before anything is written; a previous export is
    replaced, and only the files its manifest lists: the user's other files stay."""
    dense = tiny_model("llama", layers=2)
    dense.save_pretrained(tmp_path / "base")
    base_before = _snapshot(tmp_path / "base")
    model = get_peft_model(dense, ders_peft.DeRSConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="no previous ders_peft export"):
        export_moe(model, tmp_path / "base")
    assert _snapshot(tmp_path / "base") == base_before

    out = export_moe(model, tmp_path / "moe")
    export_moe(model, out)  # a previous export is replaced
    (out / "eval_results.txt").write_text("mine")
    export_moe(model, out)
    assert (out / "eval_results.txt").read_text() == "mine"


def test_model_card(tmp_path):
    model = ders_model("llama", delta_type="sparse", layers_to_transform=[0, 2], num_experts=5, top_k=3)
    out = export_moe(model, tmp_path / "card", base_model="my-org/tiny-llama")
    card = (out / "README.md").read_text()
    for fragment in (
        "base_model: my-org/tiny-llama",
        "DeRS",
        "| delta type | sparse |",
        "| num_experts (N) | 5 |",
        "| top_k | 3 |",
        "| upcycled blocks | [0, 2] |",
        "| dense blocks | [1] |",
        "Qwen2MoeForCausalLM",
    ):
        assert fragment in card, fragment


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ders-peft")
    cmd = [exe] if exe else [sys.executable, "-m", "ders_peft.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def test_cli_export(tmp_path, capsys):
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    dense = tiny_model("llama", layers=2)
    perturb_dense(dense)
    dense.save_pretrained(base_dir)
    _tiny_tokenizer().save_pretrained(base_dir)
    peft_model = get_peft_model(dense, ders_peft.DeRSConfig(num_experts=3, top_k=2, delta_type="sparse"))
    randomize_adapter(peft_model, std=0.1)
    peft_model.save_pretrained(adapter_dir)

    proc = _cli("export", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MixtralForCausalLM" in proc.stdout
    printed = re.search(r"max \|logit difference\| vs the DeRS model (\S+)\)", proc.stdout)
    assert printed is not None and float(printed.group(1)) <= VERIFY_TOLERANCE, proc.stdout
    assert (out_dir / "tokenizer.json").is_file()
    assert "| num_experts (N) | 3 |" in (out_dir / "README.md").read_text()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = input_ids(3)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    before = _snapshot(out_dir)
    args = ["export", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir)]
    assert cli.main([*args, "--architecture", "qwen3_moe"]) == 2  # in-process: same entry point, no startup cost
    assert "allowed targets for 'llama'" in capsys.readouterr().err
    assert _snapshot(out_dir) == before


def test_cli_rejects_missing_dirs(tmp_path, capsys):
    assert cli.main(["export", "--base", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--base=" in err and "config.json" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_in_half_precision(tmp_path, dtype):
    """A bf16/fp16 DeRS model exports in its own dtype (the experts are synthesised in fp32, then cast): the saved
    weights have that dtype and equal the fp32 model's export to half precision."""
    peft_model = ders_model("llama", delta_type="sparse")
    want = convert_to_moe(peft_model)
    half = peft_model.to(dtype)
    out = export_moe(half, tmp_path / "out")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert {p.dtype for p in moe.parameters()} == {dtype}
    assert "| dtype | " + str(dtype).replace("torch.", "") + " |" in (out / "README.md").read_text()
    sd_want = want.state_dict()
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10  # the half model's own rounding of base and deltas
    for name, tensor in moe.state_dict().items():
        scale = float(sd_want[name].abs().max()) if tensor.is_floating_point() else 0.0
        torch.testing.assert_close(tensor.float(), sd_want[name].float(), atol=2 * tol * scale, rtol=0)


def test_failed_export_check_writes_nothing_and_no_verify_skips_it(tmp_path, monkeypatch):
    """``export_moe`` raises "export check failed" (and writes nothing) when the logits differ by more than the
    tolerance; ``verify=False`` skips the check."""
    from ders_peft.export import writing as export_module

    peft_model = ders_model("llama")
    monkeypatch.setattr(export_module, "VERIFY_TOLERANCE", -1.0)  # any difference, even 0, is too large
    with pytest.raises(export_module.ExportCheckError, match="export check failed: logits differ"):
        export_moe(peft_model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    out = export_moe(peft_model, tmp_path / "out", verify=False)
    assert (out / "config.json").is_file()


def test_cli_export_dtype_and_no_verify(tmp_path, monkeypatch, capsys):
    """``ders-peft export --dtype bfloat16 --no-verify``: a bf16 checkpoint, written without the logit check (which
    the patched tolerance would fail: the CLI runs in this process to see the patch)."""
    from ders_peft.export import writing as export_module

    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    dense = tiny_model("llama", layers=2)
    dense.save_pretrained(base_dir)
    peft_model = get_peft_model(dense, ders_peft.DeRSConfig(num_experts=3, top_k=2))
    randomize_adapter(peft_model, std=0.1)
    peft_model.save_pretrained(adapter_dir)
    monkeypatch.setattr(export_module, "VERIFY_TOLERANCE", -1.0)
    monkeypatch.setattr(export_module, "_verify", lambda *a: pytest.fail("--no-verify ran the check"))
    args = ["export", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir)]
    assert cli.main([*args, "--dtype", "bfloat16", "--no-verify"]) in (0, None)
    assert "logit check skipped (--no-verify)" in capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto")
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
