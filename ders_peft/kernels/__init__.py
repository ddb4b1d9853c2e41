"""Optional compiled CPU kernels, built on first use with the machine's C++ compiler.

:func:`enable_cpu_kernels` compiles ``bindings.cpp``, ``decode_cpu.cpp`` and ``train_cpu.cpp`` (once per machine and
torch version, about a minute; torch caches the build under ``~/.cache/torch_extensions``) and from then on, for
layers with a gated SiLU FFN, float32, on CPU, without biases:

- generation (``ders_peft.decode``): a low-rank or sparse layer's step for a few tokens, where the cost is the number
  of tensor operations rather than FLOPs, runs as one call (the big products as ATen matmuls, the per-slot work as
  plain loops);
- training and prefill (:mod:`.lowrank_train`): a low-rank layer's per-slot part, forward and backward, runs as
  compiled loops that keep each slot's intermediate row in registers.

Every other case keeps the Python path. Setting the environment variable ``DERS_PEFT_CPU_KERNELS=1`` enables them at
the first layer call that could use them.

Nothing here is needed: without a compiler the library runs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path
from types import ModuleType

ENV_VAR = "DERS_PEFT_CPU_KERNELS"
SOURCES = [Path(__file__).with_name(n) for n in ("bindings.cpp", "decode_cpu.cpp", "train_cpu.cpp")]
HEADERS = [Path(__file__).with_name("vec_math.h")]
_state: dict = {"enabled": None, "module": None}  # enabled: None until decided (env var read at first use)


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the CPU kernels; ``RuntimeError`` naming what is missing."""
    if _state["module"] is not None:
        return _state["module"]
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"ders_peft CPU kernels need a C++ compiler: {compiler!r} (the CXX variable) was not found")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ders_peft CPU kernels need ninja: pip install ninja (or the `kernels` extra)")
    if verbose:
        print("ders_peft: compiling the CPU kernels (once per machine, about a minute)...", flush=True)
    name, flags = _target()
    # torch rebuilds when a source or a flag changes, not a header: the headers' digest goes in as a flag
    headers = hashlib.sha1(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:12]
    cflags = ["-O3", "-fopenmp-simd", f"-DDERS_KERNEL_HEADERS={headers}", *flags]
    _state["module"] = cpp_extension.load(
        name=name, sources=[str(s) for s in SOURCES], extra_cflags=cflags, verbose=False
    )
    return _state["module"]


def _target() -> tuple[str, list[str]]:
    """Extension name and machine flags: on x86-64 Linux the build uses this CPU's vector instructions
    (``-march=native``), so its name carries a hash of the CPU's feature flags (a cache shared by different CPUs keeps
    one build per CPU kind)."""
    if platform.system() != "Linux" or platform.machine() not in {"x86_64", "AMD64"}:
        return "ders_peft_cpu_kernels", []
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "ders_peft_cpu_kernels", []
    digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
    # 512-bit vectors where the CPU has them (one A/B on a 2-core Xeon: the low-rank layer's fwd + bwd 1.11-1.13x
    # -> 1.07-1.10x the dense FFN with 256-bit vectors -> 512)
    return f"ders_peft_cpu_kernels_{digest}", ["-march=native", "-mprefer-vector-width=512"]


def enable_cpu_kernels(verbose: bool = True) -> None:
    """Build the CPU kernels if needed and use them from now on (in this process)."""
    build(verbose)
    _state["enabled"] = True


def disable_cpu_kernels() -> None:
    """Back to the Python paths (the build stays cached)."""
    _state["enabled"] = False


def cpu_kernels_enabled() -> bool:
    return bool(_state["enabled"])


def decode_kernel() -> ModuleType | None:
    """The compiled module when enabled, else ``None``. The first call reads :data:`ENV_VAR`; if it asks for the
    kernels and they cannot be built, one warning says why and the Python path is used."""
    if _state["enabled"] is None:
        _state["enabled"] = False
        if os.environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}:
            try:
                enable_cpu_kernels(verbose=True)
            except Exception as err:  # noqa: BLE001 - any build failure: say it once, keep the Python path
                warnings.warn(f"{ENV_VAR} is set but the CPU kernels could not be built: {err}", stacklevel=2)
    return _state["module"] if _state["enabled"] else None


__all__ = ["ENV_VAR", "build", "cpu_kernels_enabled", "decode_kernel", "disable_cpu_kernels", "enable_cpu_kernels"]
