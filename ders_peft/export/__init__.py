"""Export a DeRS-upcycled model as a standard transformers Mixture-of-Experts checkpoint.

Each routed expert's weights are synthesised as ``W_base + Delta_e`` (in fp32, then cast to the model's dtype), the
router is copied, and every non-FFN weight is carried over, so engines that only know standard architectures
(vLLM, SGLang, llama.cpp, TGI) can serve the trained model. A target is offered only where the mapping is exact; any
other combination is refused with a ``ValueError`` naming the reason, before anything is written.

Supported (source ``model_type``, options) -> target (the README has the full matrix with the refusals):

- llama / mistral, every block upcycled, no universal FFN, ``normalize_top_k=True`` -> ``mixtral``
- llama / mistral / qwen2, any subset of blocks, with or without the universal FFN -> ``qwen2_moe`` (dense blocks
  become ``mlp_only_layers``; the universal FFN becomes the shared expert behind a gate of 1e-20 weights,
  sigmoid = 0.5 exactly, and the routed half's 0.5 is folded into the experts' down projections; Llama/Mistral get
  zero q/k/v biases)
- qwen3, any subset of blocks, no universal FFN -> ``qwen3_moe``
- granite, every block upcycled, ``normalize_top_k=True`` -> ``granitemoe`` (no universal FFN) or
  ``granitemoeshared`` (the universal FFN is the ungated shared MLP; both halves' 0.5 go into the down projections)

One module per step: ``targets`` (what each target expresses, which sources map where), ``plan`` (checks and the
target config), ``weights`` (expert synthesis, :func:`convert_to_moe`), ``writing`` (:func:`export_moe`: check,
model card, tokenizer, destination), ``compatibility`` (:func:`engine_compatibility`: which serving engines run an
export exactly). Patch a step's module (e.g. ``ders_peft.export.writing.VERIFY_TOLERANCE``), not this package.
"""

from .compatibility import ENGINES, EngineCompatibilityWarning, engine_compatibility
from .plan import ExportPlan, _unwrap, plan_export
from .targets import ARCHITECTURES, SHARED_GATE_ZERO, SOURCE_TARGETS, TARGETS, TargetSpec
from .weights import _plain_state, convert_to_moe, expert_tensors
from .writing import EXPORT_OWNER, VERIFY_TOLERANCE, ExportCheckError, check_export_dir, export_moe, model_card

__all__ = [
    "ARCHITECTURES",
    "ENGINES",
    "EXPORT_OWNER",
    "SHARED_GATE_ZERO",
    "SOURCE_TARGETS",
    "TARGETS",
    "VERIFY_TOLERANCE",
    "EngineCompatibilityWarning",
    "ExportCheckError",
    "ExportPlan",
    "TargetSpec",
    "_plain_state",
    "_unwrap",
    "check_export_dir",
    "convert_to_moe",
    "engine_compatibility",
    "expert_tensors",
    "export_moe",
    "model_card",
    "plan_export",
]
