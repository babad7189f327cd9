"""INT8 / INT4 weight-only products on x86 CPUs (decode rows and prefill), and bfloat16
products of a few rows: ``cpu_gemv.c``.

torch's packed CPU ops read INT8 / INT4 weights at 5-10 GB/s at one row on the
AVX-512 host (one thread), below what a float32 matmul reads, so quantized decode was no
faster per byte. ``cpu_gemv.c`` reads the stored weights (ds-quant's own layouts, no
prepacking) once for up to ``MAX_ROWS`` rows: 12-18 GB/s INT8 and 10-13 GB/s INT4 at
one row (small layers to a 32000-row LM head), against a 22-29 GB/s read stream
(``benchmarks/bench_matvec.py``); more rows run in passes of ``MAX_ROWS``, still faster
per row than the packed ops. Activation rows are quantized to int16 with one scale per
row inside the kernel, a finer rounding than the packed ops' bfloat16, and each row's
result is the same whatever rows share its call.

``bf16_gemv`` multiplies up to ``bf16_rows()`` bfloat16 rows by a bfloat16 weight with
AVX512-BF16 dot products (or by widening each weight to float32 where the CPU has none),
summing in float32: at one row it reads the weight 1.4-2.6x as fast as oneDNN's bfloat16
matmul, whose per-call cost at a few rows is above its weight's reading time.
``fp32_gemv`` does the same for up to ``fp32_rows()`` float32 rows by a float32 weight:
at one row it reads the weight 1.5-2.5x as fast as torch's float32 matmul (MKL). ds-model's
eager decode calls both for plain layers.
``rms_norm`` normalises a decode step's float32 or bfloat16 rows in one pass over each
(torch's CPU norm is six ops), for ds-model's eager ``RMSNorm``.

The kernels are torch ops (``ds_quant::int8_gemv_cpu``, ``ds_quant::int4_gemv_cpu`` and
their ``*_experts_*`` forms, which take a stack of expert weights and the expert of each
row, so a routed MoE token reads only its experts' bytes), registered from C++
(``cpu_gemv_ops.cpp``) so that eager and compiled code call them at the dispatcher's
cost. The library is compiled on first use with the machine's C++ compiler (``$CXX``,
else ``c++``), ``-O3 -march=native``, against the installed torch's headers, into
``$DS_QUANT_CACHE_DIR`` (default ``~/.cache/ds-quant``) under a name that hashes the
sources, the compiler, torch and the CPU. Where no compiler works, or the CPU has neither
AVX2 nor AVX512BW, ``available()`` is False and layers keep torch's ops;
``DS_QUANT_CPU_GEMV=0`` keeps them too (to compare, or where nothing may be compiled).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "MAX_ROWS",
    "NORM_ROWS",
    "available",
    "bf16_gemv",
    "bf16_gemv_reference",
    "bf16_rows",
    "bf16_takes",
    "experts_gemv",
    "experts_gemv_takes",
    "fp32_gemv",
    "fp32_gemv_reference",
    "fp32_rows",
    "fp32_takes",
    "int4_gemv",
    "int4_gemv_reference",
    "int4_takes",
    "int8_gemv",
    "int8_gemv_reference",
    "int8_takes",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_takes",
    "static_rows",
]

SOURCES = (Path(__file__).with_name("cpu_gemv.c"), Path(__file__).with_name("cpu_gemv_ops.cpp"))
# The rows one kernel pass takes (one copy of the inner loop per row count); more rows
# run in passes of this many. Every CPU row count runs here: at 32 and 256 rows
# (prefill, batched decode) the passes took 0.74-0.81x the time of torch's packed INT8
# op and 0.82-0.99x of its INT4 op (docs/benchmarks.md, "Decode products against the
# read stream": V3 110M layer shapes, one thread, EPYC-512), and torch's
# ops round activations to bfloat16 (relative error 2.4e-3 against 3e-5 here), so a
# token's logits would depend on how many rows shared its step.
MAX_ROWS = 8
# Activation dtypes it takes (computed in float32, returned in the input's dtype);
# float64 keeps the reference's precision.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The most rows rms_norm_takes accepts: a decode step's. The kernel runs on one thread
# (1.3-3.8x faster than torch's norm at 32 to 512 rows of 256 to 4096 features, one
# thread, EPYC-512); a prefill's norms, a small share of its time, keep torch's ops,
# which split rows over torch's threads.
NORM_ROWS = 64
MAX_GROUP = 32768  # INT4 groups past this could overflow the kernel's int32 group sums
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++20")


_available: bool | None = None  # set by the first available() call
_step: int = 64  # the INT4 group step, set with _available
_bf16_rows: int = 0  # the most rows bf16_takes accepts, set with _available
_fp32_rows: int = 0  # the most rows fp32_takes accepts, set with _available


def available() -> bool:
    """Whether the kernels are built and loaded for this CPU (builds them on first call).

    Traced code reads the answer of an earlier eager call (False if there was none):
    ``torch.compile`` cannot trace a build, and layers made on the CPU call this when
    they are quantized or allocated, so a compiled step finds it answered."""
    global _available, _step, _bf16_rows, _fp32_rows
    if torch.compiler.is_compiling():
        return _available is True
    if _available is None:
        isa = _load()
        # INT4 groups must hold two vector steps of int16 lanes: AVX-512 64, AVX2 32.
        _available, _step = isa > 0, 64 if isa >= 2 else 32
        _bf16_rows = torch.ops.ds_quant.cpu_gemv_bf16_rows() if isa > 0 else 0
        _fp32_rows = torch.ops.ds_quant.cpu_gemv_fp32_rows() if isa > 0 else 0
    return _available


@functools.cache
def _load() -> int:
    """The loaded library's instruction set (1 AVX2, 2 AVX512BW, 3 with VNNI), 0 if none."""
    if os.environ.get("DS_QUANT_CPU_GEMV", "1") == "0" or platform.machine().lower() not in (
        "x86_64",
        "amd64",
    ):
        return 0
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"ds_quant: the CPU decode kernel could not be built ({exc}); "
            "quantized layers use torch's packed ops, float layers torch's matmul",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0
    return torch.ops.ds_quant.cpu_gemv_isa()


def _build() -> Path:
    """The op library for these sources, compiler, torch and CPU: compiled once, then
    reused."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    key = hashlib.sha256()
    for part in (*(path.read_bytes() for path in SOURCES), compiler, version, *FLAGS, abi):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(f"{torch.__version__} {torch_dir}\n{_cpu_identity()}".encode())
    cache = _cache_dir()
    target = cache / f"cpu_gemv-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    # Compiled to a private name, then renamed: processes building at once (tensor-
    # parallel ranks) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    lib = torch_dir / "lib"
    command = [
        compiler, *FLAGS, abi, "-I", str(torch_dir / "include"), str(SOURCES[1]), "-o", tmp,
        "-L", str(lib), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    try:
        # OpenMP splits a layer's rows over torch's threads; compilers without it
        # (Apple clang) build the single-threaded kernel.
        for extra in (("-fopenmp",), ()):
            done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: a cache shared by machines must not hand one
    CPU's build to another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def _cache_dir() -> Path:
    base = os.environ.get("DS_QUANT_CACHE_DIR")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    path = root if base else root / "ds-quant"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:  # a read-only home: the temporary directory instead
        path = (
            Path(tempfile.gettempdir()) / f"ds-quant-{os.getuid() if hasattr(os, 'getuid') else 0}"
        )
        path.mkdir(mode=0o700, exist_ok=True)
        # The library is loaded from here: a directory another user made or can write
        # to could hand this process their code.
        info = path.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            raise OSError(
                f"{path} is not this user's own directory; set DS_QUANT_CACHE_DIR"
            ) from None
        return path


def static_rows(x: torch.Tensor) -> int | None:
    """The rows of ``x`` (..., features) if its leading sizes are static ints (traced
    code must not specialise a symbolic batch size), else None. While dynamo traces, a
    symbolic size reads as an int here: a dynamic batch's row count is then compared,
    and the graph guarded on the comparison (a caller tracing a dynamic batch decides by
    what it knows instead, as ``ds_model.matvec.MatVecLinears(few_rows=...)`` does)."""
    lead = x.shape[:-1]
    if not torch.compiler.is_compiling():  # eager sizes are ints
        return lead.numel()
    return lead.numel() if all(type(size) is int for size in lead) else None


def _no_grad(x: torch.Tensor) -> bool:
    """The kernels have no backward: an input that autograd tracks takes torch's ops."""
    return not (x.requires_grad and torch.is_grad_enabled())


def _kernel_rows(x: torch.Tensor) -> bool:
    """A CPU float input with rows (a traced batch size may be symbolic) outside
    autograd, and the kernel built."""
    # A decode layer's call is a few microseconds of Python around the kernel, as much
    # as a small layer's weight takes to read: the cheapest refusals come first.
    if not (x.is_cpu and x.dtype in DTYPES and x.shape[-1] > 0 and available()):
        return False
    return static_rows(x) != 0 and _no_grad(x)


def int8_takes(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``int8_gemv`` runs ``x`` (..., in) by the int8 weight ``q`` (out, in)."""
    return (
        _kernel_rows(x)
        and q.is_cpu
        and q.dtype == torch.int8
        and q.dim() == 2
        and q.stride(-1) == 1
    )


def int4_takes(x: torch.Tensor, group_size: int) -> bool:
    """Whether ``int4_gemv`` runs ``x`` (..., in) by a packed INT4 weight of
    ``group_size``: one the kernel's vector step divides (64 and up with AVX-512, 32 and
    up with AVX2), at most ``MAX_GROUP``."""
    return _kernel_rows(x) and group_size % _group_step() == 0 and group_size <= MAX_GROUP


def bf16_rows() -> int:
    """The most rows of a layer's input ``bf16_takes`` accepts: 4 where the CPU has
    AVX512-BF16 dot products, 1 with the widening form, 0 without the kernel. More rows
    are bound by arithmetic, where oneDNN's bfloat16 matmul is as fast or faster
    (``cpu_gemv.c``)."""
    available()
    return _bf16_rows


def bf16_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``bf16_gemv`` runs ``x`` (..., in) by ``weight`` (out, in): both bfloat16
    on the CPU, at most ``bf16_rows()`` rows of ``x``, outside autograd and CPU autocast."""
    return _float_takes(x, weight, torch.bfloat16) and 0 < (static_rows(x) or 0) <= _bf16_rows


def fp32_rows() -> int:
    """The most rows of a layer's input ``fp32_takes`` accepts: 4 (0 without the
    kernel). More rows are bound by arithmetic, where torch's float32 matmul is as fast
    or faster (``cpu_gemv.c``)."""
    available()
    return _fp32_rows


def fp32_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp32_gemv`` runs ``x`` (..., in) by ``weight`` (out, in): both float32
    on the CPU, ``weight`` row-major or input-major (the view of an (in, out) matrix), at
    most ``fp32_rows()`` rows of ``x``, outside autograd and CPU autocast."""
    return _float_takes(x, weight, torch.float32) and 0 < (static_rows(x) or 0) <= _fp32_rows


def _float_takes(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    # Asked once per layer of an eager decode step: the cheapest refusals come first,
    # and an answered available() is read without calling it.
    if x.dtype is not dtype or weight.dtype is not dtype:
        return False
    if not (x.is_cpu and weight.is_cpu and weight.dim() == 2):
        return False
    if weight.stride(-1) != 1 and not (dtype is torch.float32 and weight.stride(0) == 1):
        return False
    if weight.shape[-1] == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):  # the matmul it replaces would run in autocast's dtype
        return False
    return _available is True or available()


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) @ ``weight``^T -> (..., out), bfloat16 in and out, summed in
    float32 (AVX512-BF16 dot products, or each weight widened to float32 as it is read;
    no float copy of the weight). Any number of rows, in passes of ``MAX_ROWS``."""
    if _available is not True:
        _require()
    return torch.ops.ds_quant.bf16_gemv_cpu.default(x, weight)


def fp32_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) @ ``weight``^T -> (..., out), float32, summed in float32 by
    multiply-adds over the weight as it is read. Any number of rows, in passes of
    ``MAX_ROWS``. ``weight`` row-major (unit stride along ``in``), or input-major (unit
    stride along ``out``: ``w.t().contiguous().t()``, what ``ds_model.layout`` makes),
    read in its own layout; each output then sums its inputs in order."""
    if _available is not True:
        _require()
    return torch.ops.ds_quant.fp32_gemv_cpu.default(x, weight)


def fp32_gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``fp32_gemv``'s plain-torch ground truth: the product in float64, rounded to
    float32 once."""
    return (x.double() @ weight.double().t()).float()


def bf16_gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bf16_gemv``'s plain-torch ground truth: the product in float64, rounded to
    bfloat16 once."""
    return (x.double() @ weight.double().t()).to(torch.bfloat16)


def rms_norm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``rms_norm`` runs ``x`` (..., dim) with ``weight`` (dim,): eager (a traced
    step keeps torch's norm, which inductor fuses with its neighbours), both float32 or
    both bfloat16 on the CPU, at most ``NORM_ROWS`` rows, outside autograd and CPU
    autocast."""
    if x.dtype is not weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (x.is_cpu and weight.is_cpu) or torch.compiler.is_compiling() or x.dim() == 0:
        return False
    if weight.dim() != 1 or not weight.is_contiguous() or weight.shape[0] != x.shape[-1]:
        return False
    if not 0 < x.numel() <= NORM_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return _available is True or available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` (..., dim) / rms(x) * ``weight`` (dim,) in ``x``'s dtype (float32 or
    bfloat16, ``weight`` the same): the mean of squares in float32, each row read once.
    ``ds_model.norm.RMSNorm``'s arithmetic, to rounding (the sum's order differs)."""
    if _available is not True:
        _require()
    return torch.ops.ds_quant.rms_norm_cpu.default(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm``'s plain-torch ground truth: ``RMSNorm``'s float32 arithmetic (the
    torch ops that ``rms_norm`` replaces)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype == torch.float32:
        return h * weight
    return weight * h.to(x.dtype)


def prepare(weight: torch.Tensor) -> None:
    """Build (or load) the kernels now if ``weight`` is a CPU layer's: quantizing and
    loading call this, so that the first decode step, eager or traced, finds them."""
    if weight.device.type == "cpu":
        available()


def _group_step() -> int:
    """The INT4 group sizes the kernel takes are multiples of this."""
    available()
    return _step


def _require() -> None:
    """The ops' CPU kernels are loaded by ``available()``: a direct call before it, or
    where the build failed, gets this error rather than the dispatcher's."""
    if not available():
        raise RuntimeError(
            "ds_quant: the CPU decode kernel is not available on this machine "
            "(kernels.cpu_gemv.available() is False: see its RuntimeWarning, or "
            "DS_QUANT_CPU_GEMV=0); use the layers' other backends"
        )


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) @ (q * scale)^T -> (..., out) in ``x.dtype``; ``q`` int8 (out,
    in) with unit inner stride, ``scale`` (out,). Any number of rows, in passes of
    ``MAX_ROWS``."""
    if _available is not True:
        _require()
    if x.dim() == 2:
        return torch.ops.ds_quant.int8_gemv_cpu.default(x, q, scale)
    y = torch.ops.ds_quant.int8_gemv_cpu.default(x.reshape(-1, q.shape[1]), q, scale)
    return y.view(*x.shape[:-1], q.shape[0])


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x`` (..., in_features) by ds-quant's INT4 weight (``packed`` (out, in_padded //
    2), ``scale`` / ``zero`` (out, groups), W = (q - zero) * scale) -> (..., out) in
    ``x.dtype``. Any number of rows, in passes of ``MAX_ROWS``."""
    if _available is not True:
        _require()
    if x.dim() == 2:
        return torch.ops.ds_quant.int4_gemv_cpu.default(x, packed, scale, zero, group_size)
    y = torch.ops.ds_quant.int4_gemv_cpu.default(
        x.reshape(-1, in_features), packed, scale, zero, group_size
    )
    return y.view(*x.shape[:-1], packed.shape[0])


def experts_gemv_takes(x: torch.Tensor, weight: torch.Tensor, group_size: int = 0) -> bool:
    """Whether ``experts_gemv`` runs ``x`` by the stacked ``weight``: int8 (experts, out,
    in), or uint8 packed INT4 (experts, out, in // 2) with a ``group_size`` the kernel
    steps (``int4_takes``)."""
    int4 = weight.dtype == torch.uint8
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and _no_grad(x)
        and weight.device.type == "cpu"
        and weight.dim() == 3
        and weight.stride(-1) == 1
        and weight.dtype in (torch.int8, torch.uint8)
        and available()
        and (not int4 or (0 < group_size <= MAX_GROUP and group_size % _group_step() == 0))
    )


def experts_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    experts: torch.Tensor,
    group_size: int = 0,
) -> torch.Tensor:
    """Row r of ``x`` (rows, in) float, or its only row, by expert ``experts[r]`` of the
    stack -> (len(experts), out) in ``x.dtype``: INT8 when ``zero`` is None (``scale``
    (experts, out)), else INT4 (``scale`` / ``zero`` (experts, out, groups)). Each
    expert's weights are read where they lie; traced code calls the same ops."""
    _require()
    if zero is None:
        return torch.ops.ds_quant.int8_experts_gemv_cpu(x, weight, scale, experts)
    return torch.ops.ds_quant.int4_experts_gemv_cpu(x, weight, scale, zero, experts, group_size)


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``int8_gemv``'s plain-torch ground truth, with its int16 activation rounding."""
    x2 = _quantized_rows(x.reshape(-1, q.shape[1]))
    y = (x2 @ q.double().t()) * scale.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def int4_gemv_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``int4_gemv``'s plain-torch ground truth, with its int16 activation rounding."""
    from ds_quant.primitives import dequantize_int4

    w = dequantize_int4(packed, scale, zero, group_size, in_features, torch.float64)
    x2 = _quantized_rows(x.reshape(-1, in_features))
    return (x2 @ w.t()).to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


def _quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row rounded to int16 steps of max |row| / 32767 in float32 arithmetic, as
    the kernel rounds it (``x * (32767 / max)``, to nearest even), returned in float64."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    # A true division: ``32767 / amax`` is computed as 32767 * (1 / amax) by torch,
    # which rounds differently from the kernel's.
    inv = torch.where(amax > 0, torch.full_like(amax, 32767) / amax, torch.zeros_like(amax))
    return torch.round(x * inv).double() * (amax.double() / 32767).float().double()


# The ops' schemas and fake kernels (what traced code sees); their CPU kernels come from
# ``cpu_gemv_ops.cpp`` when ``available()`` loads it. Each result is in x's dtype.
_LIB = torch.library.Library("ds_quant", "FRAGMENT")
_LIB.define("int8_gemv_cpu(Tensor x, Tensor q, Tensor scale) -> Tensor")
_LIB.define(
    "int4_gemv_cpu(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size) -> Tensor"
)
# Stacked experts: row r of the result is row r of x (or its only row) by expert
# experts[r] of the stack, q (experts, out, in) and its scales (experts, out, ...).
_LIB.define("int8_experts_gemv_cpu(Tensor x, Tensor q, Tensor scale, Tensor experts) -> Tensor")
_LIB.define(
    "int4_experts_gemv_cpu(Tensor x, Tensor packed, Tensor scale, Tensor zero, "
    "Tensor experts, int group_size) -> Tensor"
)
# bfloat16 x (..., in) by a bfloat16 weight (out, in), summed in float32 -> (..., out).
_LIB.define("bf16_gemv_cpu(Tensor x, Tensor w) -> Tensor")
# float32 x (..., in) by a float32 weight (out, in) -> (..., out).
_LIB.define("fp32_gemv_cpu(Tensor x, Tensor w) -> Tensor")
# x (..., dim) / rms(x) * weight (dim,), float32 or bfloat16 -> (..., dim).
_LIB.define("rms_norm_cpu(Tensor x, Tensor weight, float eps) -> Tensor")


def _fake(x, weight, *rest):
    torch._check(x.dim() == 2, lambda: "x must be 2-D (rows, in_features)")
    return x.new_empty(x.shape[0], weight.shape[0])


def _float_fake(x, weight):
    torch._check(x.dim() >= 1, lambda: "x must be (..., in_features)")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def _int8_experts_fake(x, q, scale, experts):
    return x.new_empty(experts.shape[0], q.shape[1])


def _int4_experts_fake(x, packed, scale, zero, experts, group_size):
    return x.new_empty(experts.shape[0], packed.shape[1])


for _name, _fake_impl in (
    ("int8_gemv_cpu", _fake),
    ("int4_gemv_cpu", _fake),
    ("int8_experts_gemv_cpu", _int8_experts_fake),
    ("int4_experts_gemv_cpu", _int4_experts_fake),
    ("bf16_gemv_cpu", _float_fake),
    ("fp32_gemv_cpu", _float_fake),
    ("rms_norm_cpu", _rms_norm_fake),
):
    torch.library.register_fake(f"ds_quant::{_name}", _fake_impl, lib=_LIB)
