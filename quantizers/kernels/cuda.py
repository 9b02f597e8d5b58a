"""The CUDA C++ GEMV of ``gemv.cu`` for one to a few rows of ``x``, compiled at run time by NVRTC (the
library that comes with torch's CUDA build) and launched through the CUDA driver by ctypes: no compiler
or build step at install time.

:func:`prepare` resolves one product's launch once (:class:`Launch`: compiled variant, grid, K split,
shared memory, its C parameters) and :func:`run` fills in the call's tensors and launches it: ``x``
(up to :data:`MAX_ROWS` rows, float16 / bfloat16) times a packed weight in the Triton module's
:class:`~quantizers.kernels.triton_gemm.Runtime` layout (2, 3 or 4 bits, regular groups, codes in sorted
order; under act-order the kernel reads ``x[perm[k]]`` itself, or the caller passes ``x`` gathered).
Its tensor-core variant (``kernel="mma"``: 4 bits, up to :data:`MMA_ROWS` rows, ``x`` gathered first;
``swap``: the weights as the mma's A operand) is compiled from the same source. :func:`supports` says
where each runs. A launch shape is the Triton module's ``Config`` with ``kernel="cuda"`` or ``"mma"``
(read here by its fields, see :func:`defines`). :func:`read_xor` runs ``stream.cu``, a kernel that only
reads bytes: the reference ``python -m harness.bench kernels`` times the products against.
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

from quantizers.kernels import current_stream, gpu

SOURCE = Path(__file__).with_name("gemv.cu")
READ_SOURCE = Path(__file__).with_name("stream.cu")  # a read-only kernel, the products' reference (bench)
BITS = (2, 3, 4)  # widths gemv.cu multiplies
MAX_ROWS = 8  # rows of x one launch takes (the dequantized pairs are reused across them)
MIN_CAPABILITY = (8, 0)  # fma.rn.bf16x2, cvt.rn.bf16.f32
BLOCK = {2: (16, 1), 3: (32, 3), 4: (8, 1)}  # (codes, 32-bit words) of a packed block (gemv.cu's GV_CODES, GV_WPB)


class CudaUnavailable(RuntimeError):
    """NVRTC or the driver could not be used; the caller falls back to the Triton kernels."""


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


def compile_cubin(defines: dict[str, int], arch: tuple[int, int], source: Path = SOURCE, prefix: str = "GV_") -> bytes:
    """``source`` (``gemv.cu``) with ``defines`` (``-D<prefix><key>=<value>``) for ``sm_<arch>`` as a cubin;
    ``RuntimeError`` with NVRTC's log when it does not compile."""
    nvrtc = _open("nvrtc")
    src = source.read_bytes()
    opts = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}", "--std=c++17"]
    opts += [f"-D{prefix}{k}={int(v)}" for k, v in sorted(defines.items())]
    prog = ctypes.c_void_p()
    res = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, source.name.encode(), 0, None, None)
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
            raise RuntimeError(f"NVRTC could not compile {source.name} with {' '.join(opts)}:\n{log.value.decode()}")
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


def _cubin(defines: dict[str, int], arch: tuple[int, int], source: Path = SOURCE, prefix: str = "GV_") -> bytes:
    """:func:`compile_cubin`, kept on disk by a hash of the source, the options and NVRTC's version."""
    key = hashlib.sha256(source.read_bytes() + repr((sorted(defines.items()), arch, nvrtc_version())).encode()
                         + prefix.encode())
    path = _cache_dir() / f"{source.stem}-{key.hexdigest()[:24]}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(defines, arch, source, prefix)
    try:  # atomic: written aside, then renamed
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a compile per process
    return cubin


class Kernel:
    """One compiled variant of ``gemv.cu`` (or of ``stream.cu``: ``name``) loaded on one device."""

    def __init__(self, cubin: bytes, device: torch.device, threads: int, name: bytes = b"gemv") -> None:
        cu = _open("cuda")
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # the device's primary context exists and is current
            self.module, self.func = ctypes.c_void_p(), ctypes.c_void_p()
            _check_cu(cu.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            _check_cu(cu.cuModuleGetFunction(ctypes.byref(self.func), self.module, name), "cuModuleGetFunction")
        regs, static = ctypes.c_int(), ctypes.c_int()
        _check_cu(cu.cuFuncGetAttribute(ctypes.byref(regs), 4, self.func), "cuFuncGetAttribute")  # NUM_REGS
        _check_cu(cu.cuFuncGetAttribute(ctypes.byref(static), 1, self.func), "cuFuncGetAttribute")  # SHARED_SIZE
        self.registers, self.threads = regs.value, threads
        self.smem_limit = 48 * 1024 - static.value  # dynamic bytes a launch may use without asking

    def allow_smem(self, nbytes: int) -> None:
        """Let a launch use ``nbytes`` of dynamic shared memory (beyond 48 KiB with the static part it must be
        asked for)."""
        if nbytes > self.smem_limit:
            _check_cu(_open("cuda").cuFuncSetAttribute(self.func, 8, nbytes),  # MAX_DYNAMIC_SHARED_SIZE_BYTES
                      "cuFuncSetAttribute")
            self.smem_limit = nbytes

    def launch(self, grid: tuple[int, int], params: Params, stream: int, smem: int = 0, pdl: bool = False) -> None:
        """Launch with ``params`` on ``stream``; ``pdl``: as a programmatic dependent of the kernel before it
        (which lets it start early; the kernel waits with ``griddepcontrol.wait`` before it reads that
        kernel's output)."""
        cu = _open("cuda")
        if not pdl:
            _check_cu(cu.cuLaunchKernel(self.func, grid[0], grid[1], 1, self.threads, 1, 1, smem,
                                        ctypes.c_void_p(stream), params.array, None), "cuLaunchKernel")
            return
        cfg = params.config
        cfg.gridDimX, cfg.gridDimY, cfg.blockDimX, cfg.sharedMemBytes = grid[0], grid[1], self.threads, smem
        cfg.hStream = stream
        _check_cu(cu.cuLaunchKernelEx(ctypes.byref(cfg), self.func, params.array, None), "cuLaunchKernelEx")


class Params:
    """The kernel's parameters as C values with the array of their addresses that a launch passes, built
    once per :class:`Launch` (building them per call cost more than the rest of a launch); :meth:`fill`
    sets them, a lock keeps concurrent callers of one launch from filling each other's."""

    # gemv's parameters: p a device address, i a C int (l: an unsigned 64-bit int)
    KINDS = "ppippppipp" + "iiiip"
    C_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_uint64}

    def __init__(self, kinds: str = KINDS) -> None:
        self.values = [self.C_TYPES[k]() for k in kinds]
        self.array = (ctypes.c_void_p * len(self.values))(
            *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in self.values])
        self.attr = _LaunchAttr(id=PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attr.val.value = 1
        self.config = _LaunchConfig(gridDimZ=1, blockDimY=1, blockDimZ=1, attrs=ctypes.pointer(self.attr), numAttrs=1)
        self.lock = threading.Lock()

    def fill(self, args) -> None:
        for holder, value in zip(self.values, args, strict=True):
            holder.value = value


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


_KERNELS: dict[tuple, Kernel] = {}


def kernel(defines: dict[str, int], device: torch.device) -> Kernel:
    """The variant ``defines`` loaded on ``device`` (compiled, or read from the disk cache, on first use)."""
    facts = gpu(device)
    key = (tuple(sorted(defines.items())), facts.index)
    k = _KERNELS.get(key)
    if k is None:
        cubin = _cubin(defines, facts.capability)
        k = _KERNELS[key] = Kernel(cubin, torch.device("cuda", facts.index), 32 * defines["W"])
    return k


# ---------------------------------------------------------------------------------------------- the GEMV


MMA_ROWS = 16  # rows of x the tensor-core variant takes (one m16 tile)
MMA_CHUNK = 64  # codes of k a warp of the tensor-core variant takes a step (8 word rows at 4 bits)


def shape(cfg, bits: int) -> tuple[int, int, int, int]:
    """(columns a thread, warps a block, packed blocks a step, steps in flight) of a launch config: ``cfg.bn``
    columns a block (32 × columns a thread: 4-, 8- or 16-byte loads), ``cfg.bk`` codes of K a step (one
    scale multiply per step), ``cfg.num_warps`` warps a block (they split the block's K range and add up
    in shared memory), ``cfg.num_stages`` steps in flight (that many − 1 loaded ahead)."""
    if cfg.kernel == "mma":  # a chunk of 64 codes a step; 32 columns a block (+sw: 32 a 16-byte load of a lane)
        c = max(1, cfg.bn // 32) if cfg.swap else 1
        return c, cfg.num_warps, MMA_CHUNK // BLOCK.get(bits, (8, 1))[0], cfg.num_stages
    return max(1, cfg.bn // 32), cfg.num_warps, max(1, cfg.bk // BLOCK.get(bits, (1, 1))[0]), cfg.num_stages


def defines(bits: int, cfg, rows: int, dtype: torch.dtype, split: bool, bias: bool,
            pdl: bool = False, perm: bool = False) -> dict[str, int]:
    """The ``GV_*`` settings of one compiled variant of ``gemv.cu``."""
    c, w, u, depth = shape(cfg, bits)
    out = dict(BITS=bits, C=c, W=w, U=u, DEPTH=depth, ROWS=rows, F16=int(dtype == torch.float16),
               SPLIT=int(split), HAS_BIAS=int(bias), PDL=int(pdl), PERM=int(perm))
    if cfg.kernel == "mma":
        if cfg.swap:  # the weights as mma's A operand, x staged in shared memory
            out.update(MMA=2, PERM=0)
        else:
            out.update(MMA=1, PERM=0, XAHEAD=int(cfg.prefetch))  # x in sorted order: act-order's gathered first
    return out


def available(device: torch.device) -> bool:
    """Whether the CUDA GEMV can run on ``device``: a CUDA GPU of compute capability 8.0 or newer, NVRTC
    and the driver found, and ``HARNESS_KERNEL_CUDA`` not 0."""
    if os.environ.get("HARNESS_KERNEL_CUDA", "1") in ("0", "false", "no"):
        return False
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip:
        return False
    if gpu(device).capability < MIN_CAPABILITY:
        return False
    try:
        _open("cuda")
        nvrtc_version()
    except CudaUnavailable:
        return False
    return True


def supports(rt, M: int, dtype: torch.dtype, cfg) -> str | None:
    """None when the CUDA GEMV takes this product with launch config ``cfg``, else why not (the Triton
    kernels run it instead)."""
    if cfg.kernel == "mma":
        return mma_supports(rt, M, dtype, cfg)
    if rt.bits not in BITS:
        return f"{rt.bits} bits (it takes {BITS})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x in {dtype} (it takes float16 and bfloat16)"
    if not 1 <= M <= MAX_ROWS:
        return f"{M} rows (it takes 1 to {MAX_ROWS})"
    c, _, u, _ = shape(cfg, rt.bits)
    step = BLOCK[rt.bits][0] * u  # codes of k a step
    if rt.group_size is None or rt.K % step or (rt.group_size < rt.K and rt.group_size % step):
        return f"groups that are not a multiple of {step} codes"
    if rt.N % c or rt.qweight.data_ptr() % 16:
        return f"N = {rt.N} is not a multiple of {c} (or the packed words are not 16-byte aligned)"
    if rt.perm is not None and not cfg.gather:  # the kernel gathers x from a copy of all of it in shared memory
        if rt.perm.data_ptr() % 16:
            return "an act-order permutation that is not 16-byte aligned (gather x first: +g)"
        if M * rt.K * 2 > X_SMEM // 2:
            return (f"act-order x of {M} × {rt.K} in shared memory (at most {X_SMEM // 2} bytes; "
                    "gather x first: +g)")
    return None


def mma_supports(rt, M: int, dtype: torch.dtype, cfg) -> str | None:
    """:func:`supports` for the tensor-core variant (``kernel="mma"``): 4 bits, up to 16 rows, groups of a
    multiple of 64 codes, N a multiple of 8, 16-byte aligned words and scales; act-order's ``x`` gathered
    first (the plan does it)."""
    if rt.bits != 4:
        return f"{rt.bits} bits in its tensor-core variant (it takes 4)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"x in {dtype} (it takes float16 and bfloat16)"
    if not 1 <= M <= MMA_ROWS:
        return f"{M} rows in its tensor-core variant (it takes 1 to {MMA_ROWS})"
    if rt.group_size is None or rt.K % MMA_CHUNK or (rt.group_size < rt.K and rt.group_size % MMA_CHUNK):
        return f"groups that are not a multiple of {MMA_CHUNK} codes"
    if rt.N % 8 or rt.qweight.data_ptr() % 16 or rt.scales.data_ptr() % 16:
        return f"N = {rt.N} is not a multiple of 8 (or the words or scales are not 16-byte aligned)"
    if cfg.num_warps * M * 32 * shape(cfg, 4)[0] * 4 > 48 * 1024:
        return f"{cfg.num_warps} warps at {M} rows (their sums need more than 48 KiB of shared memory)"
    return None


X_SMEM = 96 * 1024  # bytes of x a block keeps in shared memory at most (more rows or K: more K splits)


def swap_x_bytes(M: int, chunks: int) -> int:
    """Dynamic shared memory of the ``+sw`` tensor-core variant over ``chunks`` chunks of K: ``x`` (each row
    16 bytes longer, which spreads the lanes' reads over the banks) and ``Σx`` of each (row, chunk)."""
    return M * (chunks * (MMA_CHUNK * 2 + 4) + 16)


def split_k(rt, cfg, M: int, tiles: int, sms: int, perm: bool = False) -> tuple[int, int]:
    """(blocks along K, steps each) of a launch config over ``tiles`` column tiles on ``sms`` SMs:
    ``cfg.split`` splits (0: enough blocks to give every SM ``cfg.warps_per_sm`` warps), at least as
    many as keep a block's ``x`` in shared memory (``perm``: next to all of ``x``), no empty block."""
    _, w, u, _ = shape(cfg, rt.bits)
    steps = rt.K // (BLOCK[rt.bits][0] * u)
    split = cfg.split or max(1, -(-max(1, cfg.warps_per_sm // w) * sms // tiles))
    if cfg.kernel != "mma" or cfg.swap:  # (the tensor-core variant without +sw reads x from global memory)
        room = X_SMEM - (M * rt.K * 2 if perm else 0)  # act-order: all of x is there too
        xbytes = swap_x_bytes(M, steps) if cfg.kernel == "mma" else M * rt.K * 2
        split = max(split, -(-xbytes // room))  # the block's x fits in shared memory
    split = max(1, min(split, steps))
    per = -(-steps // split)
    return -(-steps // per), per


@dataclass(frozen=True)
class Launch:
    """One product's launch, resolved once (:func:`prepare`) and kept by the caller's plan."""

    kernel: Kernel
    grid: tuple[int, int]  # (column tiles, K splits)
    steps: int  # steps of K a block covers
    smem: int  # bytes of dynamic shared memory: the block's x (with perm, all of x after it)
    group_rows: int  # word rows a group
    workspace: tuple[int, int]  # float32 words and int32 counters of the K split's scratch; (0, 0): none
    pdl: bool  # compiled to wait (griddepcontrol): may be launched as a programmatic dependent
    perm: bool  # act-order: the kernel reads x[perm[k]] itself
    params: Params  # the kernel's parameters, filled per call


def prepare(rt, M: int, dtype: torch.dtype, device: torch.device, has_bias: bool, cfg, pdl: bool,
            perm: bool = False) -> Launch:
    """The launch of ``x`` (M, K) in ``dtype`` times ``rt`` (+ bias) with launch config ``cfg`` on
    ``device``; ``ValueError`` naming the reason where the CUDA GEMV does not take it (:func:`supports`,
    or a device it cannot run on: :func:`available`). ``pdl`` (sm_90+):
    the variant that may overlap the kernel before it (:func:`run`). ``perm`` (act-order): the kernel
    gathers ``x[:, rt.perm]`` itself as it stages ``x`` (else the caller passes ``x`` gathered)."""
    why = supports(rt, M, dtype, cfg)
    if why is None and not available(device):
        why = f"{device} (a CUDA GPU of compute capability 8.0+ with NVRTC, HARNESS_KERNEL_CUDA not 0)"
    if why:
        raise ValueError(f"the CUDA GEMV does not take {why}")
    tiles = -(-rt.N // (32 * shape(cfg, rt.bits)[0]))
    perm = perm and rt.perm is not None
    split, per = split_k(rt, cfg, M, tiles, gpu(device).sms, perm)
    k = kernel(defines(rt.bits, cfg, M, dtype, split > 1, has_bias, pdl, perm), device)
    codes, words = BLOCK[rt.bits]
    if cfg.kernel == "mma":  # +sw: the block's x and Σx
        smem = swap_x_bytes(M, per) if cfg.swap else 0
    else:
        smem = M * per * shape(cfg, rt.bits)[2] * codes * 2 + (M * rt.K * 2 if perm else 0)
    k.allow_smem(smem)
    return Launch(k, (tiles, split), per, smem, min(rt.group_size, rt.K) // codes * words,
                  (M * rt.N, tiles) if split > 1 else (0, 0), pdl, perm, Params())


def run(launch: Launch, x: torch.Tensor, rt, bias: torch.Tensor | None, y: torch.Tensor,
        scratch: tuple[torch.Tensor, torch.Tensor] | None = None, pdl: bool = False) -> None:
    """``y`` (M, N) = ``x`` (M, K; act-order's gathered unless ``launch.perm``) times ``rt``'s weight
    plus ``bias`` (in ``x``'s dtype), on the current stream; ``x``'s device must be the current one (the
    Triton module's ``matmul`` makes it so for every kernel); ``scratch``: the zeroed
    (float32, int32) workspace of ``launch.workspace`` when it splits K.

    ``pdl`` (a launch prepared with it): launched as a programmatic dependent of the kernel before it, its
    blocks load their first weights while that kernel finishes, then wait for it (``griddepcontrol.wait``)
    before reading ``x`` or writing anything. The caller must know that kernel does not write the weights
    or the permutation (the Triton module launches a weight's first product without it)."""
    if not x.is_contiguous() or x.data_ptr() % 16:  # gemv.cu reads x 16 bytes at a time
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    if launch.workspace[0]:
        if scratch is None:
            raise ValueError(f"a launch that splits K over {launch.grid[1]} blocks needs its scratch")
        ws, cnt = scratch
    else:
        ws = cnt = rt.scratch
    K = rt.K
    args = (rt.qweight.data_ptr(), x.data_ptr(), K, rt.scales.data_ptr(), rt.zeros.data_ptr(),
            bias.data_ptr() if bias is not None else 0, y.data_ptr(), y.stride(0), ws.data_ptr(), cnt.data_ptr(),
            K, rt.N, launch.group_rows, launch.steps, rt.perm.data_ptr() if launch.perm else 0)
    stream = current_stream(x.get_device())
    with launch.params.lock:
        launch.params.fill(args)
        launch.kernel.launch(launch.grid, launch.params, stream, launch.smem, pdl and launch.pdl)


# -------------------------------------------------------------------------------------- the read reference


@dataclass(frozen=True)
class ReadShape:
    """A launch of ``stream.cu``'s ``read_xor``: ``blocks`` a multiprocessor (0: as many blocks as one round
    of loads takes, each thread ``unroll`` loads and done), ``threads`` a block, ``unroll`` 16-byte loads a
    thread a round, ``chunk`` a contiguous run a block (else the grid strides over all of it), ``pdl``
    overlapping the launch before (sm_90+, else ignored): 1 the next may start at once, 2 once a block's
    loads are done."""

    blocks: int
    threads: int
    unroll: int
    pdl: int = 0
    chunk: bool = False

    def name(self) -> str:
        grid = f"b{self.blocks}" if self.blocks else "one-round"
        return (f"read {grid} t{self.threads} u{self.unroll}" + ("+c" if self.chunk else "")
                + (f"+pdl{self.pdl}" if self.pdl else ""))

    def grid(self, n16: int, sms: int) -> int:
        """Blocks of a launch over ``n16`` 16-byte words on ``sms`` multiprocessors."""
        return self.blocks * sms if self.blocks else max(1, -(-n16 // (self.threads * self.unroll)))


# what the read reference is the fastest of: one block of 1024 threads a multiprocessor looping over the
# words (grid-stride or a run a block), and grids of one round of loads (many small blocks, as the products
# launch), 1 to 8 loads a thread, with and without overlapping the launch before
READ_SHAPES = ([ReadShape(1, 1024, u, pdl, chunk) for u in (4, 8) for chunk in (False, True) for pdl in (0, 1, 2)]
               + [ReadShape(0, t, u, pdl, chunk) for t in (128, 256, 512) for u in (1, 2, 4, 8)
                  for chunk in ((False,) if u == 1 else (False, True)) for pdl in (0, 1)])  # u = 1: no run to make


READ_SLOTS = 4096  # int32 words of read_xor's out (stream.cu's RS_SLOTS)


def read_xor(buf: torch.Tensor, out: torch.Tensor, shape: ReadShape = READ_SHAPES[0]) -> None:
    """XOR every 32-bit word of ``buf`` into ``out`` (:data:`READ_SLOTS` int32, whose XOR together is the
    result) on the current stream, reading each byte of ``buf`` once and doing nothing else: what reading as
    many bytes costs (``bench kernels``' reference). ``buf``: a contiguous CUDA tensor, 16-byte aligned, a
    multiple of 16 bytes; ``out`` contiguous on its device."""
    if (buf.device.type != "cuda" or out.device != buf.device or out.dtype != torch.int32
            or out.numel() != READ_SLOTS or not out.is_contiguous()):
        raise ValueError(f"read_xor reads a CUDA tensor into {READ_SLOTS} contiguous int32 on its device (got "
                         f"{buf.device}, out {out.dtype} × {out.numel()} on {out.device})")
    if not buf.is_contiguous() or buf.data_ptr() % 16 or buf.nbytes % 16:
        raise ValueError(f"read_xor reads whole 16-byte words: buf must be contiguous, 16-byte aligned and a "
                         f"multiple of 16 bytes (got {buf.nbytes} bytes at offset {buf.data_ptr() % 16})")
    facts = gpu(buf.device)
    pdl = shape.pdl if facts.capability >= (9, 0) else 0
    defines = dict(TPB=shape.threads, UNROLL=shape.unroll, PDL=pdl, CHUNK=int(shape.chunk), SLOTS=READ_SLOTS)
    key = ("read_xor", tuple(sorted(defines.items())), facts.index)
    k = _KERNELS.get(key)
    if k is None:
        cubin = _cubin(defines, facts.capability, READ_SOURCE, "RS_")
        k = _KERNELS[key] = Kernel(cubin, torch.device("cuda", facts.index), shape.threads, b"read_xor")
    params = Params("plp")
    params.fill((buf.data_ptr(), buf.nbytes // 16, out.data_ptr()))
    with torch.cuda.device(facts.index):  # its module belongs to that device's context
        k.launch((shape.grid(buf.nbytes // 16, facts.sms), 1), params, current_stream(facts.index), 0, pdl > 0)
