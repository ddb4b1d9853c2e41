"""Reliability (issue 11): every bad input gets an error naming the field or file and what is allowed, nothing is
silently dropped or wrong, and no file ders_peft writes is ever lost or half-written (fault injection)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import transformers
from ders_testing import VOCAB, ders_layers, randomize_adapter, tiny_model
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import ders_peft
from ders_peft import DeRSConfig, atomic, cli
from ders_peft.export import ExportCheckError, export_moe
from ders_peft.registration import AdapterFileError

IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tiny(cfg_name: str, model_name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    return getattr(transformers, model_name)(getattr(transformers, cfg_name)(**{**base, **kw})).eval()


def _ders(family="llama", layers=2, **cfg):
    return get_peft_model(tiny_model(family, layers=layers), DeRSConfig(**{"num_experts": 2, "top_k": 1, **cfg}))


# ------------------------------------------------------------------------------------------------------------ config
CONFIG_CASES = [
    ({"num_experts": 0}, "num_experts", "integer >= 1"),
    ({"num_experts": 4, "top_k": 5}, "top_k", "[1, num_experts=4]"),
    ({"delta_type": "dense"}, "delta_type", "('lowrank', 'sparse', 'full', 'quantized')"),
    ({"rank": 0}, "rank", "integer >= 1"),
    ({"sparse_rate": 1.0}, "sparse_rate", "[0, 1)"),
    ({"bits": 9}, "bits", "(1, 2, 3, 4, 5, 6, 7, 8, 16)"),
    ({"group_size": 0}, "group_size", "integer >= 1"),
    ({"router_init_std": 0.0}, "router_init_std", "finite number > 0"),
    ({"universal_delta_type": "sparse"}, "universal_delta_type", "(None, 'full')"),
    ({"shared_expert_gate": True}, "shared_expert_gate", "needs shared_expert=True"),
    ({"source_architecture": {"model_type": "llama"}}, "source_architecture", "keys model_type (str), num_blocks"),
    ({"source_architecture": "llama"}, "source_architecture", "modules (list of module names)"),
    ({"allow_other_model_type": "yes"}, "allow_other_model_type", "True or False"),
    ({"compression": "dare"}, "compression", "None or a dict"),
    ({"layers_pattern": "layers"}, "layers_pattern", "only used together with layers_to_transform"),
    ({"task_type": "CHAT"}, "task_type", "'CAUSAL_LM'"),
]


@pytest.mark.parametrize("kwargs,field,allowed", CONFIG_CASES, ids=[c[1] + str(i) for i, c in enumerate(CONFIG_CASES)])
def test_config_refusals_name_the_field_and_the_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError, match=rf"DeRSConfig\.{field}=") as info:
        DeRSConfig(**kwargs)
    assert allowed in str(info.value)


COMPRESSION_CASES = [
    ({"method": "prune"}, "method", "('dare', 'magnitude', 'quantize', 'd2moe')"),
    ({"drop_rate": 1.0}, "drop_rate", "[0, 1)"),
    ({"method": "quantize", "bits": 0}, "bits", "(1, 2, 3, 4, 5, 6, 7, 8, 16)"),
    ({"group_size": -4}, "group_size", "integer >= 1"),
]


@pytest.mark.parametrize("kwargs,field,allowed", COMPRESSION_CASES, ids=[c[1] for c in COMPRESSION_CASES])
def test_compression_config_refusals(kwargs, field, allowed):
    with pytest.raises(ValueError, match=rf"CompressionConfig\.{field}=") as info:
        ders_peft.CompressionConfig(**kwargs)
    assert allowed in str(info.value)


def test_compress_refuses_what_it_cannot_read():
    with pytest.raises(TypeError, match="config must be a CompressionConfig, got str"):
        ders_peft.compress(tiny_model("llama"), "dare")
    with pytest.raises(ValueError, match=r"neither a DeRS model nor a supported transformers MoE.*'mixtral'"):
        ders_peft.compress(tiny_model("llama"), ders_peft.CompressionConfig(method="dare", drop_rate=0.5))
    with pytest.raises(ValueError, match=r"delta_type='lowrank'; compression starts from vanilla experts"):
        ders_peft.compress(_ders(), ders_peft.CompressionConfig(method="dare", drop_rate=0.5))


# --------------------------------------------------------------------------------------------------------- targeting
def _opt():
    return _tiny("OPTConfig", "OPTForCausalLM", ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32)


class _ResidualMLP(nn.Module):
    """Named like a SwiGLU block, but adds its input: not an FFN (caught by running it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            inner.gate_proj, inner.up_proj, inner.down_proj, inner.act_fn
        )

    def forward(self, x):
        return x + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ScaledMLP(_ResidualMLP):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.scale = nn.Parameter(torch.ones(1))


def _with_block(cls):
    model = tiny_model("llama")
    model.model.layers[0].mlp = cls(model.model.layers[0].mlp)
    return model


def _lora_on_gate():
    return get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["gate_proj"])).base_model.model


TARGET_CASES = [
    ("opt-decoder-layer", _opt, {"target_modules": r"model\.decoder\.layers\.\d+"}, ["not an FFN block", "self_attn"]),
    ("block-and-proj", tiny_model, {"target_modules": ["mlp", "gate_proj"]}, ["matches both", "e.g. target_modules"]),
    ("lora-regex", tiny_model, {"target_modules": r".*mlp.*"}, ["matches both the block", "target_modules=['mlp']"]),
    ("layers-pattern", tiny_model, {"layers_to_transform": [0], "layers_pattern": "blocks"}, ["'blocks'", "'layers'"]),
    ("no-match", tiny_model, {"target_modules": ["ffn"]}, ["target_modules=['ffn']", "named ['mlp']"]),
    ("lora-inside", _lora_on_gate, {}, ["'gate_proj' already carries another PEFT", "merge_and_unload()"]),
    ("modules-to-save", tiny_model, {"modules_to_save": ["nonexistent"]}, ["modules_to_save", "'lm_head'"]),
    ("residual-block", lambda: _with_block(_ResidualMLP), {}, ["its forward is not swiglu's", "supported layouts"]),
    ("own-tensor", lambda: _with_block(_ScaledMLP), {}, ["scale (its own tensor)", "supported layouts"]),
    ("rank", tiny_model, {"rank": 33}, ["DeRSConfig.rank=33", "at most 32"]),
    ("moe-block", lambda: _tiny("MixtralConfig", "MixtralForCausalLM", intermediate_size=48, num_local_experts=2,
                                num_key_value_heads=2), {"target_modules": ["mlp"]}, ["not an FFN block", "swiglu"]),
]


@pytest.mark.parametrize("build,kwargs,fragments", [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES])
def test_targeting_refusals_before_any_layer_is_built(build, kwargs, fragments):
    model = build()
    with pytest.raises(ValueError) as info:
        get_peft_model(model, DeRSConfig(**{"num_experts": 2, "top_k": 1, **kwargs}))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    if "rank" not in kwargs:
        assert not ders_layers(model)  # refused before the first layer was built


@pytest.mark.parametrize("field,value,fragment", [("top_k", 5, "[1, num_experts=2]"), ("num_experts", 3, "built "
                         "with num_experts=2"), ("delta_scale", 2.0, "built with delta_scale=1.0")])
def test_settings_edited_after_injection_are_refused_at_the_next_forward(field, value, fragment):
    model = _ders()
    setattr(model.peft_config["default"], field, value)
    with pytest.raises(ValueError, match=rf"DeRSConfig\.{field}={value}") as info:
        model(input_ids=IDS)
    assert fragment in str(info.value)
    setattr(model.peft_config["default"], field, {"top_k": 2, "num_experts": 2, "delta_scale": 1.0}[field])
    assert model(input_ids=IDS).logits.shape == (2, 6, VOCAB)  # back to what it was built with (top_k: in range)


@pytest.mark.parametrize("train", [False, True])
def test_zero_tokens_give_the_dense_blocks_empty_output(train):
    layer = ders_layers(_ders().train(train))[0]
    for shape in ((0, 32), (2, 0, 32)):
        x = torch.zeros(shape)
        assert layer(x).shape == layer.base_layer(x).shape == shape


def _train_step(model) -> float:
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return float(out.loss)


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
def test_falcon_in_place_residual_trains(delta_type):
    """Falcon's decoder adds the attention output into the MLP output in place."""
    dense = _tiny("FalconConfig", "FalconForCausalLM")
    with torch.no_grad():
        want = dense(IDS).logits
    cfg = DeRSConfig(num_experts=2, top_k=1, delta_type=delta_type, sparse_rate=0.5, target_modules=["mlp"])
    model = get_peft_model(dense, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-5, rtol=0)
    assert torch.isfinite(torch.tensor(_train_step(model)))
    router = [p for n, p in model.named_parameters() if "ders_router" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)


def test_starcoder2_mlp_with_a_dropout_probability_is_supported():
    dense = _tiny("Starcoder2Config", "Starcoder2ForCausalLM", intermediate_size=48, num_key_value_heads=2,
                  max_position_embeddings=64, residual_dropout=0.1)
    with torch.no_grad():
        want = dense(IDS).logits
    model = get_peft_model(dense, DeRSConfig(num_experts=2, top_k=1, target_modules=["mlp"]))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, want, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    assert torch.isfinite(torch.tensor(_train_step(model)))


# ----------------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = _ders(layers=4, delta_type="sparse", sparse_rate=0.5)
    randomize_adapter(model)
    model.save_pretrained(root / "a4")
    return root


def _variant(saved: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "adapter"
    shutil.copytree(saved / "a4", out)
    edit(out)
    return out


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "<drop>"}))

    return edit


def _write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _truncate(d: Path) -> None:
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[:-7])


def _bad_index(d: Path) -> None:
    state = load_file(d / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("up_proj.indices"))
    state[key][1, 0] = 48 * 32
    save_file(state, d / "adapter_model.safetensors")


LOAD_CASES = [
    ("no-peft-type", _edit_config(peft_type="<drop>"), AdapterFileError, ["adapter_config.json' has no 'peft_type'",
                                                                          "'DERS'", "'LORA'"]),
    ("unknown-peft-type", _edit_config(peft_type="NOPE"), AdapterFileError, ["peft_type='NOPE'", "'DERS'"]),
    ("invalid-json", _write("adapter_config.json", b"{oops"), AdapterFileError, ["adapter_config.json' is not valid"]),
    ("json-list", _write("adapter_config.json", b"[1, 2]"), AdapterFileError, ["adapter_config.json' holds a JSON "
                                                                               "list, not an object"]),
    ("truncated", _truncate, AdapterFileError, ["adapter_model.safetensors' is corrupt or truncated", "need"]),
    ("random-bytes", _write("adapter_model.safetensors", os.urandom(512)), AdapterFileError, ["corrupt or truncated"]),
    ("empty-weights", _write("adapter_model.safetensors", b""), AdapterFileError, ["fewer than a safetensors header"]),
    ("missing-weights", lambda d: (d / "adapter_model.safetensors").unlink(), AdapterFileError,
     ["adapter_model.safetensors' is missing", "nothing is fetched from the Hub"]),
    ("missing-config", lambda d: (d / "adapter_config.json").unlink(), AdapterFileError, ["no adapter_config.json"]),
    ("index-out-of-range", _bad_index, ValueError, ["up_proj.indices has an index out of range", "[0, 1535]"]),
    ("fewer-blocks-edited", _edit_config(layers_to_transform=[0, 1], target_modules=["mlp"]), ValueError,
     ["upcycled modules: 4 in the adapter, 2 selected here", "'model.layers.2.mlp'"]),
    ("fewer-blocks-legacy", _edit_config(layers_to_transform=[0, 1], target_modules=["mlp"], source_architecture=None),
     ValueError, ["20 for layers the model does not have", "no such DeRS layer in the model: base_model.model.model."
                  "layers.2.mlp"]),
    ("num-experts-edited", _edit_config(num_experts=3, source_architecture=None), ValueError,
     ["does not fit this model", "num_experts=3"]),
]


@pytest.mark.parametrize("edit,error,fragments", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_loading_refusals_name_the_file_or_field(saved, tmp_path, edit, error, fragments):
    adapter = _variant(saved, tmp_path, edit)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(tiny_model("llama", layers=4), adapter)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("case", ["missing-weights", "truncated", "no-peft-type"])
def test_transformers_load_adapter_gets_the_same_checks(saved, tmp_path, case):
    edit, error, fragments = next(c[1:] for c in LOAD_CASES if c[0] == case)
    with pytest.raises(error, match=fragments[0].replace("(", r"\(")):
        tiny_model("llama", layers=4).load_adapter(str(_variant(saved, tmp_path, edit)))


@pytest.mark.parametrize("family,layers,fragment", [
    ("llama", 2, "num_blocks: adapter 4, this model 2"),
    ("qwen2", 4, "model_type: adapter 'llama', this model 'qwen2'"),
])
@pytest.mark.parametrize("loader", ["peft", "transformers"])
def test_an_adapter_is_refused_on_another_model(saved, family, layers, fragment, loader):
    base = tiny_model(family, layers=layers)
    with pytest.raises(ValueError, match="made on another model") as info:
        if loader == "peft":
            PeftModel.from_pretrained(base, saved / "a4")
        else:
            base.load_adapter(str(saved / "a4"))
    assert fragment in str(info.value)
    assert ("allow_other_model_type=True" in str(info.value)) == (family != "llama")
    assert not ders_layers(base)


def test_the_record_is_saved_and_another_model_type_can_be_allowed(saved):
    raw = json.loads((saved / "a4" / "adapter_config.json").read_text())["source_architecture"]
    assert raw == {
        "model_type": "llama",
        "num_blocks": 4,
        "modules": [f"model.layers.{i}.mlp" for i in range(4)],
        "ffn_shapes": {"gate_proj": [48, 32], "up_proj": [48, 32], "down_proj": [32, 48]},
    }
    config = PeftConfig.from_pretrained(saved / "a4")
    config.allow_other_model_type = True
    model = PeftModel.from_pretrained(tiny_model("qwen2", layers=4), saved / "a4", config=config)
    state = load_file(saved / "a4" / "adapter_model.safetensors")
    loaded = peft.get_peft_model_state_dict(model)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.peft_config["default"].source_architecture == raw  # the record still says what it was made on


def test_a_config_object_reused_for_another_model_is_refused():
    config = DeRSConfig(num_experts=2, top_k=1)
    get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ValueError, match=r"num_blocks: adapter 2, this model 3.*use a new one per model"):
        get_peft_model(tiny_model("llama", layers=3), config)
    get_peft_model(tiny_model("llama", layers=3), DeRSConfig(num_experts=2, top_k=1))


def test_other_peft_methods_still_load(tmp_path):
    model = get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        want = model(IDS).logits
        got = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora")(IDS).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("out,fragment", [(".", "out_dir='.'"), ("/", "out_dir='/'"), ("", "out_dir=''"),
                                          ("..", "out_dir='..'")])
def test_export_refuses_a_destination_it_cannot_swap_before_any_work(tmp_path, monkeypatch, out, fragment):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is invalid") as info:
        export_moe(_ders(), out)
    assert fragment in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_file_and_a_corrupt_manifest(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir='.*file' is invalid: it exists and is not a directory"):
        export_moe(_ders(), tmp_path / "file")
    out = export_moe(_ders(), tmp_path / "moe")
    (out / atomic.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{atomic.MANIFEST}' is corrupt"):
        export_moe(_ders(), out)
    with pytest.raises(ValueError, match=r"architecture='switch' is invalid: allowed values are \('mixtral'"):
        export_moe(_ders(), tmp_path / "new", architecture="switch")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["router", "delta"])
def test_verify_fails_on_non_finite_weights_and_keeps_the_previous_export(tmp_path, where):
    out = export_moe(_ders(), tmp_path / "moe")
    before = _snapshot(out)
    model = _ders()
    layer = ders_layers(model)[1]
    delta = layer.ders_delta["default"]["up_proj"]
    with torch.no_grad():
        (layer.ders_router["default"].weight if where == "router" else delta.lora_b.weight)[0, 0] = float("nan")
    with pytest.raises(ExportCheckError, match=r"model\.layers\.1\.mlp\..*holds NaN or inf\. Nothing was written"):
        export_moe(model, out)
    assert _snapshot(out) == before and _hidden(tmp_path) == []


def test_reexport_replaces_only_the_files_of_the_previous_export(tmp_path):
    out = export_moe(_ders(), tmp_path / "moe")
    manifest = json.loads((out / atomic.MANIFEST).read_text())
    assert manifest["written_by"] == "ders_peft.export_moe" and "config.json" in manifest["files"]
    (out / "tokenizer_notes.txt").write_text("mine")
    (out / "my_sentencepiece.model").write_bytes(b"\x00spm")
    (out / "evals").mkdir()
    (out / "evals" / "run1.json").write_text("{}")
    export_moe(_ders(seed=3), out)
    assert (out / "tokenizer_notes.txt").read_text() == "mine"
    assert (out / "my_sentencepiece.model").read_bytes() == b"\x00spm"
    assert (out / "evals" / "run1.json").read_text() == "{}"
    assert "tokenizer_notes.txt" not in json.loads((out / atomic.MANIFEST).read_text())["files"]
    assert _hidden(tmp_path) == []


def test_a_user_file_the_new_export_would_overwrite_is_refused(tmp_path):
    out = export_moe(_ders(), tmp_path / "moe")
    (out / "tokenizer.json").write_text("the user's own")
    before = _snapshot(out)

    class Tok:
        def save_pretrained(self, d):
            Path(d, "tokenizer.json").write_text("{}")

    with pytest.raises(ValueError, match=r"holds \['tokenizer.json'\], which the previous write did not make"):
        export_moe(_ders(), out, tokenizer=Tok())
    assert _snapshot(out) == before and _hidden(tmp_path) == []


def test_a_legacy_export_without_manifest_keeps_foreign_files(tmp_path):
    out = export_moe(_ders(), tmp_path / "moe")
    (out / atomic.MANIFEST).unlink()
    (out / "tokenizer_notes.txt").write_text("mine")
    export_moe(_ders(), out)
    assert (out / "tokenizer_notes.txt").read_text() == "mine" and (out / atomic.MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------- fault injection
class Boom(Exception):
    pass


def _fail_on(monkeypatch, obj, name, nth=1):
    real, calls = getattr(obj, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise Boom(f"{name} #{nth}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)


def _fail_manifest(monkeypatch):
    real = atomic.json.dumps

    def dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and "written_by" in obj:
            raise Boom("manifest")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(atomic.json, "dumps", dumps)


def _fail_in_swap(monkeypatch, nth: int):
    """``os.replace`` fails on its ``nth`` call inside the directory swap."""
    real_swap = atomic._swap

    def swap(src, dst):
        with pytest.MonkeyPatch.context() as inner:
            _fail_on(inner, atomic.os, "replace", nth=nth)
            real_swap(src, dst)

    monkeypatch.setattr(atomic, "_swap", swap)


class _Tokenizer:
    fail = False

    def save_pretrained(self, directory) -> None:
        Path(directory, "tokenizer.json").write_text("{}")
        if self.fail:
            raise Boom("tokenizer")


STEPS = {
    "model weights": lambda mp: _fail_on(mp, transformers.PreTrainedModel, "save_pretrained"),
    "tokenizer": lambda mp: mp.setattr(_Tokenizer, "fail", True),
    "model card": lambda mp: _fail_on(mp, ders_peft.export.writing, "model_card"),
    "manifest": _fail_manifest,
    "carrying user files": lambda mp: _fail_on(mp, atomic, "_carry"),
    "flush to disk": lambda mp: _fail_on(mp, atomic, "_fsync_tree"),
    "set the old export aside": lambda mp: _fail_in_swap(mp, 1),
    "move the new one in": lambda mp: _fail_in_swap(mp, 2),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_an_exception_at_any_step_of_an_export_keeps_the_previous_one(tmp_path, monkeypatch, step):
    out = export_moe(_ders(), tmp_path / "moe")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    model = _ders(seed=7)
    STEPS[step](monkeypatch)
    with pytest.raises(Boom):
        export_moe(model, out, tokenizer=_Tokenizer())
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert _hidden(tmp_path) == []
    export_moe(model, out, tokenizer=_Tokenizer())  # and the next try succeeds
    assert (out / "tokenizer.json").is_file() and (out / "notes.txt").read_text() == "mine"


def _leftovers(tmp_path: Path) -> tuple[Path, dict[str, bytes], int]:
    out = export_moe(_ders(), tmp_path / "moe")
    before, pid = _snapshot(out), _dead_pid()
    return out, before, pid


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_run(tmp_path):
    out, before, pid = _leftovers(tmp_path)
    os.replace(out, tmp_path / f".moe.old-{pid}")  # what a kill after the first rename leaves
    (tmp_path / f".moe.tmp-{pid}-abc").mkdir()
    (tmp_path / f".moe.tmp-{pid}-abc" / "model.safetensors").write_bytes(b"x" * 1000)
    export_moe(_ders(), tmp_path / "other")  # another destination leaves these leftovers alone
    assert len(_hidden(tmp_path)) == 2
    with pytest.warns(UserWarning, match="restored .*moe' from its previous version"):
        export_moe(_ders(seed=2), out)
    assert _hidden(tmp_path) == [] and (out / "config.json").is_file() and _snapshot(out) != before


def test_recover_restores_exactly_and_cleans_only_dead_writers(tmp_path):
    out, before, pid = _leftovers(tmp_path)
    os.replace(out, tmp_path / f".moe.old-{pid}")
    (tmp_path / f".moe.tmp-{pid}-x").mkdir()
    alive = tmp_path / f".moe.tmp-{os.getppid()}-y"  # a writer that still runs: left alone
    alive.mkdir()
    actions = atomic.recover(out)
    assert [a.split(",")[0].split(" ")[0] for a in actions] == ["restored", "removed"]
    assert _snapshot(out) == before and _hidden(tmp_path) == [alive.name]
    os.replace(tmp_path / "moe", tmp_path / "moe2")
    shutil.copytree(tmp_path / "moe2", tmp_path / f".moe2.old-{pid}")  # killed after the second rename
    assert "removed" in atomic.recover(tmp_path / "moe2")[0] and _snapshot(tmp_path / "moe2") == before


def test_a_real_kill_during_the_swap(tmp_path):
    """A child process is killed (os._exit, no cleanup) right after setting the old export aside."""
    out, before, _ = _leftovers(tmp_path)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ders_testing import tiny_model
        from peft import get_peft_model
        import ders_peft
        from ders_peft import atomic
        model = get_peft_model(tiny_model("llama"), ders_peft.DeRSConfig(num_experts=2, top_k=1, seed=9))
        real = os.replace
        def replace(a, b):
            real(a, b)
            if str(a) == {str(out)!r}:
                os._exit(9)
        atomic.os.replace = replace
        ders_peft.export_moe(model, {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not out.exists() and any(n.startswith(".moe.old-") for n in _hidden(tmp_path))
    assert any(n.startswith(".moe.tmp-") for n in _hidden(tmp_path))
    actions = atomic.recover(out)
    assert len(actions) == 2 and actions[0].startswith("restored")
    assert _snapshot(out) == before and _hidden(tmp_path) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "README.md"
    atomic.atomic_write_text(path, "old")
    _fail_on(monkeypatch, atomic.os, "fsync")
    with pytest.raises(Boom):
        atomic.atomic_write_text(path, "new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    atomic.atomic_write_text(path, "new")
    assert path.read_text() == "new"


# --------------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dense = tiny_model("llama")
    dense.save_pretrained(root / "base")
    model = get_peft_model(copy.deepcopy(dense), DeRSConfig(num_experts=2, top_k=1, delta_type="full"))
    model.save_pretrained(root / "adapter")
    return root


def _copy(dirs: Path, tmp_path: Path, name: str, edit) -> Path:
    out = tmp_path / name
    shutil.copytree(dirs / name, out)
    edit(out)
    return out


def _error_lines(err: str) -> list[str]:
    """stderr lines of ders-peft itself (transformers may draw a loading progress bar)."""
    return [line for line in err.splitlines() if line.startswith("ders-peft")]


CLI_CASES = [
    ("adapter", _write("adapter_config.json", b"[1]"), ["--adapter=", "adapter_config.json' holds a JSON list"]),
    ("adapter", _truncate, ["adapter_model.safetensors' is corrupt or truncated"]),
    ("adapter", lambda d: (d / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors' is missing"]),
    ("adapter", _edit_config(peft_type="LORA"), ["--adapter=", "its peft_type is 'LORA', expected 'DERS'"]),
    ("base", lambda d: (d / "model.safetensors").unlink(), ["--base=", "no weights (model.safetensors"]),
    ("base", _write("config.json", b"{"), ["--base=", "config.json' is not valid JSON"]),
    ("base", _write("config.json", b"{}"), ["--base=", "config.json' has no 'model_type'"]),
    ("base", lambda d: _write("model.safetensors", (d / "model.safetensors").read_bytes()[:-3])(d),
     ["model.safetensors' is corrupt or truncated"]),
]


@pytest.mark.parametrize("command", ["export", "compress"])
@pytest.mark.parametrize("which,edit,fragments", CLI_CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CLI_CASES)])
def test_cli_user_errors_are_one_line_with_exit_code_2(dirs, tmp_path, capsys, command, which, edit, fragments):
    paths = {"base": dirs / "base", "adapter": dirs / "adapter", which: _copy(dirs, tmp_path, which, edit)}
    argv = [command, "--base", str(paths["base"]), "--adapter", str(paths["adapter"]), "--out", str(tmp_path / "o")]
    argv += ["--method", "dare", "--drop-rate", "0.5"] if command == "compress" else []
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [err.strip()] and err.startswith(f"ders-peft {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["export", "compress"])
def test_cli_checks_the_destination_before_loading(dirs, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)  # would fail if reached
    argv = [command, "--base", str(dirs / "base"), "--adapter", str(dirs / "adapter"), "--out", "."]
    argv += ["--method", "dare", "--drop-rate", "0.5"] if command == "compress" else []
    assert cli.main(argv) == 2
    assert "--out='.' is invalid: it is the current directory" in capsys.readouterr().err


def test_cli_internal_errors_exit_1_and_debug_shows_the_traceback(dirs, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(ders_peft.export, "export_moe", broken)
    argv = ["export", "--base", str(dirs / "base"), "--adapter", str(dirs / "adapter"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: a bug (rerun with --debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main([*argv, "--debug"])
    with pytest.raises(ValueError, match="--out='.*' is invalid"):
        cli.main(["--debug", *argv[:-1], str(dirs / "base")])


def test_cli_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["export", "--help"], ["compress", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "exit status:" in out and "2    refused input" in out and "1    unexpected internal error" in out


def test_cli_compress_output_is_written_atomically(dirs, tmp_path, monkeypatch, capsys):
    _fail_on(monkeypatch, PeftModel, "save_pretrained")
    argv = ["compress", "--base", str(dirs / "base"), "--adapter", str(dirs / "adapter"), "--method", "dare"]
    with pytest.raises(Boom):
        cli.main([*argv, "--drop-rate", "0.5", "--out", str(tmp_path / "o"), "--debug"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert cli.main([*argv, "--drop-rate", "0.5", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file() and _hidden(tmp_path) == []
