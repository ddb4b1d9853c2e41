"""Serving exports: what makes an export portable to engines (the 1e-20 shared-expert gate, the tokenizer class, the
engine-compatibility reasons and warnings), and, where vLLM is installed (the ``serve`` extra), the exported models
served by vLLM, and where llama-cpp-python and llama.cpp's converter are (``LLAMA_CPP_CONVERT``), converted to GGUF
and run by llama.cpp, with transformers' greedy tokens."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ders_testing import VOCAB, randomize_adapter, tiny_model
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ders_peft
from ders_peft.export import SHARED_GATE_ZERO, EngineCompatibilityWarning, engine_compatibility, export_moe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve  # noqa: E402


def ders_model(family="llama", layers=3, seed=0, **cfg_kw):
    model = tiny_model(family, layers=layers, seed=seed)
    peft_model = get_peft_model(model, ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "rank": 3, **cfg_kw}))
    randomize_adapter(peft_model, std=0.1)
    return peft_model.eval()


def ids(seed=0):
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def export_quietly(model, out, arch=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineCompatibilityWarning)
        return export_moe(model, out, arch, **kw)


# ------------------------------------------------------------------------------------------- portable exports
@pytest.mark.parametrize("shared_expert", [True, False])
def test_fixed_average_gate_is_1e20_and_gives_the_zero_gate_logits(tmp_path, shared_expert):
    """Qwen2-MoE exports without a learned gate write every shared_expert_gate weight as 1e-20; the logits equal the
    DeRS model's and are bit-identical to those with the gate set to 0 (sigmoid(0) = 0.5)."""
    model = ders_model(shared_expert=shared_expert)
    out = export_quietly(model, tmp_path / "out", "qwen2_moe")
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gates = [layer.mlp.shared_expert_gate.weight for layer in moe.model.layers]
    assert all(torch.equal(g, torch.full_like(g, SHARED_GATE_ZERO)) for g in gates)
    with torch.no_grad():
        got = moe(input_ids=ids()).logits
        want = model(input_ids=ids()).logits
        for g in gates:
            g.zero_()
        zero_gate = moe(input_ids=ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got, zero_gate)


def test_learned_gate_is_exported_as_trained(tmp_path):
    model = ders_model("qwen2", shared_expert=True, shared_expert_gate=True)
    moe = ders_peft.convert_to_moe(model, "qwen2_moe")
    router = model.base_model.model.model.layers[0].mlp.ders_router["default"].weight
    torch.testing.assert_close(moe.model.layers[0].mlp.shared_expert_gate.weight, router[4:])
    assert float(router[4:].detach().abs().max()) > 1e-3


def test_tokenizer_class_is_portable_and_reloads(tmp_path):
    """transformers 5 saves a generic fast tokenizer as ``TokenizersBackend`` (rejected by llama.cpp's converter);
    the export writes ``PreTrainedTokenizerFast`` and AutoTokenizer reloads it with the same ids."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["tokenizer_class"]
    out = export_quietly(ders_model(), tmp_path / "out", "mixtral", tokenizer=tok)
    written = json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert written == ("PreTrainedTokenizerFast" if plain == "TokenizersBackend" else plain)
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "the cat sat on the mat"
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (reloaded.pad_token, reloaded.eos_token) == (tok.pad_token, tok.eos_token)
    assert engine_compatibility(out)["llama.cpp"] == []
    if plain == "TokenizersBackend":  # the directory saved without the fix names the reason
        (tmp_path / "plain" / "config.json").write_text((out / "config.json").read_text())
        assert "tokenizer_class='TokenizersBackend'" in engine_compatibility(tmp_path / "plain")["llama.cpp"][0]


# ------------------------------------------------------------------------------------------- compatibility
CASES = [  # (family, arch, DeRS options, expected llama.cpp reason fragments)
    ("llama", "mixtral", {}, []),
    ("llama", "qwen2_moe", {"normalize_top_k": False, "shared_expert": True}, []),
    ("llama", "qwen2_moe", {"normalize_top_k": True}, ["norm_topk_prob=True"]),
    ("llama", "qwen2_moe", {"normalize_top_k": False, "target_modules": ["mlp"], "layers_to_transform": [0, 2]},
     ["dense blocks [1]"]),
    ("qwen3", "qwen3_moe", {}, []),
    ("qwen3", "qwen3_moe", {"normalize_top_k": False}, ["norm_topk_prob=False"]),
    ("qwen3", "qwen3_moe", {"target_modules": ["mlp"], "layers_to_transform": [1]}, ["dense blocks [0, 2]"]),
]  # fmt: skip


@pytest.mark.parametrize("family,arch,options,expected", CASES)
def test_engine_compatibility_and_export_warnings(tmp_path, family, arch, options, expected):
    """``export_moe`` warns once per llama.cpp reason (naming the option), and ``engine_compatibility`` of the written
    directory gives the same reasons."""
    model = ders_model(family, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_moe(model, tmp_path / "out", arch)
    messages = [str(w.message) for w in caught if issubclass(w.category, EngineCompatibilityWarning)]
    assert len(messages) == len(expected)
    for fragment, message in zip(expected, messages):
        assert fragment in message and message.startswith("export_moe: this export will not run exactly in llama.cpp")
    reasons = engine_compatibility(out)
    assert reasons["vllm"] == []
    assert [any(f in r for r in reasons["llama.cpp"]) for f in expected] == [True] * len(expected)
    assert len(reasons["llama.cpp"]) == len(expected)
    config = json.loads((out / "config.json").read_text())
    assert engine_compatibility(config)["llama.cpp"] == reasons["llama.cpp"]  # the config alone says the same


def test_zero_gate_in_a_directory_is_named(tmp_path):
    """An all-zero shared_expert_gate (an older export, or 1e-20 rounded to 0 in fp16) is a llama.cpp reason."""
    out = export_quietly(ders_model(normalize_top_k=False), tmp_path / "out", "qwen2_moe")
    assert engine_compatibility(out)["llama.cpp"] == []
    weights = out / "model.safetensors"
    state = load_file(weights)
    state = {k: (v.zero_() if k.endswith("shared_expert_gate.weight") else v) for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    (reason,) = engine_compatibility(out)["llama.cpp"]
    assert "3 all-zero shared_expert_gate" in reason and "silu(x)/x" in reason


def test_engine_compatibility_refuses_other_inputs(tmp_path):
    with pytest.raises(ValueError, match="no readable config.json"):
        engine_compatibility(tmp_path)
    with pytest.raises(TypeError, match="export must be an export directory"):
        engine_compatibility(3)


# ------------------------------------------------------------------------------------------- real engines
VLLM_MISSING = serve.engine_missing("vllm")


@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
@pytest.mark.parametrize("arch", list(serve.CASES))
def test_vllm_generates_the_transformers_tokens(tmp_path, arch):
    """3 prompts x 20 greedy tokens from vLLM equal transformers'; swapping two experts changes transformers' tokens,
    so the comparison would catch a wrong expert order."""
    export = serve.build_export(arch, tmp_path / arch)
    want = serve.transformers_tokens(export, 20)
    assert serve.transformers_tokens(export, 20, swapped=True)["tokens"] != want["tokens"]
    got = serve.vllm_tokens(export, 20)
    assert got["tokens"] == want["tokens"]
    assert got["batched_tokens"] == want["tokens"]



LLAMA_MISSING = serve.engine_missing("llama.cpp")
LLAMA_CASES = [case for case in serve.CASES if case != "qwen2_moe"]  # qwen2_moe has a dense block: refused


@pytest.mark.skipif(LLAMA_MISSING is not None, reason=str(LLAMA_MISSING))
@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_cpp_generates_the_transformers_tokens(tmp_path, case):
    """Every case llama.cpp can express (``engine_compatibility`` names no reason) converts to an f32 GGUF whose
    greedy tokens (f32 KV cache) equal transformers'."""
    export = serve.build_export(case, tmp_path / case)
    assert engine_compatibility(export)["llama.cpp"] == []
    want = serve.transformers_tokens(export, 20)
    assert serve.transformers_tokens(export, 20, swapped=True)["tokens"] != want["tokens"]
    assert serve.llama_cpp_tokens(export, 20)["tokens"] == want["tokens"]


@pytest.mark.skipif(LLAMA_MISSING is not None, reason=str(LLAMA_MISSING))
def test_llama_cpp_refuses_a_dense_block_as_engine_compatibility_says(tmp_path):
    export = serve.build_export("qwen2_moe", tmp_path / "qwen2_moe")
    assert any("dense" in reason for reason in engine_compatibility(export)["llama.cpp"])
    with pytest.raises(RuntimeError, match="Can not map tensor"):
        serve.convert_to_gguf(export, tmp_path / "x.gguf")
