"""Training levers (issue 12): delta initialisation, k-means router initialisation, per-group learning rates.

References are plain computations: the A draws replayed from the layer's seed, the normalised mean of each known
cluster, the hidden states an independent hook captures, and SGD's update ``-lr * grad`` per group."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from ders_testing import ders_layers, tiny_model
from peft import get_peft_model
from trainer_testing import COMMON_ARGS, SENTENCE, single_thread, text_dataset, word_tokenizer
from trl import SFTConfig, SFTTrainer

import ders_peft
from ders_peft.layer import _layer_seed
from ders_peft.training import (
    check_param_groups,
    create_optimizer,
    group_of_params,
    init_routers_kmeans,
    param_groups,
    spherical_kmeans,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _ders(model=None, **kw):
    model = model if model is not None else tiny_model("llama", hidden=32, inter=48)
    cfg = {"target_modules": ["mlp"], "num_experts": 4, "top_k": 2, "rank": 2, **kw}
    return get_peft_model(model, ders_peft.DeRSConfig(**cfg))


def _ids(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- delta init


def test_zero_delta_init_is_the_paper_default_and_computes_the_dense_model():
    ids = _ids()
    with torch.no_grad():
        dense = tiny_model("llama", hidden=32, inter=48)(ids).logits
    default, explicit = _ders(), _ders(delta_init="zero", delta_init_std=0.5)
    assert default.peft_config["default"].delta_init == "zero"
    sd_default, sd_explicit = default.state_dict(), explicit.state_dict()
    assert sd_default.keys() == sd_explicit.keys()
    assert all(torch.equal(sd_default[k], sd_explicit[k]) for k in sd_default)
    layer = ders_layers(default)[0]
    deltas = layer.ders_delta["default"]
    assert all(torch.count_nonzero(d.lora_b.weight) == 0 for d in deltas.values())
    # the random draws are those of before: router first, then each projection's A, from the layer's seed
    gen = torch.Generator().manual_seed(_layer_seed(0, layer.key))
    router = torch.randn(4, 32, generator=gen) * 0.02
    assert torch.equal(layer.ders_router["default"].weight, router)
    for name in layer.layout.projs:
        a = deltas[name].lora_a.weight
        bound = 1.0 / math.sqrt(a.shape[1])
        assert torch.equal(a, torch.rand(a.shape, generator=gen) * 2 * bound - bound)
    with torch.no_grad():
        torch.testing.assert_close(default(ids).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
def test_small_delta_init_has_the_stated_std_and_is_seeded(delta_type):
    std = 0.01
    kw = {"delta_type": delta_type, "delta_init": "small", "delta_init_std": std, "sparse_rate": 0.5, "rank": 8}
    big = dict(hidden=64, inter=96)

    def values(model):
        out = []
        for layer in ders_layers(model):
            for d in layer.ders_delta["default"].values():
                out.append((d.lora_b.weight if delta_type == "lowrank" else d.weight).detach().flatten())
        return torch.cat(out)

    a = _ders(tiny_model("llama", **big), **kw)
    v = values(a)
    assert v.numel() > 10_000
    assert float(v.std()) == pytest.approx(std, rel=0.03) and abs(float(v.mean())) < 3 * std / math.sqrt(v.numel())
    assert torch.equal(v, values(_ders(tiny_model("llama", **big), **kw)))  # same seed: same values
    assert not torch.equal(v, values(_ders(tiny_model("llama", **big), seed=1, **kw)))
    ids = _ids()
    with torch.no_grad():
        dense = tiny_model("llama", **big)(ids).logits
        assert (a(ids).logits - dense).abs().max() > 1e-4  # the experts differ from the dense FFN at step 0


@pytest.mark.parametrize(
    ("kw", "field", "allowed"),
    [
        ({"delta_init": "big"}, "delta_init", "allowed values are ('zero', 'small')"),
        ({"delta_init": "small", "delta_type": "full"}, "delta_init", "only applies to delta_type"),
        ({"delta_init": "small", "delta_init_std": 0.0}, "delta_init_std", "finite number > 0"),
        ({"delta_init_std": float("nan")}, "delta_init_std", "finite number > 0"),
    ],
)
def test_delta_init_validation_names_the_field(kw, field, allowed):
    with pytest.raises(ValueError, match=rf"DeRSConfig\.{field}=.*{re.escape(allowed)}"):
        ders_peft.DeRSConfig(**kw)


# ---------------------------------------------------------------------------------------------------- k-means


def _clusters(k: int, dim: int, per: int, seed: int = 0, noise: float = 0.05):
    """Points around k orthonormal directions, with varied norms; returns points, labels and the directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(dim, k, generator=gen))[0].t()  # (k, dim), orthonormal
    labels = torch.arange(k).repeat_interleave(per)
    norms = 0.5 + 2 * torch.rand(k * per, 1, generator=gen)
    points = (dirs[labels] + noise * torch.randn(k * per, dim, generator=gen)) * norms
    return points, labels, dirs


def _reference_centroids(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The spherical k-means fixed point of known clusters: the normalised mean of each cluster's unit vectors."""
    unit = points / points.norm(dim=1, keepdim=True)
    return torch.stack([F.normalize(unit[labels == j].mean(0), dim=0) for j in range(k)])


def _match(found: torch.Tensor, want: torch.Tensor) -> list[int]:
    """For each wanted row, the found row most similar to it (must be a permutation)."""
    perm = (F.normalize(want, dim=1) @ F.normalize(found, dim=1).t()).argmax(1).tolist()
    assert sorted(perm) == list(range(len(want))), perm
    return perm


def test_spherical_kmeans_recovers_separated_clusters():
    points, labels, dirs = _clusters(k=4, dim=16, per=50)
    centroids, assign, iters = spherical_kmeans(points, 4, iters=20, generator=torch.Generator().manual_seed(0))
    want = _reference_centroids(points, labels, 4)
    perm = _match(centroids, want)
    torch.testing.assert_close(centroids[perm], want, atol=1e-5, rtol=0)
    assert torch.equal(assign, torch.tensor(perm)[labels])  # every point in its own cluster
    assert iters < 20  # converged before the cap
    assert (centroids[perm] * dirs).sum(1).min() > 0.99
    again = spherical_kmeans(points, 4, 20, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], centroids)  # seeded


def test_spherical_kmeans_rejects_too_few_points():
    with pytest.raises(ValueError, match="k=5 for 3 points"):
        spherical_kmeans(torch.randn(3, 4), 5)


def _clustered_model(k: int, per: int, dim: int = 32):
    """One block whose FFN input is the normalised embedding: the attention output projection is zero, so the
    block's hidden state is the embedding; token ``i`` of the vocabulary lies in cluster ``i // per``."""
    model = tiny_model("llama", hidden=dim, inter=48, layers=1)
    points, labels, _ = _clusters(k + 1, dim, per, seed=3)  # the last cluster only ever appears as padding
    with torch.no_grad():
        model.model.embed_tokens.weight[: len(points)] = points
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model, points, labels


def test_kmeans_router_init_routes_each_cluster_to_one_expert():
    k, per = 4, 12
    model, points, labels = _clustered_model(k, per)
    norm = model.model.layers[0].post_attention_layernorm
    hidden = points / torch.sqrt(points.pow(2).mean(1, keepdim=True) + norm.variance_epsilon) * norm.weight
    peft_model = _ders(model, num_experts=k)
    gen = torch.Generator().manual_seed(1)
    real = torch.randperm(k * per, generator=gen).view(4, per)  # every real token once, shuffled
    pad = torch.full((4, 5), k * per) + torch.arange(5)  # padding tokens from the extra cluster
    batch = {
        "input_ids": torch.cat([real, pad], 1),
        "attention_mask": torch.cat([torch.ones(4, per), torch.zeros(4, 5)], 1).long(),
    }
    stats = init_routers_kmeans(peft_model, [batch], iters=20, seed=0)
    ((name, s),) = stats.items()
    assert s["tokens"] == k * per and sorted(s["cluster_sizes"]) == [per] * k  # padding left out
    router = ders_layers(peft_model)[0].ders_router["default"].weight.detach()
    want = _reference_centroids(hidden[: k * per], labels[: k * per], k)
    perm = _match(router, want)
    torch.testing.assert_close(F.normalize(router[perm], dim=1), want, atol=1e-4, rtol=0)
    x = hidden[: k * per]
    logits = x @ router.t()
    routed = logits.argmax(1)
    assert all(routed[labels[: k * per] == j].unique().tolist() == [perm[j]] for j in range(k))
    # the scale gives the stated logit spread (per-token std across experts, mean over tokens)
    assert float(logits.std(1, unbiased=False).mean()) == pytest.approx(1.0, rel=1e-4)
    assert s["logit_std"] == pytest.approx(1.0, rel=1e-4) and s["agreement"] == 1.0
    assert s["random_logit_std"] < 0.5


def test_kmeans_router_init_uses_each_layers_inputs_in_order():
    """Each layer's router is the k-means of the inputs that layer receives (captured here by an independent
    pre-hook on the initialised model), with one generator shared over the layers in order."""
    model = _ders(tiny_model("llama", hidden=32, inter=48, layers=2), delta_init="small", delta_init_std=0.05)
    batches = [_ids(2, 16, seed=s) for s in range(3)]
    stats = init_routers_kmeans(model, batches, iters=10, seed=7, logit_std=2.0)
    layers = ders_layers(model)
    assert list(stats) == [n for n, m in model.named_modules() if m in layers]
    captured: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0].reshape(-1, 32).clone()))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(7)
    for i, layer in enumerate(layers):  # replayed in order: layer 0 was already set when layer 1 was collected
        x = torch.cat(captured[i])
        c, _, _ = spherical_kmeans(x, 4, 10, gen)
        spread = (x @ c.t()).std(1, unbiased=False).mean()
        torch.testing.assert_close(layer.ders_router["default"].weight, c * (2.0 / spread), atol=1e-5, rtol=1e-5)
        assert stats[list(stats)[i]]["tokens"] == x.shape[0]


def test_kmeans_router_init_refuses_bad_input():
    with pytest.raises(ValueError, match="no DeRS layer"):
        init_routers_kmeans(tiny_model("llama"), [_ids()])
    model = _ders()
    with pytest.raises(ValueError, match="no batches"):
        init_routers_kmeans(model, [])
    with pytest.raises(ValueError, match="iters=0"):
        init_routers_kmeans(model, [_ids()], iters=0)
    with pytest.raises(ValueError, match="fewer than its 4 experts"):
        init_routers_kmeans(model, [{"input_ids": _ids(1, 3), "attention_mask": torch.tensor([[1, 1, 0]])}])
    with pytest.raises(ValueError, match="'input_ids'"):
        init_routers_kmeans(model, [{"ids": _ids()}])


# ---------------------------------------------------------------------------------------------------- lr groups


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"delta_type": "lowrank"}, {"lora_a": "delta_a", "lora_b": "delta_b", "ders_base": "base"}),
        ({"delta_type": "sparse", "sparse_rate": 0.9}, {"ders_delta": "delta_b", "ders_base": "base"}),
        ({"delta_type": "full"}, {"ders_delta": "base"}),
    ],
)
def test_every_trainable_parameter_is_in_its_group(kw, expected):
    model = _ders(**kw)
    groups = group_of_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable
    for name, group in groups.items():
        want = "router" if ".ders_router." in name else next(g for key, g in expected.items() if f".{key}." in name)
        assert group == want, name
    built = param_groups(model, 1e-3)
    assert sum(len(g["params"]) for g in built) == len(trainable)
    assert {g["name"] for g in built} == set(groups.values())


def test_whole_model_training_puts_the_rest_in_other_and_decay_splits_biases():
    model = _ders(tiny_model("phi", hidden=32, inter=48))  # biased FFN: per-expert biases
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            p.requires_grad_(True)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, weight_decay=0.1)}
    assert {"base", "base.no_decay", "delta_a", "delta_b", "router", "other"} <= set(groups)
    assert groups["base.no_decay"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("ders_bias" in names[id(p)] for p in groups["base.no_decay"]["params"])
    assert [names[id(p)] for p in groups["other"]["params"]] == ["base_model.model.model.embed_tokens.weight"]


def test_check_param_groups_refuses_a_parameter_in_none_or_two_groups():
    model = _ders()
    groups = param_groups(model, 1e-3)
    router = groups[[g["name"] for g in groups].index("router")]
    missing = [g | {"params": g["params"][1:]} if g is router else g for g in groups]
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) in no group: \[.*ders_router"):
        check_param_groups(model, missing)
    twice = [*groups, {"name": "extra", "params": router["params"][:1]}]
    with pytest.raises(ValueError, match=r"ders_router.* is in two groups \('router' and 'extra'\)"):
        check_param_groups(model, twice)
    frozen = next(p for n, p in model.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="group 'x' holds .* is frozen"):
        check_param_groups(model, [*groups, {"name": "x", "params": [frozen]}])


def test_lr_arguments_loraplus_and_errors():
    model = _ders()
    lrs = {g["name"]: g["lr"] for g in param_groups(model, 1e-3, delta_a_lr=2e-3, loraplus_ratio=16)}
    assert lrs == {"base": 1e-3, "delta_a": 2e-3, "delta_b": pytest.approx(3.2e-2), "router": 1e-3}
    with pytest.raises(ValueError, match="delta_b_lr or loraplus_ratio, not both"):
        param_groups(model, 1e-3, delta_b_lr=1e-2, loraplus_ratio=4)
    with pytest.raises(ValueError, match="router_lr=-1 is invalid"):
        param_groups(model, 1e-3, router_lr=-1)
    with pytest.raises(ValueError, match="lr=None is invalid"):
        param_groups(model, None)


def test_create_optimizer_under_sfttrainer_gives_each_group_its_lr(tmp_path):
    """SGD without momentum: every parameter moves by exactly ``-lr_group * grad`` (the gradient the trainer hands
    the optimizer, after clipping), and the groups keep the asked learning rates under a constant schedule."""
    model = _ders(tiny_model("llama", initializer_range=0.2), delta_init="small", delta_init_std=0.05)
    asked = {"base": 1e-3, "delta_a": 3e-3, "delta_b": 5e-2, "router": 2e-2}
    optimizer = create_optimizer(
        model,
        1e-2,
        base_lr=asked["base"],
        delta_a_lr=asked["delta_a"],
        delta_b_lr=asked["delta_b"],
        router_lr=asked["router"],
        optimizer_cls=torch.optim.SGD,
    )
    seen: list[dict] = []

    def before(opt, args, kwargs):
        seen.append(
            {
                id(p): (p.detach().clone(), p.grad.detach().clone(), g["lr"])
                for g in opt.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )

    def after(opt, args, kwargs):
        moved = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
        seen[-1] = {i: (*v, moved[i]) for i, v in seen[-1].items()}

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    args = SFTConfig(
        **COMMON_ARGS,
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=2,
        lr_scheduler_type="constant",
        max_length=32,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset([SENTENCE] * 2),
        processing_class=word_tokenizer(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer or trainer.optimizer is optimizer
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == asked
    assert len(seen) == 3
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    for step in seen:
        for group, ids in by_group.items():
            moved = [i for i in ids if i in step and step[i][1].abs().max() > 0]
            assert moved, f"no parameter of group {group} got a gradient"
            for i in moved:
                old, grad, lr, new = step[i]
                assert lr == asked[group]
                torch.testing.assert_close(new - old, -asked[group] * grad, atol=1e-7, rtol=1e-5, msg=names[i])
