"""The CUDA C++ GEMV of ``gemv.cu`` for one to a few rows of ``x``, compiled at run time by NVRTC (the
library that comes with torch's CUDA build) and launched through the CUDA driver by ctypes: no compiler
or build step at install time.

:func:`gemv` multiplies ``x`` (up to :data:`MAX_ROWS` rows, float16 / bfloat16) with a packed weight in
the Triton module's :class:`~quantizers.kernels.triton_gemm.Runtime` layout (2 or 4 bits, regular groups,
codes in sorted order; act-order's ``x`` is gathered by the caller). :func:`supports` says where it runs.
Compiled kernels are kept per process and, as cubins, on disk under ``$HARNESS_CACHE/cuda`` (default
``~/.cache/quant-harness/cuda``). ``HARNESS_KERNEL_CUDA=0`` turns the path off.

Nothing happens at import: the libraries are opened on first use.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.cu")
BITS = (2, 4)  # widths gemv.cu multiplies (a run of codes per byte: 2 or 4 bits)
MAX_ROWS = 8  # rows of x one launch takes (the dequantized pairs are reused across them)
MIN_CAPABILITY = (8, 0)  # fma.rn.bf16x2, cvt.rn.bf16.f32
CODES = {2: 16, 4: 8}  # codes per 32-bit word


class CudaUnavailable(RuntimeError):
    """NVRTC or the driver could not be used; the caller falls back to the Triton kernels."""


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: ``c`` adjacent columns per thread (1, 2, 4: 4-, 8- or 16-byte loads), ``w`` warps a
    block (they split the block's K range and add up in shared memory), ``u`` word rows a step (one scale
    multiply per step), ``depth`` steps in flight (``depth − 1`` loaded ahead), ``split`` K splits over
    blocks (0: as many as give every SM ``blocks_per_sm`` blocks; 1: none, the block writes ``y``)."""

    c: int = 1
    w: int = 8
    u: int = 4
    depth: int = 3
    split: int = 1
    blocks_per_sm: int = 2

    def name(self) -> str:
        split = f"s{self.split}" if self.split else f"b{self.blocks_per_sm}"
        return f"cuda-gemv c{self.c} w{self.w} u{self.u} d{self.depth} {split}"


# ------------------------------------------------------------------------------------------- libraries

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}


def _open(kind: str) -> ctypes.CDLL:
    with _LOCK:
        if kind in _LIBS:
            return _LIBS[kind]
        if kind == "cuda":
            names = ["libcuda.so.1", "libcuda.so"]
        else:
            major = (torch.version.cuda or "").split(".")[0]
            names = [f"libnvrtc.so.{major}"] if major else []
            names.append("libnvrtc.so")
            for base in sys.path:  # pip's CUDA packages (nvidia/cuda_nvrtc/lib, nvidia/cu13/lib, …)
                names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise CudaUnavailable(f"could not open {'the CUDA driver' if kind == 'cuda' else 'NVRTC'} "
                                  f"(tried {', '.join(names[:4])})")
        _LIBS[kind] = lib
        return lib


def _check_cu(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _open("cuda").cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"CUDA driver: {what} failed ({res}: {(msg.value or b'?').decode()})")


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _open("nvrtc").nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(defines: dict[str, int], arch: tuple[int, int]) -> bytes:
    """``gemv.cu`` with ``defines`` (``-DGV_<key>=<value>``) for ``sm_<arch>`` as a cubin; ``RuntimeError``
    with NVRTC's log when it does not compile."""
    nvrtc = _open("nvrtc")
    src = SOURCE.read_bytes()
    opts = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}", "--std=c++17"]
    opts += [f"-DGV_{k}={int(v)}" for k, v in sorted(defines.items())]
    prog = ctypes.c_void_p()
    res = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"gemv.cu", 0, None, None)
    if res:
        raise RuntimeError(f"nvrtcCreateProgram failed ({res})")
    try:
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), copts)
        if res:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile gemv.cu with {' '.join(opts)}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def _cache_dir() -> Path:
    base = os.environ.get("HARNESS_CACHE")
    return Path(base) / "cuda" if base else Path.home() / ".cache" / "quant-harness" / "cuda"


def _cubin(defines: dict[str, int], arch: tuple[int, int]) -> bytes:
    """:func:`compile_cubin`, kept on disk by a hash of the source, the options and NVRTC's version."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((sorted(defines.items()), arch, nvrtc_version())).encode())
    path = _cache_dir() / f"gemv-{key.hexdigest()[:24]}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(defines, arch)
    try:  # atomic: written aside, then renamed
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a compile per process
    return cubin


class Kernel:
    """One compiled variant of ``gemv.cu`` loaded on one device."""

    def __init__(self, cubin: bytes, device: torch.device, threads: int) -> None:
        cu = _open("cuda")
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # the device's primary context exists and is current
            self.module, self.func = ctypes.c_void_p(), ctypes.c_void_p()
            _check_cu(cu.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            _check_cu(cu.cuModuleGetFunction(ctypes.byref(self.func), self.module, b"gemv"), "cuModuleGetFunction")
        regs = ctypes.c_int()
        _check_cu(cu.cuFuncGetAttribute(ctypes.byref(regs), 4, self.func), "cuFuncGetAttribute")  # NUM_REGS
        self.registers, self.threads, self.smem_limit = regs.value, threads, 48 * 1024

    def allow_smem(self, nbytes: int) -> None:
        """Let a launch use ``nbytes`` of dynamic shared memory (above 48 KiB it must be asked for)."""
        if nbytes > self.smem_limit:
            _check_cu(_open("cuda").cuFuncSetAttribute(self.func, 8, nbytes),  # MAX_DYNAMIC_SHARED_SIZE_BYTES
                      "cuFuncSetAttribute")
            self.smem_limit = nbytes

    def launch(self, grid: tuple[int, int], args: list, stream: int, smem: int = 0, pdl: bool = False) -> None:
        """Launch on ``stream``; ``pdl``: as a programmatic dependent of the kernel before it (which lets it
        start early; the kernel waits with ``griddepcontrol.wait`` before it reads that kernel's output)."""
        holders = [ctypes.c_void_p(a) if isinstance(a, _Ptr) else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        cu = _open("cuda")
        if not pdl:
            _check_cu(cu.cuLaunchKernel(self.func, grid[0], grid[1], 1, self.threads, 1, 1, smem,
                                        ctypes.c_void_p(stream), params, None), "cuLaunchKernel")
            return
        attr = _LaunchAttr(id=PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.val.value = 1
        cfg = _LaunchConfig(grid[0], grid[1], 1, self.threads, 1, 1, smem, ctypes.c_void_p(stream),
                            ctypes.pointer(attr), 1)
        _check_cu(cu.cuLaunchKernelEx(ctypes.byref(cfg), self.func, params, None), "cuLaunchKernelEx")


class _LaunchAttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("value", ctypes.c_int)]


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("val", _LaunchAttrValue)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _Ptr(int):
    """A device address among a launch's arguments (the others are C ints)."""


_KERNELS: dict[tuple, Kernel] = {}


def kernel(defines: dict[str, int], device: torch.device) -> Kernel:
    """The variant ``defines`` loaded on ``device`` (compiled, or read from the disk cache, on first use)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (tuple(sorted(defines.items())), idx)
    k = _KERNELS.get(key)
    if k is None:
        props = torch.cuda.get_device_properties(idx)
        cubin = _cubin(defines, (props.major, props.minor))
        k = _KERNELS[key] = Kernel(cubin, torch.device("cuda", idx), 32 * defines["W"])
    return k


# ---------------------------------------------------------------------------------------------- the GEMV


def defines(bits: int, cfg: GemvConfig, rows: int, dtype: torch.dtype, split: bool, bias: bool,
            pdl: bool = False) -> dict[str, int]:
    """The ``GV_*`` settings of one compiled variant of ``gemv.cu``."""
    return dict(BITS=bits, C=cfg.c, W=cfg.w, U=cfg.u, DEPTH=cfg.depth, ROWS=rows, F16=int(dtype == torch.float16),
                SPLIT=int(split), HAS_BIAS=int(bias), PDL=int(pdl))


def available(device: torch.device) -> bool:
    """Whether the CUDA GEMV can run on ``device``: a CUDA GPU of compute capability 8.0 or newer, NVRTC
    and the driver found, and ``HARNESS_KERNEL_CUDA`` not 0."""
    if os.environ.get("HARNESS_KERNEL_CUDA", "1") in ("0", "false", "no"):
        return False
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip:
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(idx) < MIN_CAPABILITY:
        return False
    try:
        _open("cuda")
        nvrtc_version()
    except CudaUnavailable:
        return False
    return True


def supports(rt, M: int, dtype: torch.dtype, cfg: GemvConfig) -> str | None:
    """None when :func:`gemv` takes this product, else why not (the Triton kernels run it instead)."""
    if rt.bits not in BITS:
        return f"{rt.bits} bits (it takes {BITS})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x in {dtype} (it takes float16 and bfloat16)"
    if not 1 <= M <= MAX_ROWS:
        return f"{M} rows (it takes 1 to {MAX_ROWS})"
    step = CODES[rt.bits] * cfg.u  # codes of k a step
    if rt.group_size is None or rt.K % step or (rt.group_size < rt.K and rt.group_size % step):
        return f"groups that are not a multiple of {step} codes"
    if rt.N % cfg.c or rt.qweight.data_ptr() % 16:
        return f"N = {rt.N} is not a multiple of {cfg.c} (or the packed words are not 16-byte aligned)"
    return None


X_SMEM = 96 * 1024  # bytes of x a block keeps in shared memory at most (more rows or K: more K splits)


def _split(rt, cfg: GemvConfig, M: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(blocks along K, steps each)."""
    step_codes = CODES[rt.bits] * cfg.u
    steps = rt.K // step_codes
    split = cfg.split
    if not split:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = max(1, -(-cfg.blocks_per_sm * sms // tiles))
    split = max(split, -(-M * rt.K * 2 // X_SMEM))  # the block's x fits in shared memory
    split = max(1, min(split, steps))
    per = -(-steps // split)
    return -(-steps // per), per


def gemv(x: torch.Tensor, rt, bias: torch.Tensor | None, cfg: GemvConfig, y: torch.Tensor | None = None,
         workspace=None, pdl: bool = False) -> torch.Tensor:
    """``x`` (M ≤ MAX_ROWS, K) float16 / bfloat16, contiguous, times the dequantized weight of ``rt``
    (codes in sorted order: gather act-order's ``x`` first) plus ``bias``: (M, N) in ``x``'s dtype.
    ``workspace(numel, counters)`` gives the zeroed float32 / int32 scratch of a K split. ``pdl``: ``x``
    comes from the kernel launched just before (the gather, sm_90+), which this launch may overlap: its
    blocks load their first weights, then wait for it."""
    why = supports(rt, x.shape[0], x.dtype, cfg)
    if why:
        raise ValueError(f"the CUDA GEMV does not take {why}")
    M, K = x.shape
    if not x.is_contiguous() or x.data_ptr() % 16:  # gemv.cu reads x 16 bytes at a time
        x = x.contiguous() if not x.is_contiguous() else x.clone()
        pdl = False  # that copy runs between: x no longer comes from the kernel before
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    tiles = -(-rt.N // (32 * cfg.c))
    split, per = _split(rt, cfg, M, tiles, x.device)
    k = kernel(defines(rt.bits, cfg, M, x.dtype, split > 1, bias is not None, pdl), x.device)
    if y is None:
        y = torch.empty((M, rt.N), dtype=x.dtype, device=x.device)
    if split > 1:
        if workspace is None:
            raise ValueError(f"{cfg.name()} splits K over {split} blocks: pass workspace(numel, counters)")
        ws, cnt = workspace(M * rt.N, tiles)
    else:
        ws = cnt = rt.scratch
    group_rows = min(rt.group_size, rt.K) // CODES[rt.bits]
    args = [_Ptr(rt.qweight.data_ptr()), _Ptr(x.data_ptr()), K, _Ptr(rt.scales.data_ptr()), _Ptr(rt.zeros.data_ptr()),
            _Ptr(bias.data_ptr() if bias is not None else 0), _Ptr(y.data_ptr()), y.stride(0),
            _Ptr(ws.data_ptr()), _Ptr(cnt.data_ptr()), K, rt.N, group_rows, per]
    smem = M * per * cfg.u * CODES[rt.bits] * 2  # the block's x
    k.allow_smem(smem)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # the driver launches in the current device's context
            k.launch((tiles, split), args, stream, smem, pdl)
    else:
        k.launch((tiles, split), args, stream, smem, pdl)
    return y
