"""`import ders_peft` registers DeRS with peft: every loading entry point, re-imports, the adapter's model card, the
failure without the import, and the error for a checkpoint that does not fit the model."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers
from ders_testing import VOCAB, ders_layers, randomize_adapter, tiny_model
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import ders_peft
from ders_peft import DeRSConfig
from ders_peft.registration import CARD_HEADING

IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as a local base checkpoint and a trained-looking DeRS adapter pointing at it."""
    root = tmp_path_factory.mktemp("registration")
    base = tiny_model("llama")
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(tiny_model("llama"), DeRSConfig(num_experts=3, top_k=2, delta_type="sparse"))
    randomize_adapter(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft_model.save_pretrained(root / "adapter")
    return root, logits(peft_model)


def test_peft_type_and_mappings():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType.DERS is ders_peft.PEFT_TYPE_DERS
    assert PeftType("DERS") is PeftType.DERS and PeftType.DERS.value == "DERS"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.DERS] is DeRSConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DERS] is ders_peft.DeRSModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.DERS] == "ders_"
    assert ders_peft.DeRSModel.prefix == "ders_"
    peft_model = get_peft_model(tiny_model("llama"), DeRSConfig(num_experts=2, top_k=1))
    assert isinstance(peft_model.base_model, ders_peft.DeRSModel)
    assert all(name.split(".")[-1].startswith("ders_") for name, _ in _adapter_params(peft_model))


def _adapter_params(peft_model):
    for name, param in peft_model.named_parameters():
        if ".ders_" in name:
            parts = name.split(".")
            yield ".".join(parts[: next(i for i, p in enumerate(parts) if p.startswith("ders_")) + 1]), param


def test_peft_config_from_pretrained(saved):
    root, _ = saved
    cfg = PeftConfig.from_pretrained(root / "adapter")
    assert type(cfg) is DeRSConfig
    assert (cfg.num_experts, cfg.top_k, cfg.delta_type, cfg.peft_type) == (3, 2, "sparse", PeftType.DERS)


def test_peft_model_from_pretrained(saved):
    root, want = saved
    frozen = PeftModel.from_pretrained(tiny_model("llama"), root / "adapter")
    assert (logits(frozen) - want).abs().max().item() == 0.0
    assert not any(p.requires_grad for p in frozen.parameters())

    trainable = PeftModel.from_pretrained(tiny_model("llama"), root / "adapter", is_trainable=True)
    assert (logits(trainable) - want).abs().max().item() == 0.0
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in trainable.named_parameters() if ".ders_" in n}
    assert {n.split(".ders_")[1].split(".")[0] for n in names} == {"router", "base", "delta"}
    trainable.train()
    trainable(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)


def test_auto_peft_model_offline(saved):
    root, want = saved
    model = AutoPeftModelForCausalLM.from_pretrained(root / "adapter")
    assert isinstance(model.base_model, ders_peft.DeRSModel)
    assert (logits(model) - want).abs().max().item() == 0.0


def test_transformers_load_adapter(saved):
    root, want = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    model.load_adapter(str(root / "adapter"))
    assert len(ders_layers(model)) == 2
    assert (logits(model) - want).abs().max().item() == 0.0


def test_model_card_says_how_to_load(saved, tmp_path):
    root, _ = saved
    readme = (root / "adapter" / "README.md").read_text()
    assert "import ders_peft" in readme and readme.count(CARD_HEADING) == 1
    assert "- ders" in readme.split("---")[1]  # the YAML tag list
    # saving again into the same directory keeps one section; a LoRA adapter's card is left alone
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), root / "adapter")
    peft_model.save_pretrained(tmp_path / "again")
    peft_model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text().count(CARD_HEADING) == 1
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert "ders_peft" not in (tmp_path / "lora" / "README.md").read_text()


class _FakeHub:
    """Stands in for the Hub (offline): keeps the bytes of every file a commit uploads."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.files[op.path_in_repo] = f.read()


def test_push_to_hub_uploads_the_adapter_and_the_loading_note(saved, tmp_path, monkeypatch):
    """push_to_hub overwrites the saved README with the Hub's card (a new repo: transformers' template) just before
    uploading; the uploaded card must still say how to load, and the uploaded files must reload exactly."""
    import transformers.utils.hub as hub
    from huggingface_hub.errors import EntryNotFoundError

    root, want = saved
    fake, real_load = _FakeHub(), hub.ModelCard.load

    def card_load(repo_or_path, *args, **kwargs):
        if (tmp_path / "remote" / "README.md").exists() and repo_or_path == "me/ders":
            return real_load(tmp_path / "remote" / "README.md")
        if not str(repo_or_path).startswith("me/"):
            return real_load(repo_or_path, *args, **kwargs)
        raise EntryNotFoundError("new repository: no card yet")

    monkeypatch.setattr(hub, "hf_api", lambda: fake)
    monkeypatch.setattr(hub.ModelCard, "load", card_load)
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), root / "adapter")
    for _ in range(2):  # a new repository, then a second push onto the card the first one uploaded
        peft_model.push_to_hub("me/ders")
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(fake.files)
        (tmp_path / "remote").mkdir(exist_ok=True)
        for name, data in fake.files.items():
            (tmp_path / "remote" / name).write_bytes(data)
        readme = (tmp_path / "remote" / "README.md").read_text()
        assert readme.count(CARD_HEADING) == 1 and "import ders_peft" in readme
        header = readme.split("---")[1]
        assert "library_name: peft" in header and "- ders" in header
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "remote")
    assert (logits(reloaded) - want).abs().max().item() == 0.0


def test_importing_twice_is_harmless(saved, tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from transformers.trainer import DEFAULT_CALLBACKS

    root, want = saved
    members_before = list(PeftType)
    import ders_peft as again  # a plain re-import is a no-op

    assert again is ders_peft
    for _ in range(2):
        importlib.reload(ders_peft)
    assert list(PeftType) == members_before
    assert [m for m in PeftType if m.value == "DERS"] == [PeftType.DERS]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.DERS] is ders_peft.DeRSConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DERS] is ders_peft.DeRSModel
    assert sum(cb.__name__ == "DeRSTrainerCallback" for cb in DEFAULT_CALLBACKS) == 1
    assert getattr(PeftModel.create_or_update_model_card, "_ders_hook", False)
    assert not getattr(PeftModel.create_or_update_model_card.__wrapped__, "_ders_hook", False)

    peft_model = get_peft_model(tiny_model("llama"), ders_peft.DeRSConfig(num_experts=2, top_k=1))
    assert len(ders_layers(peft_model)) == 2
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text().count(CARD_HEADING) == 1
    assert (logits(PeftModel.from_pretrained(tiny_model("llama"), root / "adapter")) - want).abs().max().item() == 0.0


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import peft, transformers
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel

    base_dir, adapter_dir = sys.argv[1], sys.argv[2]
    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = "loaded"
        except Exception as err:  # record what the user sees
            results[name] = f"{type(err).__name__}: {err}"

    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir)

    def load_all(tag):
        attempt(tag + "PeftConfig.from_pretrained", lambda: PeftConfig.from_pretrained(adapter_dir))
        attempt(tag + "PeftModel.from_pretrained", lambda: PeftModel.from_pretrained(base(), adapter_dir))
        attempt(tag + "AutoPeftModelForCausalLM", lambda: AutoPeftModelForCausalLM.from_pretrained(adapter_dir))
        attempt(tag + "load_adapter", lambda: base().load_adapter(adapter_dir))
        attempt(tag + "AutoModelForCausalLM", lambda: transformers.AutoModelForCausalLM.from_pretrained(adapter_dir))

    load_all("")
    results["ders_peft imported before"] = "ders_peft" in sys.modules
    import ders_peft
    load_all("with import: ")
    for name in [m for m in sys.modules if m == "ders_peft" or m.startswith("ders_peft.")]:
        del sys.modules[name]
    import ders_peft
    load_all("fresh re-import: ")
    results["DERS members"] = [m.name for m in peft.utils.PeftType if m.value == "DERS"]
    print("RESULTS" + json.dumps(results))
    """
)


def test_without_the_import_and_after_a_fresh_reimport(saved):
    """Without `import ders_peft` peft cannot know the method: every entry point stops with KeyError 'DERS' (the
    plugin cannot influence this; its README says to import it). After the import, and after a fresh re-import of
    the whole package, every entry point loads."""
    root, _ = saved
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, str(root / "base"), str(root / "adapter")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    entry_points = [
        "PeftConfig.from_pretrained",
        "PeftModel.from_pretrained",
        "AutoPeftModelForCausalLM",
        "load_adapter",
        "AutoModelForCausalLM",
    ]
    assert results.pop("ders_peft imported before") is False
    assert results.pop("DERS members") == ["DERS"]
    for name in entry_points:
        assert results[name] == "KeyError: 'DERS'", (name, results[name])
        assert results["with import: " + name] == "loaded", (name, results["with import: " + name])
        assert results["fresh re-import: " + name] == "loaded", (name, results["fresh re-import: " + name])


def test_checkpoint_that_does_not_fit_the_model(saved, tmp_path):
    root, _ = saved
    # the adapter records what it was made on: another FFN size or block count is refused before any layer is built
    with pytest.raises(ValueError, match=r"made on another model .*ffn_shapes: adapter .*'gate_proj': \[48, 32\]"):
        PeftModel.from_pretrained(tiny_model("llama", inter=64), root / "adapter")
    with pytest.raises(ValueError, match=r"made on another model .*num_blocks: adapter 2, this model 3"):
        PeftModel.from_pretrained(tiny_model("llama", layers=3), root / "adapter")
    # an adapter saved without that record (older ders_peft) is still checked tensor by tensor
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    for name, edit in (("legacy", {}), ("edited", {"num_experts": 4})):
        (tmp_path / name).mkdir()
        for f in ("adapter_model.safetensors", "README.md"):
            (tmp_path / name / f).write_bytes((root / "adapter" / f).read_bytes())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, "source_architecture": None, **edit}))
    with pytest.raises(ValueError, match=r"does not fit this model .*wrong shape") as info:
        PeftModel.from_pretrained(tiny_model("llama", inter=64), tmp_path / "legacy")
    assert "num_experts=3" in str(info.value) and "delta_type='sparse'" in str(info.value)
    with pytest.raises(ValueError, match=r"does not fit this model .*missing"):
        PeftModel.from_pretrained(tiny_model("llama", layers=3), tmp_path / "legacy")
    # a settings edit in adapter_config.json that changes tensor shapes is caught too
    with pytest.raises(ValueError, match=r"(?s)does not fit this model .*ders_router"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "edited")


def test_peft_version_is_the_supported_one():
    assert peft.__version__.startswith("0.21")
