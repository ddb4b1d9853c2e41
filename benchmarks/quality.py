"""Quality on real text: continued training of a small pretrained Llama on a held-apart code domain, per method.

The base is :func:`ders_peft.local_corpus.pretrained_base` (a tiny Llama + byte-level BPE tokenizer pretrained on the
``pydoc_data`` documentation and most of the standard library's source; cached on disk). The new domain is the source
of :data:`ders_peft.local_corpus.CODE_DOMAIN_PACKAGES` (``asyncio``, ``email``, ``json``, ...), never seen in
pretraining, split by file into train / validation / test.

Every arm gets the same continued-training run: the same token budget, the same batches in the same order (per seed),
the same AdamW schedule (:func:`ders_peft.local_corpus.pretrain`: linear warm-up, cosine decay, clipping), the same
base learning rate. Arms: dense full fine-tuning, LoRA on the MLP (rank matched to DeRS-LM r=4's added parameters, and
to its trainable parameters), vanilla upcycling, DeRS-LM r=1 / r=4, DeRS-SM 0.999 / 0.9, DeRS-LM with a frozen base,
extended DeRS (universal FFN). Hyper-parameters are chosen on the validation split only, in three stages:

1. the base learning rate, on dense fine-tuning;
2. the multiplier of the new parameters: ``delta_scale`` for DeRS (swept on LM r=4 and on SM 0.9; LM r=1, the
   frozen-base, extended and whole-model LM arms reuse LM r=4's value, SM 0.999 reuses SM 0.9's; in the 2026-11-23
   run, which swept LM r=1 and the frozen base on their own, both chose LM r=4's value), LoRA's ``alpha / r`` (each
   LoRA rank on its own); under Adam each acts as a learning-rate multiplier of those tensors; the two MLP-side arms
   without such a knob (MLP-only dense fine-tuning, vanilla upcycling) get a learning-rate multiplier swept instead,
   so that no arm wins merely by a larger effective step on the MLP. A grid whose edge wins is extended past it;
3. every arm with every seed at the chosen settings (the seed-0 runs of stages 1-2 are reused, not rerun).

Sweep runs do not evaluate the test split: they save their trained tensors beside their result, and the test loss is
computed from those (in a fresh process, on the rebuilt arm) only for the runs the tables report.

Stages 2-3 run as one thread per multiplier family (its sweep, then its arms' runs), sharing ``--jobs`` run slots,
so no slot waits for another family's sweep. Each run executes in its own process (``--threads`` torch threads),
forked from a server that has already imported torch / transformers / peft / ders_peft (saving ~10 s of imports per
run), so the peak resident set (VmHWM, reset just before the model is built) is that run's alone. Reported per arm:
held-out test loss and perplexity (mean and spread over seeds), validation loss, added / trainable parameters
(``parameter_report``), tokens per second of wall-clock and of process CPU time, peak RSS. Finished runs are stored
under the cache directory and reused on a rerun with identical settings (``--fresh`` ignores them). The "added
parameters" ratio of vanilla upcycling to DeRS-LM is also computed at real model sizes from models built on the meta
device. Pretraining the base (first run only; cached) uses every core.

Usage: ``python benchmarks/quality.py [--quick] [--out docs/benchmarks_quality.json] [--jobs 2] [--threads 1]``.
Writes the JSON of raw results and a PNG plot (held-out loss vs added parameters) next to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import statistics
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft import local_corpus as lc  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft on 5.x
transformers.utils.logging.disable_progress_bar()

_FORMAT = 3  # bump when a change would make stored runs incomparable
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def library_digest() -> str:
    """Content hash of the ``ders_peft`` sources in use: runs of different library code are never mixed."""
    digest = hashlib.sha256()
    for path in sorted(Path(ders_peft.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def code_digest() -> str:
    """:func:`library_digest` plus this script and its helpers: every run process re-reads them, so an edit made
    while the benchmark runs must stop it rather than mix versions."""
    here = Path(__file__).resolve().parent
    scripts = b"".join((here / name).read_bytes() for name in ("quality.py", "_common.py"))
    return hashlib.sha256(library_digest().encode() + scripts).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Settings and arms
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that defines the benchmark's numbers (hashed into the run-store key)."""

    base: dict = field(default_factory=lambda: {"steps": 300, "seq_len": 128, "hidden_size": 128, "num_layers": 4})
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 100
    num_experts: int = 8
    top_k: int = 2
    train_chars: int | None = None  # None: the whole train split
    max_eval_blocks: int | None = None  # None: the whole validation / test split
    split_seed: int = 0
    seeds: tuple[int, ...] = (0, 1)
    lr_grid: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    scale_grid: tuple[float, ...] = (1.0, 4.0, 16.0)
    weight_decay: float = 0.0

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len


QUICK = Settings(
    base={
        "steps": 10,
        "seq_len": 64,
        "hidden_size": 32,
        "num_layers": 2,
        "max_chars": 200_000,
        "vocab_size": 512,
        "batch_size": 8,
    },
    seq_len=64,
    batch_size=4,
    steps=3,
    num_experts=4,
    train_chars=60_000,
    max_eval_blocks=8,
    seeds=(0,),
    lr_grid=(1e-3,),
    scale_grid=(1.0,),  # one point: no sweep runs for the delta_scale / LoRA families (the lr-multiplier families
    # still sweep LR_SCALE_GRID with its extensions, so the sweep code runs)
)


@dataclass(frozen=True)
class Arm:
    """One method. ``family`` names the multiplier sweep it uses ("" = none: only the base learning rate)."""

    name: str
    label: str
    kind: str  # "dense" | "dense_mlp" | "lora" | "ders"
    family: str = ""
    ders: tuple[tuple[str, object], ...] = ()  # DeRSConfig keyword arguments (besides N, top-k, seed, delta_scale)
    lora_match: str = ""  # "added" | "trainable": match DeRS-LM r=4's count of that kind
    train_rest: bool = False  # also train every non-MLP parameter of the dense model in place (whole-model training)
    scale_is_lr: bool = False  # the swept multiplier scales the learning rate (arms without a scale knob of their own)


ARMS: tuple[Arm, ...] = (
    Arm("dense", "Dense full fine-tuning", "dense"),
    Arm("dense_mlp", "Dense fine-tuning of the MLPs only", "dense_mlp", "mlp_lr", scale_is_lr=True),
    Arm("lora_added", "LoRA (MLP), added-matched", "lora", "lora", lora_match="added"),
    Arm("lora_trainable", "LoRA (MLP), trainable-matched", "lora", "lora_t", lora_match="trainable"),
    Arm("vanilla", "Vanilla upcycling", "ders", "van_lr", (("delta_type", "full"),), scale_is_lr=True),
    Arm("lm_r1", "DeRS-LM r=1", "ders", "lm", (("delta_type", "lowrank"), ("rank", 1))),
    Arm("lm_r4", "DeRS-LM r=4", "ders", "lm", (("delta_type", "lowrank"), ("rank", 4))),
    Arm("sm_0.999", "DeRS-SM 0.999", "ders", "sm", (("delta_type", "sparse"), ("sparse_rate", 0.999))),
    Arm("sm_0.9", "DeRS-SM 0.9", "ders", "sm", (("delta_type", "sparse"), ("sparse_rate", 0.9))),
    Arm(
        "lm_r4_frozen",
        "DeRS-LM r=4, frozen base",
        "ders",
        "lm",
        (("delta_type", "lowrank"), ("rank", 4), ("train_base", False)),
    ),
    Arm(
        "ext_lm_r4",
        "Extended DeRS-LM r=4 (universal FFN)",
        "ders",
        "lm",
        (("delta_type", "lowrank"), ("rank", 4), ("shared_expert", True)),
    ),
    Arm(
        "vanilla_all", "Vanilla upcycling, whole model trained", "ders", "", (("delta_type", "full"),), train_rest=True
    ),
    Arm(
        "lm_r4_all",
        "DeRS-LM r=4, whole model trained",
        "ders",
        "lm",
        (("delta_type", "lowrank"), ("rank", 4)),
        train_rest=True,
    ),
)
ARM_BY_NAME = {arm.name: arm for arm in ARMS}
#: The arm each multiplier sweep is run on; the rest of the family reuses the choice.
SWEEP_ARM = {
    "lm": "lm_r4",
    "sm": "sm_0.9",
    "lora": "lora_added",
    "lora_t": "lora_trainable",
    "mlp_lr": "dense_mlp",
    "van_lr": "vanilla",
}
#: Grid (and extension factor) of the learning-rate multipliers of ``scale_is_lr`` arms; others use ``scale_grid``.
LR_SCALE_GRID, LR_SCALE_FACTOR = (0.5, 1.0, 2.0), 2.0
LR_SWEEP_ARM = "dense"
REFERENCE_LM = "lm_r4"  # LoRA ranks are matched to this arm's counts
MAX_EXTENSIONS = 2  # a sweep grid is extended at most this many times past a winning edge


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    lr: float
    scale: float = 1.0  # delta_scale (DeRS) or alpha / r (LoRA); unused for dense and vanilla
    lora_rank: int = 0

    @property
    def key(self) -> str:
        return f"{self.arm}-s{self.seed}-lr{self.lr:g}-x{self.scale:g}-r{self.lora_rank}"


# ----------------------------------------------------------------------------------------------------------------
# Models and parameter counts
# ----------------------------------------------------------------------------------------------------------------


def ders_config(arm: Arm, settings: Settings, seed: int, scale: float) -> ders_peft.DeRSConfig:
    kwargs = dict(arm.ders)
    if kwargs.get("delta_type") != "full":
        kwargs["delta_scale"] = scale
    return ders_peft.DeRSConfig(
        target_modules=["mlp"],
        num_experts=settings.num_experts,
        top_k=settings.top_k,
        seed=seed,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def lora_params_per_rank(config: transformers.LlamaConfig) -> int:
    """LoRA parameters per unit of rank on the three MLP projections of every block: r * (in + out) each."""
    h, i = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * 3 * (h + i)


def lora_rank_for(config: transformers.LlamaConfig, target: int) -> int:
    """The LoRA rank whose MLP LoRA has the parameter count closest to ``target`` (capped at full rank)."""
    full_rank = min(config.hidden_size, config.intermediate_size)
    return max(1, min(full_rank, round(target / lora_params_per_rank(config))))


def build_model(base: torch.nn.Module, arm: Arm, spec: RunSpec, settings: Settings) -> torch.nn.Module:
    """The trainable model of an arm (``base`` is modified in place by peft for LoRA/DeRS)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)  # LoRA's A initialisation draws from the global generator
    if arm.kind == "dense":
        return base
    if arm.kind == "dense_mlp":  # the parameters every other arm adapts, trained in place
        for name, param in base.named_parameters():
            param.requires_grad_(".mlp." in name)
        return base
    if arm.kind == "lora":
        cfg = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.scale * spec.lora_rank,
            lora_dropout=0.0,
            target_modules=list(MLP_PROJS),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(base, cfg)
    model = get_peft_model(base, ders_config(arm, settings, spec.seed, spec.scale))
    if arm.train_rest:  # attention, norms, embeddings, head: trained in place (the frozen dense MLPs stay frozen)
        for name, param in model.named_parameters():
            if ".mlp." not in name:
                param.requires_grad_(True)
    return model


def count_params(model: torch.nn.Module, arm: Arm) -> dict:
    """Added (over the dense model), trainable and stored parameter counts of a built arm."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(p.numel() for p in model.parameters())
    if arm.kind == "ders":
        report = ders_peft.parameter_report(model)
        return {
            "added": report.added_params,
            "trainable": report.trainable_params,
            "stored": report.stored_params,
            "dense": report.dense_params,
            "index_bytes": report.index_bytes,
        }
    added = trainable if arm.kind == "lora" else 0
    return {"added": added, "trainable": trainable, "stored": stored, "dense": stored - added, "index_bytes": 0}


def meta_counts(config: transformers.LlamaConfig, arm: Arm, settings: Settings) -> dict:
    """Parameter counts of a DeRS arm from a model built on the meta device (nothing allocated)."""
    from peft import get_peft_model

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = get_peft_model(model, ders_config(arm, settings, 0, 1.0))
    return count_params(model, arm)


def top_energy_fraction(matrix: torch.Tensor, k: int) -> float:
    """Share of ``||matrix||_F^2`` in its ``k`` largest singular directions (1.0 for a matrix of rank <= k)."""
    s2 = torch.linalg.svdvals(matrix.double()) ** 2
    return float(s2[:k].sum() / s2.sum())


def delta_usage(model: torch.nn.Module, dense_state: dict[str, torch.Tensor]) -> dict:
    """How far training moved the experts, relative to the dense FFN weights (averaged over layers and matrices).

    ``base_drift``: ||W_base - W_dense|| / ||W_dense|| (the shared base copy; for vanilla the expert mean);
    ``delta_norm``: mean over experts of ||Delta_e|| / ||W_dense|| (vanilla: ||W_e - mean_e W_e||), i.e. how much the
    experts differ from what they share. For vanilla experts also ``top1_energy`` / ``top4_energy``: the share of each
    expert's deviation from the expert mean that lies in its top 1 / 4 singular directions (what a rank-1 / rank-4
    delta could express), and ``random_top4_energy``, the same share for a Gaussian matrix of the same shape.
    """
    drift, delta, top1, top4, rand4 = [], [], [], [], []
    generator = torch.Generator().manual_seed(0)
    for name, layer in model.base_model.ders_layers().items():
        adapter = layer.active_adapters[0]
        experts = layer.expert_weights(adapter)
        for proj, weights in experts.items():
            key = name.removeprefix("base_model.model.") + f".{proj}.weight"
            w0 = dense_state[key].float()
            norm0 = w0.norm().item()
            full = layer.ders_delta[adapter][proj].replaces_base
            base = weights.mean(0) if full else layer.base_weight(adapter, proj).detach().float()
            drift.append((base - w0).norm().item() / norm0)
            delta.append(sum((w - base).norm().item() for w in weights) / len(weights) / norm0)
            if full:
                top1 += [top_energy_fraction(w - base, 1) for w in weights]
                top4 += [top_energy_fraction(w - base, 4) for w in weights]
                rand4.append(top_energy_fraction(torch.randn(w0.shape, generator=generator), 4))
    usage = {"base_drift": statistics.fmean(drift), "delta_norm": statistics.fmean(delta)}
    if top1:
        usage |= {
            "top1_energy": statistics.fmean(top1),
            "top4_energy": statistics.fmean(top4),
            "random_top4_energy": statistics.fmean(rand4),
        }
    return usage


# ----------------------------------------------------------------------------------------------------------------
# One run (inside a worker process, or in-process in quick mode)
# ----------------------------------------------------------------------------------------------------------------


def run_one(
    spec: RunSpec, settings: Settings, base_dir: str, data_path: str, threads: int, state_path: str | None = None
) -> dict:
    """Build the arm on a freshly loaded base, train it, evaluate validation and test loss, measure cost.

    With ``state_path`` the test loss is left out and the trained tensors are saved there instead (a sweep run:
    :func:`evaluate_stored_run` evaluates its test loss later, only if the run is chosen).
    """
    torch.set_num_threads(threads)
    arm = ARM_BY_NAME[spec.arm]
    data = torch.load(data_path)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dense_state = {k: v.detach().clone() for k, v in base.state_dict().items() if "mlp" in k}

    rss_start = _common.current_rss_mb()
    exact_peak = _common.reset_peak_rss()
    model = build_model(base, arm, spec, settings)
    counts = count_params(model, arm)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    losses = lc.pretrain(
        model,
        data["train"],
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=spec.lr * spec.scale if arm.scale_is_lr else spec.lr,
        seed=spec.seed,
        weight_decay=settings.weight_decay,
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = _common.peak_rss_mb()

    result = {
        "spec": asdict(spec),
        "params": counts,
        "val_loss": lc.evaluate_loss(model, data["val"]),
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
        "tokens_per_s": settings.tokens_per_run / wall,
        "tokens_per_cpu_s": settings.tokens_per_run / cpu,
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak,
        "peak_over_start_mb": peak - rss_start,
        "peak_counter": "VmHWM reset before build" if exact_peak else "ru_maxrss",
        "loadavg_1min": _common.machine_note()["loadavg_1_5_15"][0],
    }
    if arm.kind == "ders":
        result["usage"] = delta_usage(model, dense_state)
    if state_path is None:
        result |= _test_metrics(model, data["test"])
    else:
        tmp = Path(f"{state_path}.tmp")
        torch.save(trained_state(model), tmp)
        tmp.replace(state_path)
    return result


def _test_metrics(model: torch.nn.Module, blocks: torch.Tensor) -> dict:
    loss = lc.evaluate_loss(model, blocks)
    return {"test_loss": loss, "test_ppl": math.exp(loss)}


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and every buffer: with the arm's seed, enough to rebuild the trained model."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return state | {name: b.detach().clone() for name, b in model.named_buffers()}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(tensors))
    if unknown:
        raise KeyError(f"stored tensors missing from the rebuilt model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def evaluate_stored_run(
    spec: RunSpec, settings: Settings, base_dir: str, data_path: str, threads: int, state_path: str
) -> dict:
    """Test loss of a finished sweep run: rebuild its arm on a fresh base, load its trained tensors, evaluate."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = build_model(base, ARM_BY_NAME[spec.arm], spec, settings)
    load_trained_state(model, torch.load(state_path))
    return _test_metrics(model, torch.load(data_path)["test"]) | {"test_eval_seconds": time.perf_counter() - start}


def run_job(job: dict) -> dict:
    """One run in a child process; refused if ``ders_peft`` or this script changed since the benchmark started."""
    if job["code"] != code_digest():
        raise RuntimeError(f"ders_peft ({ders_peft.__file__}) or {__file__} changed since the benchmark started")
    args = (RunSpec(**job["spec"]), settings_from_dict(job["settings"]), job["base_dir"], job["data_path"])
    if job["mode"] == "test":
        return evaluate_stored_run(*args, job["threads"], job["state_path"])
    start = time.perf_counter()
    result = run_one(*args, job["threads"], job["state_path"])
    result["run_wall_seconds"] = time.perf_counter() - start
    return result


def _child_main(job: dict, conn) -> None:
    try:
        conn.send(("ok", run_job(job)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def settings_from_dict(d: dict) -> Settings:
    tuples = ("seeds", "lr_grid", "scale_grid")
    return Settings(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------

#: Imported once by the fork server, so a run's process starts in milliseconds instead of ~10 s of imports.
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "ders_peft", "__main__"]


class Runner:
    """Runs specs, ``jobs`` at a time, each in a fresh process forked from a pre-imported server.

    One process per run keeps each run's peak memory (VmHWM) its own. Every result is stored as JSON, so a rerun
    with identical settings skips it (unless ``fresh``). ``run`` may be called from several threads at once: a spec
    asked for twice runs once.
    """

    def __init__(self, settings, base_dir, data_path, store: Path, threads, jobs, fresh, log) -> None:
        self.settings, self.base_dir, self.data_path = settings, str(base_dir), str(data_path)
        self.store, self.threads, self.fresh, self.log = store, threads, fresh, log
        self.store.mkdir(parents=True, exist_ok=True)
        self.code = code_digest()
        self.results: dict[str, dict] = {}
        self._futures: dict[tuple[str, bool], concurrent.futures.Future] = {}  # by (spec key, with test loss)
        self._lock = threading.Lock()
        self._failed: str | None = None  # the first failed run: later runs are not started
        self._slots = concurrent.futures.ThreadPoolExecutor(max(1, jobs), thread_name_prefix="run")
        if "forkserver" in multiprocessing.get_all_start_methods():
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)
        else:  # e.g. Windows: a fresh interpreter per run (slower start, same results)
            self._context = multiprocessing.get_context("spawn")

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self._slots.shutdown(wait=exc[0] is None, cancel_futures=True)

    def _path(self, spec: RunSpec) -> Path:
        return self.store / f"{spec.key}.json"

    def _child(self, job: dict, name: str) -> dict:
        receive, send = self._context.Pipe(duplex=False)
        proc = self._context.Process(target=_child_main, args=(job, send), name=name)
        proc.start()
        send.close()
        try:
            status, payload = receive.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"run {name} died without a result (exit code {proc.exitcode})") from None
        proc.join()
        if status != "ok":
            raise RuntimeError(f"run {name} failed:\n{payload}")
        return payload

    def _execute(self, spec: RunSpec, test: bool, earlier: concurrent.futures.Future | None) -> dict:
        if self._failed is not None:
            raise RuntimeError(f"not started: run {self._failed} failed")
        try:
            return self._execute_unchecked(spec, test, earlier)
        except BaseException:
            self._failed = self._failed or spec.key
            raise

    def _execute_unchecked(self, spec: RunSpec, test: bool, earlier: concurrent.futures.Future | None) -> dict:
        if earlier is not None:  # the same spec is already running in the other mode: reuse it
            earlier.result()
        previous = self.results.get(spec.key)
        if previous is not None and (not test or "test_loss" in previous):
            return previous
        state_path = self.store / f"{spec.key}.pt"
        job = {
            "spec": asdict(spec),
            "settings": asdict(self.settings),
            "base_dir": self.base_dir,
            "data_path": self.data_path,
            "threads": self.threads,
            "code": self.code,
            "mode": "train",
            "state_path": None if test else str(state_path),
        }
        if previous is not None and state_path.is_file():  # a sweep run chosen for the tables: its test loss
            result = previous | self._child(job | {"mode": "test", "state_path": str(state_path)}, spec.key)
            _common.write_json(self._path(spec), result)
            state_path.unlink()
            self.results[spec.key] = result
            self.log(f"  {spec.key}: test {result['test_loss']:.4f} (stored sweep run)")
            return result
        result = self._child(job, spec.key)
        _common.write_json(self._path(spec), result)
        self.results[spec.key] = result
        test_note = f" test {result['test_loss']:.4f}" if "test_loss" in result else ""
        self.log(
            f"  {spec.key}: val {result['val_loss']:.4f}{test_note} ({result['train_seconds']:.0f} s train, "
            f"{result['train_cpu_seconds']:.0f} cpu-s, peak +{result['peak_over_start_mb']:.0f} MB)"
        )
        return result

    def _stored(self, spec: RunSpec) -> dict | None:
        if spec.key not in self.results and self._path(spec).is_file() and not self.fresh:
            self.results[spec.key] = json.loads(self._path(spec).read_text())
            self.log(f"  {spec.key}: stored (val loss {self.results[spec.key]['val_loss']:.4f})")
        return self.results.get(spec.key)

    def _submit(self, spec: RunSpec, test: bool) -> concurrent.futures.Future:
        with self._lock:
            key = (spec.key, test)
            if key not in self._futures:
                stored = self._stored(spec)
                if stored is not None and (not test or "test_loss" in stored):
                    future: concurrent.futures.Future = concurrent.futures.Future()
                    future.set_result(stored)
                else:
                    earlier = self._futures.get((spec.key, not test))
                    future = self._slots.submit(self._execute, spec, test, earlier)
                self._futures[key] = future
            return self._futures[key]

    def run(self, specs: list[RunSpec], test: bool = True) -> list[dict]:
        """Results of ``specs`` (in order), running those not stored; blocks until all are done. ``test=False``
        (sweeps) leaves the test loss out until a later ``run`` asks for it."""
        return [future.result() for future in [self._submit(spec, test) for spec in specs]]


def choose(results: list[dict], values: list[float]) -> tuple[float, dict[str, float]]:
    """The value with the lowest validation loss, and the validation loss of every value (sorted by value)."""
    pairs = sorted(zip(values, results), key=lambda vr: vr[0])
    by_value = {f"{v:g}": r["val_loss"] for v, r in pairs}
    best = min(pairs, key=lambda vr: vr[1]["val_loss"])[0]
    return best, by_value


def grid_extension(values: list[float], best: float, factor: float) -> float | None:
    """A value beyond the grid edge when the best value sits on that edge (``factor`` times past it), else None."""
    if len(values) < 2:
        return None
    if best == max(values):
        return best * factor
    if best == min(values):
        return best / factor
    return None


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def aggregate(arm: Arm, runs: list[dict]) -> dict:
    first = runs[0]
    return {
        "arm": arm.name,
        "label": arm.label,
        "spec": {k: v for k, v in first["spec"].items() if k != "seed"},
        "seeds": [r["spec"]["seed"] for r in runs],
        "test_loss": summarize([r["test_loss"] for r in runs]),
        "test_ppl": summarize([r["test_ppl"] for r in runs]),
        "val_loss": summarize([r["val_loss"] for r in runs]),
        "params": first["params"],
        "tokens_per_s": summarize([r["tokens_per_s"] for r in runs]),
        "tokens_per_cpu_s": summarize([r["tokens_per_cpu_s"] for r in runs]),
        "peak_over_start_mb": summarize([r["peak_over_start_mb"] for r in runs]),
        "peak_rss_mb": summarize([r["peak_rss_mb"] for r in runs]),
        "usage": _mean_usage(runs),
    }


def _mean_usage(runs: list[dict]) -> dict | None:
    if "usage" not in runs[0]:
        return None
    return {k: statistics.fmean(r["usage"][k] for r in runs) for k in runs[0]["usage"]}


REAL_SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "StableLM-2-1.6B shape": (2048, 5632, 24, 32, 32, 100352),
    "Llama-2-7B shape": (4096, 11008, 32, 32, 32, 32000),
    "Llama-3-8B shape": (4096, 14336, 32, 32, 8, 128256),
}


def real_size_ratios(settings: Settings, base_config: transformers.LlamaConfig) -> list[dict]:
    """Added parameters of vanilla upcycling vs DeRS-LM r=1 / r=4 (same N, top-k, all blocks) at several sizes."""
    shapes = {"this benchmark's base": base_config}
    for name, (h, i, n_layers, heads, kv, vocab) in REAL_SIZES.items():
        shapes[name] = transformers.LlamaConfig(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=vocab,
        )
    rows = []
    for name, config in shapes.items():
        counts = {a: meta_counts(config, ARM_BY_NAME[a], settings) for a in ("vanilla", "lm_r1", "lm_r4")}
        rows.append(
            {
                "model": name,
                "hidden": config.hidden_size,
                "intermediate": config.intermediate_size,
                "layers": config.num_hidden_layers,
                "dense_params": counts["vanilla"]["dense"],
                "vanilla_added": counts["vanilla"]["added"],
                "lm_r1_added": counts["lm_r1"]["added"],
                "lm_r4_added": counts["lm_r4"]["added"],
                "ratio_r1": counts["vanilla"]["added"] / counts["lm_r1"]["added"],
                "ratio_r4": counts["vanilla"]["added"] / counts["lm_r4"]["added"],
            }
        )
    return rows


def gain_fraction(reference: float, best: float, candidate: float) -> float:
    """Share of the loss reduction ``reference - best`` that ``candidate`` achieves (1 = as good as ``best``)."""
    return (reference - candidate) / (reference - best)


def goals(arms: dict[str, dict], ratios: list[dict]) -> list[dict]:
    """The issue's goals, evaluated from the measured numbers, plus the context needed to read them."""
    out = []
    van = arms["vanilla"]
    mlp = arms["dense_mlp"]["test_loss"]["mean"]
    gap_mlp = (mlp - van["test_loss"]["mean"]) / van["test_loss"]["mean"]
    out.append(
        {
            "goal": "(context) MLP-only dense fine-tuning, no experts at all, within 1% of vanilla's test loss",
            "value": f"{100 * gap_mlp:+.2f}%",
            "met": None,
        }
    )
    for lm in ("lm_r1", "lm_r4"):
        gap = (arms[lm]["test_loss"]["mean"] - van["test_loss"]["mean"]) / van["test_loss"]["mean"]
        ratio = van["params"]["added"] / arms[lm]["params"]["added"]
        out.append(
            {
                "goal": f"{ARM_BY_NAME[lm].label} within 1% of vanilla's test loss",
                "value": f"{100 * gap:+.2f}%",
                "met": gap <= 0.01,
            }
        )
        frac = gain_fraction(mlp, van["test_loss"]["mean"], arms[lm]["test_loss"]["mean"])
        out.append(
            {
                "goal": f"(context) {ARM_BY_NAME[lm].label}: share of vanilla's gain over MLP-only dense fine-tuning",
                "value": f"{100 * frac:.0f}%",
                "met": None,
            }
        )
        out.append(
            {
                "goal": f"{ARM_BY_NAME[lm].label}: >= 500x fewer added parameters than vanilla (this model)",
                "value": f"{ratio:.0f}x",
                "met": ratio >= 500,
            }
        )
    for row in ratios[1:]:
        out.append(
            {
                "goal": f">= 500x fewer added parameters at {row['model']} (N, top-k as here)",
                "value": f"r=1: {row['ratio_r1']:.0f}x, r=4: {row['ratio_r4']:.0f}x",
                "met": row["ratio_r1"] >= 500,
            }
        )
    whole = {name: arms[name]["test_loss"] for name in ("vanilla_all", "lm_r4_all")}
    out.append(
        {
            "goal": "(context) whole model trained: DeRS-LM r=4 minus vanilla, test loss (seed ranges)",
            "value": f"{whole['lm_r4_all']['mean'] - whole['vanilla_all']['mean']:+.4f} nats (ranges "
            f"{whole['lm_r4_all']['max'] - whole['lm_r4_all']['min']:.4f} / "
            f"{whole['vanilla_all']['max'] - whole['vanilla_all']['min']:.4f})",
            "met": None,
        }
    )
    for lora in ("lora_trainable", "lora_added"):
        diff = arms[REFERENCE_LM]["test_loss"]["mean"] - arms[lora]["test_loss"]["mean"]
        out.append(
            {
                "goal": f"{ARM_BY_NAME[REFERENCE_LM].label} better than {ARM_BY_NAME[lora].label}",
                "value": f"{diff:+.4f} nats (negative = DeRS better)",
                "met": diff < 0,
            }
        )
    return out


def tables(result: dict) -> str:
    """Markdown tables of the aggregated results."""
    arms = result["arms"]
    base = result["base_model"]
    header = [
        "arm",
        "test loss (mean ± sd)",
        "vs MLP-only dense",
        "test ppl",
        "val loss",
        "added params",
        "trainable params",
        "tokens/s (wall)",
        "tokens/cpu-s",
        "peak RSS over start (MB)",
    ]
    rows = [
        [
            "Base, no continued training",
            f"{base['test_loss']:.4f}",
            f"{base['test_loss'] - arms['dense_mlp']['test_loss']['mean']:+.4f}",
            f"{math.exp(base['test_loss']):.2f}",
            f"{base['val_loss']:.4f}",
            "0",
            "0",
            "-",
            "-",
            "-",
        ]
    ]
    for a in arms.values():
        t, p = a["test_loss"], a["params"]
        rows.append(
            [
                a["label"],
                f"{t['mean']:.4f} ± {t['std']:.4f} (n={t['n']})",
                f"{t['mean'] - arms['dense_mlp']['test_loss']['mean']:+.4f}",
                f"{a['test_ppl']['mean']:.2f}",
                f"{a['val_loss']['mean']:.4f}",
                f"{p['added']:,}",
                f"{p['trainable']:,}",
                f"{a['tokens_per_s']['mean']:,.0f}",
                f"{a['tokens_per_cpu_s']['mean']:,.0f}",
                f"{a['peak_over_start_mb']['mean']:.0f}",
            ]
        )
    parts = ["### Held-out results", _common.markdown_table(header, rows)]

    seed_rows = []
    for a in arms.values():
        t = a["test_loss"]
        seed_rows.append([a["label"], ", ".join(f"{v:.4f}" for v in t["values"]), f"{t['max'] - t['min']:.4f}"])
    parts += ["### Per-seed test loss", _common.markdown_table(["arm", "test loss per seed", "range"], seed_rows)]

    sweep_rows = []
    for stage, info in result["selection"].items():
        vals = ", ".join(f"{k}: {v:.4f}" for k, v in info["val_loss"].items())
        sweep_rows.append([stage, info["arm"], vals, f"{info['chosen']:g}"])
    parts += [
        "### Selection on the validation split (seed 0)",
        _common.markdown_table(["knob", "swept on", "val loss per value", "chosen"], sweep_rows),
    ]

    usage_rows = [
        [a["label"], f"{a['usage']['base_drift']:.4f}", f"{a['usage']['delta_norm']:.4f}"]
        for a in arms.values()
        if a["usage"]
    ]
    parts += [
        "### How far training moved the experts (relative Frobenius norms, mean over layers and matrices)",
        _common.markdown_table(["arm", "shared base drift", "expert delta norm"], usage_rows),
    ]
    spectrum_rows = [
        [
            a["label"],
            f"{a['usage']['top1_energy']:.3f}",
            f"{a['usage']['top4_energy']:.3f}",
            f"{a['usage']['random_top4_energy']:.3f}",
        ]
        for a in arms.values()
        if a["usage"] and "top1_energy" in a["usage"]
    ]
    parts += [
        "### Vanilla experts: share of each expert's deviation from the expert mean in its top singular directions",
        _common.markdown_table(["arm", "top 1", "top 4", "top 4 of a random matrix"], spectrum_rows),
    ]

    ratio_rows = [
        [
            r["model"],
            f"{r['hidden']}/{r['intermediate']}/{r['layers']}",
            _common.fmt_params(r["dense_params"]),
            _common.fmt_params(r["vanilla_added"]),
            _common.fmt_params(r["lm_r1_added"]),
            _common.fmt_params(r["lm_r4_added"]),
            f"{r['ratio_r1']:.0f}x",
            f"{r['ratio_r4']:.0f}x",
        ]
        for r in result["real_size_ratios"]
    ]
    parts += [
        "### Added parameters, vanilla vs DeRS-LM, at other sizes (meta device, same N and top-k, every block)",
        _common.markdown_table(
            [
                "model",
                "hidden/inter./layers",
                "dense",
                "vanilla added",
                "LM r=1 added",
                "LM r=4 added",
                "ratio r=1",
                "ratio r=4",
            ],
            ratio_rows,
        ),
    ]
    goal_rows = [[g["goal"], g["value"], {None: "-", True: "yes", False: "no"}[g["met"]]] for g in result["goals"]]
    parts += ["### Goals", _common.markdown_table(["goal", "measured", "met"], goal_rows)]
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> None:
    """Held-out loss vs added parameters: one panel for the arms that train only the MLP side (peft's default: the
    adapter alone trains), one for whole-model training. Markers are means over seeds, bars the min..max range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    arms = result["arms"]
    whole = [n for n in arms if ARM_BY_NAME[n].train_rest or ARM_BY_NAME[n].kind == "dense"]
    panels = {
        "only the MLP side trains (adapter / MLP weights)": [n for n in arms if n not in whole],
        "whole model trains": whole,
    }
    markers = "osD^v<>phX*P"
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.6))
    for ax, (title, names) in zip(axes, panels.items()):
        spans = []
        for i, name in enumerate(names):
            a, arm = arms[name], ARM_BY_NAME[name]
            t = a["test_loss"]
            spans += [t["min"], t["max"]]
            if arm.kind in ("dense", "dense_mlp"):  # adds nothing: a horizontal reference line
                ls = "--" if arm.kind == "dense" else "-."
                ax.axhline(t["mean"], color="tab:gray", ls=ls, lw=1.2, label=f"{a['label']} (adds 0; band = range)")
                ax.axhspan(t["min"], t["max"], color="tab:gray", alpha=0.12)
                continue
            err = [[t["mean"] - t["min"]], [t["max"] - t["mean"]]]
            marker = markers[i % len(markers)]
            ax.errorbar(a["params"]["added"], t["mean"], yerr=err, fmt=marker, ms=7, capsize=3, label=a["label"])
        lo, hi = min(spans), max(spans)
        pad = max(0.002, 0.08 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("added parameters (log scale)")
        ax.set_ylabel("held-out test loss (nats/token)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)  # off the data
    s = result["settings"]
    fig.suptitle(
        f"Continued training on held-apart stdlib code ({s['steps']} steps x {s['batch_size']} x {s['seq_len']} "
        f"tokens, N={s['num_experts']} top-{s['top_k']}); "
        f"base before training: {result['base_model']['test_loss']:.3f}; mean over seeds, bars = min..max",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_data(tokenizer, settings: Settings, path: Path) -> dict:
    train_files, val_files, test_files = lc.split_by_file(lc.code_domain_files(), seed=settings.split_seed)
    blocks = {
        "train": lc.pack_tokens(tokenizer, lc.read_texts(train_files, settings.train_chars), settings.seq_len),
        "val": lc.pack_tokens(tokenizer, lc.read_texts(val_files), settings.seq_len),
        "test": lc.pack_tokens(tokenizer, lc.read_texts(test_files), settings.seq_len),
    }
    if settings.max_eval_blocks is not None:
        blocks["val"] = blocks["val"][: settings.max_eval_blocks]
        blocks["test"] = blocks["test"][: settings.max_eval_blocks]
    torch.save(blocks, path)
    files = {"train": train_files, "val": val_files, "test": test_files}
    return {
        split: {"files": len(files[split]), "blocks": len(b), "tokens": b.numel()} for split, b in blocks.items()
    } | {"packages": list(lc.CODE_DOMAIN_PACKAGES)}


def sweep(runner: Runner, make, arm: str, grid: tuple[float, ...], factor: float) -> tuple[float, dict[str, float]]:
    """Sweep one knob of ``arm`` on ``grid``, extending it past an edge that wins (at most ``MAX_EXTENSIONS``
    times); returns the chosen value and the validation loss of every value tried."""
    values = list(grid)
    while True:
        best, by_value = choose(runner.run([make(arm, x) for x in values], test=False), values)
        extra = grid_extension(values, best, factor)
        if extra is None or len(values) >= len(grid) + MAX_EXTENSIONS:
            return best, by_value
        values.append(extra)


def tune_and_run(runner: Runner, settings: Settings, lora_rank: dict[str, int], log) -> tuple:
    """Stages 1-3 of the module docstring. Each multiplier family runs as its own thread (its sweep, then its arms'
    runs for every seed), so both run slots stay busy; returns (lr, multipliers, selection, final specs per arm)."""
    seed0 = settings.seeds[0]

    def spec(arm_name: str, seed: int, lr: float, scale: float = 1.0) -> RunSpec:
        arm = ARM_BY_NAME[arm_name]
        rank = lora_rank[arm.lora_match] if arm.kind == "lora" else 0
        return RunSpec(arm_name, seed, lr, scale if arm.family else 1.0, rank)

    log(f"stage 1: base learning rate on {LR_SWEEP_ARM}, grid {settings.lr_grid}")
    lr, vals = sweep(runner, lambda arm, x: spec(arm, seed0, x), LR_SWEEP_ARM, settings.lr_grid, 2.0)
    selection = {"base learning rate": {"arm": LR_SWEEP_ARM, "val_loss": vals, "chosen": lr}}
    log(
        f"stages 2-3 at lr {lr:g}: multiplier sweeps (grid {settings.scale_grid}; lr multipliers {LR_SCALE_GRID}), "
        f"then every arm x seeds {settings.seeds}"
    )

    def family_task(family: str) -> tuple[float, dict | None]:
        chosen, vals = 1.0, None
        if family:
            arm = ARM_BY_NAME[SWEEP_ARM[family]]
            grid, factor = (LR_SCALE_GRID, LR_SCALE_FACTOR) if arm.scale_is_lr else (settings.scale_grid, 4.0)
            chosen, vals = sweep(runner, lambda a, x: spec(a, seed0, lr, x), arm.name, grid, factor)
            log(f"  {family}: chose {chosen:g} ({vals})")
        runner.run([spec(a.name, s, lr, chosen) for a in ARMS if a.family == family for s in settings.seeds])
        return chosen, vals

    families = [*SWEEP_ARM, ""]  # the arms without a multiplier last: nothing waits for them
    with concurrent.futures.ThreadPoolExecutor(len(families), thread_name_prefix="family") as pool:
        outcomes = dict(zip(families, pool.map(family_task, families)))
    scale = {family: chosen for family, (chosen, _) in outcomes.items()}
    for family, arm_name in SWEEP_ARM.items():
        arm = ARM_BY_NAME[arm_name]
        what = "lr multiplier" if arm.scale_is_lr else "LoRA alpha / r" if arm.kind == "lora" else "delta_scale"
        selection[f"{what}, {arm.label}"] = {"arm": arm_name, "val_loss": outcomes[family][1], "chosen": scale[family]}
    log(f"chosen: lr {lr:g}, multipliers {scale}")
    final = {a.name: [spec(a.name, s, lr, scale[a.family]) for s in settings.seeds] for a in ARMS}
    return lr, scale, selection, final


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed (smoke test)")
    parser.add_argument(
        "--out",
        default=None,
        help="raw-results JSON, PNG beside it (default: docs/benchmarks_quality.json; --quick: a temporary folder)",
    )
    parser.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the base model and of runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs executed at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--fresh", action="store_true", help="ignore stored runs and rerun everything")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: 100; --quick: 3); same for every arm"
    )
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the existing --out JSON")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(_common.output_dir(None, args.quick and not args.replot) / "benchmarks_quality.json")
    if args.replot:
        out = Path(args.out)
        result = json.loads(out.read_text())
        plot(result, out.with_suffix(".png"))
        return result

    settings = QUICK if args.quick else Settings()
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be a positive integer, got {args.steps}")
        settings = replace(settings, steps=args.steps)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    cache = Path(args.cache).expanduser()  # pretraining and the base's evaluation use every core; runs use --threads
    base, tokenizer = lc.pretrained_base(cache, **settings.base, log_every=0 if args.quick else 50)
    base_dir = Path(base.name_or_path)
    base_meta = json.loads((base_dir / "ders_base.json").read_text())
    log(f"base: {base_meta['num_parameters']:,} parameters, pretraining val loss {base_meta['val_loss']:.3f}")

    library = library_digest()
    log(f"ders_peft {ders_peft.__file__}, source digest {library}")
    digest = hashlib.sha256(json.dumps([_FORMAT, asdict(settings), base_dir.name, library], sort_keys=True).encode())
    store = cache / f"quality-runs-{digest.hexdigest()[:12]}"
    store.mkdir(parents=True, exist_ok=True)
    data_path = store / "data.pt"
    data_info = prepare_data(tokenizer, settings, data_path)
    data = torch.load(data_path)
    base_losses = {"val_loss": lc.evaluate_loss(base, data["val"]), "test_loss": lc.evaluate_loss(base, data["test"])}
    log(f"data: {data_info}; base model test loss {base_losses['test_loss']:.4f}")

    # parameter counts of DeRS-LM r=4 (on the meta device) fix the two LoRA ranks
    ref = meta_counts(base.config, ARM_BY_NAME[REFERENCE_LM], settings)
    lora_rank = {
        "added": lora_rank_for(base.config, ref["added"]),
        "trainable": lora_rank_for(base.config, ref["trainable"]),
    }
    log(f"{REFERENCE_LM}: {ref['added']:,} added, {ref['trainable']:,} trainable -> LoRA ranks {lora_rank}")

    with Runner(settings, base_dir, data_path, store, args.threads, args.jobs, args.fresh, log) as runner:
        lr, scale, selection, final = tune_and_run(runner, settings, lora_rank, log)
    arms = {
        name: aggregate(ARM_BY_NAME[name], [runner.results[s.key] for s in specs]) for name, specs in final.items()
    }

    ratios = real_size_ratios(settings, base.config)
    result = {
        "command": "python benchmarks/quality.py" + (" --quick" if args.quick else "") + f" --jobs {args.jobs} "
        f"--threads {args.threads}" + (f" --steps {args.steps}" if args.steps is not None else ""),
        "machine": _common.machine_note(),
        "ders_peft_source_digest": library,
        "wall_seconds_total": None,
        "settings": asdict(settings) | {"tokens_per_run": settings.tokens_per_run},
        "base_model": {"dir": base_dir.name, "meta": base_meta, **base_losses},
        "data": data_info,
        "lora_ranks": lora_rank,
        "selection": selection,
        "chosen": {"lr": lr, "multipliers": scale},
        "sweep_arms": SWEEP_ARM,
        "lr_scale_grid": LR_SCALE_GRID,
        "arms": arms,
        "real_size_ratios": ratios,
        "runs": runner.results,
    }
    result["goals"] = goals(arms, ratios)
    result["wall_seconds_total"] = time.perf_counter() - t_start
    result["tables_markdown"] = tables(result)
    out = Path(args.out)
    _common.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(result["tables_markdown"])
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
