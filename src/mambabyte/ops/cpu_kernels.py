"""The compiled CPU selective scan and decoding steps (ops/cpu_scan.c): built with the system C compiler at first
use, called through ctypes.

Nothing here is needed: when no compiler is found or the build fails, ``available()`` is False (with one
warning) and the dispatch uses the pure-PyTorch backends. ``MAMBABYTE_CPU_KERNELS=0`` turns the kernels off.
The shared library is cached under ``$MAMBABYTE_CACHE`` (default ``~/.cache/mambabyte``), keyed by the
source, the flags and the CPU, and written atomically so that concurrent processes can build it at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mambabyte.ops.selective_scan import scan_with

SOURCE = Path(__file__).with_name("cpu_scan.c")
LANES = 16  # channels per vector block; the same constant as in cpu_scan.c
CHUNK = 64  # positions between the states kept for the backward (which recomputes one chunk at a time)
PARALLEL_MIN_WORK = 1 << 18  # batch*length*d_inner*d_state below which one thread does the whole scan
BLOCK_STEP_MAX_BATCH = 8  # above this, batched matrix products in PyTorch beat the fused block step
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-freciprocal-math"]  # not -ffast-math: it would set FTZ for the process

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "scan_forward": (None, [_P] * 10 + [_I] * 7),
    "scan_backward": (ctypes.c_int, [_P] * 15 + [_I] * 7),
    "scan_step": (None, [_P] * 11 + [_I] * 3),
    "mixer_step": (None, [_P] * 13 + [_I] * 5),
    "block_step": (None, [_P] * 2 + [ctypes.c_float] + [_P] * 14 + [_I] * 6),
}


def _cache_dir() -> Path:
    root = os.environ.get("MAMBABYTE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mambabyte")
    return Path(root).expanduser() / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    """Compile (or find cached) the shared library and return its path."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_scan-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(partial, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def may_build() -> bool:
    """Cheap check, without building: the kernels are not turned off and a C compiler exists."""
    return os.environ.get("MAMBABYTE_CPU_KERNELS", "1") != "0" and _compiler() is not None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if not may_build():
        return None
    compiler = _compiler()
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(f"building the CPU selective scan failed ({error} {detail.decode()[:500]}); "
                      "falling back to pure PyTorch", stacklevel=3)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


def available() -> bool:
    """True when the compiled kernels can run here (builds them on the first call)."""
    return _library() is not None


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor() -> ThreadPoolExecutor:
    """A pool of torch.get_num_threads() workers, recreated after a fork (its threads do not survive one)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers != torch.get_num_threads():
            _pool = (os.getpid(), ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="mambabyte-scan"))
        return _pool[1]


def _split_blocks(d_inner: int, work: int) -> list[tuple[int, int]]:
    """Ranges of channel blocks, one per worker: as many workers as torch threads when the work is large enough."""
    blocks = -(-d_inner // LANES)
    workers = max(1, min(torch.get_num_threads(), blocks, work // PARALLEL_MIN_WORK))
    return [(blocks * i // workers, blocks * (i + 1) // workers) for i in range(workers)]


def _run(kernel, calls: list[list]) -> list:
    """kernel(*call) for every call, in parallel threads when more than one (ctypes releases the GIL)."""
    if len(calls) == 1:
        return [kernel(*calls[0])]
    return list(_executor().map(lambda call: kernel(*call), calls))


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("the compiled CPU selective scan is not available here (see the warning above)")
    return library


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _CpuScan(torch.autograd.Function):
    """(x, delta, A, B, C, h0, keep) -> (C_t . h_t (batch, length, d_inner), final state), all fp32 and contiguous."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, keep):
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        A_t = A.t().contiguous()
        y = torch.empty_like(x)
        final = torch.empty(batch, d_inner, d_state)
        needs_backward = any(ctx.needs_input_grad)
        checkpoints = torch.empty(batch, -(-length // CHUNK), d_inner, d_state) if needs_backward else None
        args = [_ptr(x), _ptr(delta), _ptr(A_t), _ptr(B), _ptr(C), _ptr(h0), _ptr(keep), _ptr(y), _ptr(final),
                _ptr(checkpoints), batch, length, d_inner, d_state, CHUNK]
        _run(_loaded().scan_forward, [[*args, *blocks] for blocks in _split_blocks(d_inner, x.numel() * d_state)])
        if needs_backward:
            ctx.save_for_backward(x, delta, A_t, B, C, keep, checkpoints)
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, delta, A_t, B, C, keep, checkpoints = ctx.saved_tensors
        batch, length, d_inner = x.shape
        d_state = A_t.shape[0]
        grad_y, grad_final = grad_y.contiguous(), grad_final.contiguous()
        grad_x, grad_delta = torch.empty_like(x), torch.empty_like(x)
        grad_A_t = torch.zeros_like(A_t)
        grad_h0 = torch.empty(batch, d_inner, d_state)
        splits = _split_blocks(d_inner, x.numel() * d_state)
        grad_B = torch.zeros(len(splits), *B.shape)  # each worker sums its own channels' share
        grad_C = torch.zeros(len(splits), *C.shape)
        calls = [[_ptr(x), _ptr(delta), _ptr(A_t), _ptr(B), _ptr(C), _ptr(keep), _ptr(checkpoints), _ptr(grad_y),
                  _ptr(grad_final), _ptr(grad_x), _ptr(grad_delta), _ptr(grad_A_t), _ptr(grad_B[i]), _ptr(grad_C[i]),
                  _ptr(grad_h0), batch, length, d_inner, d_state, CHUNK, *blocks] for i, blocks in enumerate(splits)]
        status = _run(_loaded().scan_backward, calls)
        if any(status):
            raise MemoryError("the CPU selective scan backward could not allocate its chunk buffers")
        return grad_x, grad_delta, grad_A_t.t(), grad_B.sum(0), grad_C.sum(0), grad_h0, None


def _cpu_core(x, delta, A, B, C, h0, keep):
    return _CpuScan.apply(*(None if t is None else t.contiguous() for t in (x, delta, A, B, C, h0, keep)))


def selective_scan_cpu(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract and results as ``selective_scan_ref``; the (batch, length, d_inner) elementwise parts stay in PyTorch."""
    return scan_with(_cpu_core, x, dt, A, B, C, D, dt_bias, z, initial_state, reset)


def selective_step_cpu(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                       z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One position of the scan without autograd, as ``selective_step_torch``: x, dt, z (batch, d_inner); B, C (batch, d_state)."""
    f32 = [t.float().contiguous() for t in (x, dt, A, B, C, D, dt_bias, z, state)]
    y = torch.empty_like(f32[0])
    next_state = torch.empty_like(f32[-1])
    batch, d_inner = x.shape
    _loaded().scan_step(*(t.data_ptr() for t in f32), y.data_ptr(), next_state.data_ptr(), batch, d_inner, A.shape[1])
    return y.to(x.dtype), next_state


def mixer_step_applies(*tensors: Tensor) -> bool:
    """True when ``mixer_step_cpu`` can take these: fp32 CPU tensors, no autograd, kernels built."""
    return (not torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and available())


def mixer_step_cpu(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor,
                   dt_bias: Tensor, A_log: Tensor, D: Tensor, conv_state: Tensor, ssm_state: Tensor,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The mixer's decoding step after in_proj, fused: xz (batch, 2*d_inner) -> (y (batch, d_inner), conv, ssm states).

    The same math as the plain path of MambaMixer.step (conv, SiLU, x_proj, dt_proj, selective step), fp32 only.
    """
    batch, d_inner = xz.shape[0], xz.shape[1] // 2
    kernel, dt_rank, d_state = conv_weight.shape[-1], dt_proj_weight.shape[1], A_log.shape[1]
    y = xz.new_empty(batch, d_inner)
    next_conv = torch.empty_like(conv_state)
    next_ssm = torch.empty_like(ssm_state)
    inputs = [t.contiguous() for t in (xz, conv_weight, conv_bias, conv_state, x_proj_weight, dt_proj_weight,
                                         dt_bias, A_log, D, ssm_state)]
    _loaded().mixer_step(*(t.data_ptr() for t in inputs), y.data_ptr(), next_conv.data_ptr(), next_ssm.data_ptr(),
                         batch, d_inner, kernel, dt_rank, d_state)
    return y, next_conv, next_ssm


def block_step_applies(hidden: Tensor, *tensors: Tensor) -> bool:
    """True when ``block_step_cpu`` should run: small-batch fp32 CPU decoding without autograd, kernels built."""
    return hidden.shape[0] <= BLOCK_STEP_MAX_BATCH and mixer_step_applies(hidden, *tensors)


def block_step_cpu(hidden: Tensor, norm_weight: Tensor, eps: float, in_proj_weight: Tensor, conv_weight: Tensor,
                   conv_bias: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, A_log: Tensor,
                   D: Tensor, out_proj_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """A whole pre-norm block's decoding step, fused: hidden (batch, d_model) -> (hidden + mixer(norm(hidden)), states).

    The same math as MambaBlock.step's plain path (RMSNorm, in_proj, ``mixer_step_cpu``, out_proj, residual), fp32 only.
    """
    batch, d_model = hidden.shape
    d_inner, kernel = D.shape[0], conv_weight.shape[-1]
    out = torch.empty_like(hidden)
    next_conv = torch.empty_like(conv_state)
    next_ssm = torch.empty_like(ssm_state)
    inputs = [t.contiguous() for t in (in_proj_weight, conv_weight, conv_bias, conv_state, x_proj_weight,
                                         dt_proj_weight, dt_bias, A_log, D, ssm_state, out_proj_weight)]
    _loaded().block_step(hidden.contiguous().data_ptr(), norm_weight.data_ptr(), eps, *(t.data_ptr() for t in inputs),
                         out.data_ptr(), next_conv.data_ptr(), next_ssm.data_ptr(),
                         batch, d_model, d_inner, kernel, dt_proj_weight.shape[1], A_log.shape[1])
    return out, next_conv, next_ssm
