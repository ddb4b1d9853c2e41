"""DeRSConfig: documented fields, a ValueError naming the field for every invalid value, layer selection, JSON
round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
import transformers
from ders_testing import VOCAB, ders_layers, tiny_model
from peft import PeftConfig, PeftModelForCausalLM, get_peft_model
from peft.config import PeftConfig as BasePeftConfig

import ders_peft
from ders_peft import DeRSConfig

OWN_FIELDS = [
    f.name
    for f in dataclasses.fields(DeRSConfig)
    if f.name not in {f.name for f in dataclasses.fields(BasePeftConfig)}
]


def test_is_a_documented_peft_config():
    assert issubclass(DeRSConfig, PeftConfig)
    cfg = DeRSConfig()
    assert cfg.peft_type == ders_peft.PEFT_TYPE_DERS
    assert (cfg.train_base, cfg.delta_type, cfg.target_modules) == (True, "lowrank", None)
    documented = set(re.findall(r"^\s{8}(\w+):", DeRSConfig.__doc__, flags=re.M))
    assert set(OWN_FIELDS) <= documented, set(OWN_FIELDS) - documented
    for name in ("target_modules", "num_experts", "top_k", "delta_type", "rank", "sparse_rate", "seed"):
        assert name in OWN_FIELDS
    for name in ("shared_expert", "train_base", "normalize_top_k", "router_aux_loss_coef", "router_z_loss_coef"):
        assert name in OWN_FIELDS
    for name in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        assert name in OWN_FIELDS


INVALID = [
    ("num_experts", {"num_experts": 0}),
    ("num_experts", {"num_experts": 2.0}),
    ("num_experts", {"num_experts": True}),
    ("top_k", {"num_experts": 2, "top_k": 3}),
    ("top_k", {"top_k": 0}),
    ("delta_type", {"delta_type": "dense"}),
    ("rank", {"rank": 0}),
    ("rank", {"rank": -2}),
    ("rank", {"rank": 1.5}),
    ("sparse_rate", {"sparse_rate": 1.0}),
    ("sparse_rate", {"sparse_rate": -0.1}),
    ("sparse_rate", {"sparse_rate": 2}),
    ("sparse_rate", {"sparse_rate": math.nan}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": "0"}),
    ("shared_expert", {"shared_expert": "yes"}),
    ("train_base", {"train_base": 1}),
    ("normalize_top_k", {"normalize_top_k": None}),
    ("router_aux_loss_coef", {"router_aux_loss_coef": -0.01}),
    ("router_aux_loss_coef", {"router_aux_loss_coef": math.inf}),
    ("router_z_loss_coef", {"router_z_loss_coef": "0.1"}),
    ("router_init_std", {"router_init_std": 0.0}),
    ("delta_scale", {"delta_scale": -1.0}),
    ("target_modules", {"target_modules": []}),
    ("target_modules", {"target_modules": ["mlp", 3]}),
    ("exclude_modules", {"exclude_modules": [""]}),
    ("layers_to_transform", {"layers_to_transform": [-1]}),
    ("layers_to_transform", {"layers_to_transform": []}),
    ("layers_to_transform", {"layers_to_transform": "0"}),
    ("layers_to_transform", {"target_modules": r".*\.mlp", "layers_to_transform": [0]}),
    ("layers_pattern", {"layers_pattern": "layers"}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": ""}),
    ("modules_to_save", {"modules_to_save": "lm_head"}),
    ("train_base", {"delta_type": "full", "train_base": False}),
    ("task_type", {"task_type": "NOT_A_TASK"}),
]


@pytest.mark.parametrize("field_name,kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_values_name_the_field(field_name, kwargs):
    with pytest.raises(ValueError, match=rf"DeRSConfig\.{field_name}=") as info:
        DeRSConfig(**kwargs)
    assert "invalid" in str(info.value)


def test_valid_edge_values():
    DeRSConfig(num_experts=1, top_k=1)
    DeRSConfig(num_experts=8, top_k=8, sparse_rate=0.0, delta_type="sparse", router_aux_loss_coef=0)
    DeRSConfig(delta_type="full", shared_expert=True, layers_to_transform=3, target_modules=["mlp"])
    DeRSConfig(target_modules=r".*\.0\.mlp")
    DeRSConfig(layers_to_transform=[1], layers_pattern=["layers", "h"], modules_to_save=["lm_head"])
    DeRSConfig(task_type="CAUSAL_LM")


def test_rank_above_matrix_size():
    """tiny llama: hidden 32, intermediate 48 -> the largest rank is 32."""
    get_peft_model(tiny_model("llama"), DeRSConfig(rank=32, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"DeRSConfig\.rank=33 .*at most 32"):
        get_peft_model(tiny_model("llama"), DeRSConfig(rank=33))


@pytest.mark.parametrize("field,value", [("top_k", 5), ("delta_type", "dense"), ("sparse_rate", 1.0), ("rank", 0)])
def test_fields_edited_after_creation_are_checked_again(field, value):
    """A config changed after construction is validated again by get_peft_model, before any layer is built."""
    cfg = DeRSConfig(num_experts=2, top_k=1)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"DeRSConfig\.{field}="):
        get_peft_model(tiny_model("llama"), cfg)


@pytest.mark.parametrize("target", [["self_attn"], ["gate_proj"], ["c_fc"]])
def test_target_that_is_not_an_ffn_block(target):
    family = "gpt2" if target == ["c_fc"] else "llama"
    with pytest.raises(ValueError, match=r"DeRSConfig\.target_modules.*not an FFN block"):
        get_peft_model(tiny_model(family), DeRSConfig(target_modules=target))


def tiny_mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(cfg)


def test_architecture_we_cannot_handle():
    # no default targets for an MoE model ...
    with pytest.raises(ValueError, match=r"DeRSConfig\.target_modules=None .*model_type='mixtral'"):
        get_peft_model(tiny_mixtral(), DeRSConfig())
    # ... and its sparse MoE block is not a dense FFN
    with pytest.raises(ValueError, match=r"DeRSConfig\.target_modules matched .* not an FFN block"):
        get_peft_model(tiny_mixtral(), DeRSConfig(target_modules=["mlp"]))


def test_block_index_that_does_not_exist():
    with pytest.raises(ValueError, match=r"DeRSConfig\.layers_to_transform=\[0, 5\] .*2 blocks"):
        get_peft_model(tiny_model("llama"), DeRSConfig(layers_to_transform=[0, 5]))


@pytest.mark.parametrize(
    "family,pattern,indices",
    [("llama", "layers", [0, 2]), ("gpt2", "h", [1, 3]), ("llama", None, [0, 2]), ("gpt_neox", ["layers"], 3)],
)
def test_layers_to_transform_upcycles_exactly_those_blocks(family, pattern, indices):
    model = tiny_model(family, layers=4)
    cfg = DeRSConfig(num_experts=2, top_k=1, layers_to_transform=indices, layers_pattern=pattern)
    peft_model = get_peft_model(model, cfg)
    upcycled = sorted(
        int(re.search(r"\.(\d+)\.mlp$", n).group(1))
        for n, m in peft_model.named_modules()
        if isinstance(m, ders_peft.DeRSLayer)
    )
    assert upcycled == ([indices] if isinstance(indices, int) else indices)
    assert len(ders_layers(peft_model)) == len(upcycled)


def test_every_other_block_as_moe_llava():
    model = tiny_model("qwen2", layers=6)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        dense = model(ids).logits
    peft_model = get_peft_model(model, DeRSConfig(layers_to_transform=list(range(0, 6, 2)), layers_pattern="layers"))
    assert len(ders_layers(peft_model)) == 3
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, dense, atol=1e-5, rtol=0)


NON_DEFAULT = {
    "target_modules": ["mlp"],
    "exclude_modules": ["lm_head"],
    "num_experts": 6,
    "top_k": 3,
    "delta_type": "sparse",
    "rank": 7,
    "sparse_rate": 0.75,
    "bits": 2,
    "group_size": 16,
    "seed": 123,
    "shared_expert": True,
    "shared_expert_gate": True,
    "universal_delta_type": "full",
    "compression": {"method": "dare", "drop_rate": 0.9},
    "source_architecture": {
        "model_type": "llama",
        "num_blocks": 4,
        "modules": ["model.layers.0.mlp", "model.layers.2.mlp"],
        "ffn_shapes": {"gate_proj": [48, 32], "up_proj": [48, 32], "down_proj": [32, 48]},
    },
    "allow_other_model_type": True,
    "train_base": False,
    "normalize_top_k": False,
    "router_aux_loss_coef": 0.05,
    "router_z_loss_coef": 0.001,
    "router_init_std": 0.1,
    "delta_scale": 2.5,
    "delta_init": "small",
    "delta_init_std": 0.05,
    "layers_to_transform": [0, 2],
    "layers_pattern": "layers",
    "modules_to_save": ["lm_head"],
    "task_type": "CAUSAL_LM",
}


def test_non_default_covers_every_field():
    assert set(NON_DEFAULT) == set(OWN_FIELDS) | {"task_type"}
    defaults = DeRSConfig()
    for name, value in NON_DEFAULT.items():
        assert getattr(defaults, name) != value, name


def test_json_round_trip(tmp_path):
    cfg = DeRSConfig(**NON_DEFAULT)
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DERS"
    for name, value in NON_DEFAULT.items():
        stored = sorted(raw[name]) if name in ("target_modules", "exclude_modules") else raw[name]
        assert stored == value, name
    for loader in (DeRSConfig.from_pretrained, PeftConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is DeRSConfig
        assert loaded.to_dict() == cfg.to_dict()
        for name, value in NON_DEFAULT.items():
            got = getattr(loaded, name)
            assert (sorted(got) if isinstance(got, set) else got) == value, name


def test_task_type_causal_lm():
    peft_model = get_peft_model(tiny_model("llama"), DeRSConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1))
    assert isinstance(peft_model, PeftModelForCausalLM)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.isfinite(peft_model(input_ids=ids, labels=ids).loss)
