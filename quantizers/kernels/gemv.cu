// Packed-weight GEMV for up to a few rows of x: CUDA C++, compiled at run time by NVRTC
// (quantizers/kernels/cuda.py) with the settings below as -D macros (GV_BITS, GV_C, …). No headers: 16-bit floats are
// handled as bits through inline PTX.
//
// y (ROWS, N) = x (ROWS, K) · W, W (K, N) given as GPTQ-packed codes in sorted-group order:
//   qw     (K·BITS/32, N) uint32 in packed blocks of WPB word rows: 2 and 4 bits, word row r holds codes
//          k = r·CODES … r·CODES + CODES − 1 of each column, code j at bit BITS·j; 3 bits, 3 word rows hold
//          32 codes as one 96-bit stream, code j at bit 3j (codes 10 and 21 straddle two words);
//   scales (G, N) float16; zeros (G, N) uint8 (the true zero, not GPTQ's zero − 1); groups of `group_rows`
//          word rows (a multiple of a step's, checked by the caller).
//
// Work: block (column tile, K split) = W warps; thread = C adjacent columns; warp = a contiguous range of
// steps of U packed blocks. Each step's words, scales and zeros are loaded DEPTH − 1 steps ahead (registers
// as the buffer); the block's x waits in shared memory. Per pair of codes (4 bits: j, j + 4, 16 bits apart,
// one shift; 2 bits: byte b's 4b, 4b + 1 or 4b + 2, 4b + 3, one prmt of the word and the word >> 2 for
// both; 3 bits: j, j + 4, 12 bits apart, one shift or funnel shift of the block's stream that puts code j at
// bit 4 and code j + 4 at bit 16, as ptx.pair_asm does):
// one lop3 puts them under the bits of 2**e (ulp 1), one packed FMA subtracts 2**e + zero (exact
// code − zero; codes at bit 4 times 1/16), one packed FMA multiplies by x's matching pair
// (put in that order when x is staged). One word's products (3 bits: a run of 4 pairs)
// chain in 16 bits, then widen to float32 (as the Triton GEMV's pair path); the scale once per step.
// The warps of a block add up through shared memory; with SPLIT the blocks of a column tile add into a
// float32 workspace and the last one (counted) writes y, re-zeroing what it read. With PDL (sm_90+) the
// block loads its first steps of weights before it waits for the kernel launched before it. With PERM
// (act-order) the block reads x[perm[k]] for its K range as it stages x, so no gather kernel goes first.

#ifndef GV_BITS
#define GV_BITS 4
#endif
#ifndef GV_C
#define GV_C 1
#endif
#ifndef GV_W
#define GV_W 8
#endif
#ifndef GV_U
#define GV_U 4
#endif
#ifndef GV_DEPTH
#define GV_DEPTH 3
#endif
#ifndef GV_ROWS
#define GV_ROWS 1
#endif
#ifndef GV_F16
#define GV_F16 0
#endif
#ifndef GV_SPLIT
#define GV_SPLIT 0
#endif
#ifndef GV_HAS_BIAS
#define GV_HAS_BIAS 0
#endif
#ifndef GV_PDL  // sm_90+: may be launched as a programmatic dependent of the kernel before (see below)
#define GV_PDL 0
#endif
#ifndef GV_PERM  // act-order: the block gathers x[perm[k]] for its K range from all of x, staged in shared memory
#define GV_PERM 0
#endif
#ifndef GV_MMA  // the tensor-core variant for up to 16 rows (4 bits; see below the GEMV)
#define GV_MMA 0
#endif
#ifndef GV_XAHEAD  // (GV_MMA) a lane's x of a chunk in two 16-byte loads a row, one chunk ahead
#define GV_XAHEAD 0
#endif

typedef unsigned int u32;
typedef unsigned short u16;

// a packed block: GV_WPB words holding GV_CODES codes (2 and 4 bits: one word; 3 bits: 32 codes in 3 words,
// codes 10 and 21 straddling two words)
#if GV_BITS == 3
#define GV_WPB 3
#define GV_CODES 32
#else
#define GV_WPB 1
#define GV_CODES (32 / GV_BITS)
#endif
#define GV_XW (GV_CODES / 2)  // x's 32-bit words (pairs) per block
#define GV_UW (GV_U * GV_WPB)  // word rows a step (GV_U blocks)
#define GV_TPB (GV_W * 32)

#if GV_F16
#define MAGIC 0x6400u  // 1024: ulp 1
#define ONE 0x3C003C00u
#define SIXTEENTH 0x2C002C00u
#define ONE_SIXTEENTH 0x3C002C00u  // (1/16 low, 1 high)
#define NZ_BASE 0xE400u   // -(1024 + z) = NZ_BASE | z
#define NZ16_BASE 0xD400u // -(64 + z) = NZ16_BASE | z << 4
#define FMA2 "fma.rn.f16x2"
#else
#define MAGIC 0x4300u  // 128: ulp 1
#define ONE 0x3F803F80u
#define SIXTEENTH 0x3D803D80u
#define ONE_SIXTEENTH 0x3F803D80u
#define NZ_BASE 0xC300u   // -(128 + z)
#define NZ16_BASE 0xC100u // -(8 + z) = NZ16_BASE | z << 4
#define FMA2 "fma.rn.bf16x2"
#endif
#define MAGIC2 (MAGIC * 0x10001u)

static __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm(FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

static __device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

static __device__ __forceinline__ u32 shf_r(u32 lo, u32 hi, u32 n) {  // (hi:lo) >> n, 0 < n < 32
    u32 d;
    asm("shf.r.clamp.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(hi), "r"(n));
    return d;
}

// 3 bits: the 32 bits of the block's 96-bit stream (w2:w1:w0) from bit s on (s ≥ −4), enough to hold bits
// s + 4 … s + 18 (code j at bit 4, code j + 4 at bit 16 for s = 3j − 4); s is a constant once unrolled
static __device__ __forceinline__ u32 window3(u32 w0, u32 w1, u32 w2, int s) {
    if (s < 0) return w0 << (-s);
    const int w = s >> 5, o = s & 31;
    const u32 lo = w == 0 ? w0 : w == 1 ? w1 : w2;
    if (o == 0) return lo;
    if (w == 2 || s + 19 <= 32 * (w + 1)) return lo >> o;  // both codes in this word
    return shf_r(lo, w == 0 ? w1 : w2, o);
}

static __device__ __forceinline__ u32 lop3_or_and(u32 a, u32 mask, u32 magic) {  // (a & mask) | magic
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}

static __device__ __forceinline__ float lo_f32(u32 a) {  // the low 16-bit half as float32
#if GV_F16
    float f;
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l; }" : "=f"(f) : "r"(a));
    return f;
#else
    return __uint_as_float(a << 16);
#endif
}

static __device__ __forceinline__ float hi_f32(u32 a) {
#if GV_F16
    float f;
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(a));
    return f;
#else
    return __uint_as_float(a & 0xFFFF0000u);
#endif
}

static __device__ __forceinline__ float h2f(u16 h) {  // x's dtype (float16 or bfloat16) bits → float32
#if GV_F16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float(((u32)h) << 16);
#endif
}

static __device__ __forceinline__ float half2f(u16 h) {  // float16 bits (the scales) → float32
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

static __device__ __forceinline__ u16 f2h(float f) {  // float32 → x's dtype, round to nearest even
    u16 h;
#if GV_F16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// C words of one word row, streamed (not kept in L1)
static __device__ __forceinline__ void load_words(const u32* p, u32 (&w)[GV_C]) {
#if GV_C == 4
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
#elif GV_C == 2
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
#else
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
#endif
}

struct alignas(16) V4 {
    u32 a, b, c, d;
};

struct alignas(8) V2 {
    u32 x, y;
};

// 8 values of x (16 bytes) as the pairs (x_j, x_j+4), j = 0 … 3: the order of the code pairs at 3 and 4 bits
static __device__ __forceinline__ V4 pair_order(const V4& v) {
    return V4{prmt(v.a, v.c, 0x5410), prmt(v.a, v.c, 0x7632), prmt(v.b, v.d, 0x5410), prmt(v.b, v.d, 0x7632)};
}

// The steps of K a warp takes: its block's split [first, end) of `steps` (blockIdx.y's), cut into GV_W contiguous
// ranges; the warp's starts at w0 and holds n steps (0 for a warp past the end)
struct Range {
    int first, end, w0, n;
};
static __device__ __forceinline__ Range warp_range(int steps, int per_split, int warp) {
    const int first = blockIdx.y * per_split;
    const int end = min(steps, first + per_split);
    const int per_warp = (end - first + GV_W - 1) / GV_W;
    const int w0 = first + warp * per_warp;
    return Range{first, end, w0, max(0, min(end, w0 + per_warp) - w0)};
}

// The end of a block: its warps' sums red[w][m][j] (COLS columns from tile_n) added up, then y (+ bias) written.
// With SPLIT the sums go into the float32 workspace instead, and the column tile's last block (counted) writes
// y, re-zeroing what it read.
template <int ROWS, int COLS>
static __device__ __forceinline__ void block_out(const float (&red)[GV_W][ROWS][COLS], int tile_n,
                                                 const u16* __restrict__ bias, u16* __restrict__ y, int ldy,
                                                 float* __restrict__ ws, int* __restrict__ cnt, int N) {
    for (int o = threadIdx.x; o < ROWS * COLS; o += GV_TPB) {
        const int m = o / COLS, j = o % COLS, n = tile_n + j;
        if (n >= N) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < GV_W; ++w) v += red[w][m][j];
#if GV_SPLIT
        atomicAdd(ws + (size_t)m * N + n, v);
#else
#if GV_HAS_BIAS
        v += h2f(bias[n]);
#endif
        y[(size_t)m * ldy + n] = f2h(v);
#endif
    }
#if GV_SPLIT
    __shared__ int last_block;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int done = atomicAdd(cnt + blockIdx.x, 1);
        last_block = done == (int)gridDim.y - 1;
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    for (int o = threadIdx.x; o < ROWS * COLS; o += GV_TPB) {
        const int m = o / COLS, j = o % COLS, n = tile_n + j;
        if (n >= N) continue;
        float v = atomicExch(ws + (size_t)m * N + n, 0.f);
#if GV_HAS_BIAS
        v += h2f(bias[n]);
#endif
        y[(size_t)m * ldy + n] = f2h(v);
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
#endif
}

// The one signature of the three kernels below (one is compiled per variant); cuda.Params.KINDS follows it
#define GV_KERNEL                                                                                                \
    extern "C" __global__ void __launch_bounds__(GV_TPB) gemv(                                                   \
        const u32* __restrict__ qw, const u16* __restrict__ x, int ldx, const u16* __restrict__ scales,          \
        const unsigned char* __restrict__ zeros, const u16* __restrict__ bias, u16* __restrict__ y, int ldy,      \
        float* __restrict__ ws, int* __restrict__ cnt, int K, int N, int group_rows, int steps_per_split,         \
        const int* __restrict__ perm)

#if !GV_MMA
GV_KERNEL {
    // dynamic shared memory: the block's x, ROWS × (its word rows × XW) pairs (with PERM then all of x)
    extern __shared__ V4 smem4[];
    __shared__ float red[GV_W][GV_ROWS][32 * GV_C];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = (blockIdx.x * 32 + lane) * GV_C;  // this thread's first column
    const bool n_ok = n0 < N;
    const int nc = n_ok ? n0 : 0;
    const Range rg = warp_range((K / GV_CODES) / GV_U, steps_per_split, warp);  // steps of GV_U blocks
    const int s0 = rg.first, s1 = rg.end, w0 = rg.w0, nsteps = rg.n;
    const int xrows = (s1 - s0) * GV_U * GV_XW;  // pairs of x per row in shared memory

    // the words, zeros and scales of step d (of this warp), into ring slot `slot`
    u32 buf[GV_DEPTH][GV_UW][GV_C];
    u32 zb[GV_DEPTH][GV_C];
    u16 sb[GV_DEPTH][GV_C];
    // running pointers of the next fetch: words, and the (group, column) of scales and zeros
    const u32* wp = qw + (size_t)w0 * GV_UW * N + nc;
    const unsigned gr = (unsigned)group_rows;
    unsigned frow = (unsigned)(w0 * GV_UW);  // first word row of the next fetch
#define GV_FETCH(d, slot)                                                                   \
    if ((d) < nsteps) {                                                                     \
        const unsigned g = (frow / gr) * (unsigned)N + (unsigned)nc;                        \
        _Pragma("unroll") for (int c = 0; c < GV_C; ++c) {                                  \
            zb[slot][c] = zeros[g + c];                                                     \
            sb[slot][c] = scales[g + c];                                                    \
        }                                                                                   \
        if (n_ok)                                                                           \
            _Pragma("unroll") for (int u = 0; u < GV_UW; ++u) load_words(wp + u * N, buf[slot][u]); \
        wp += GV_UW * N;                                                                    \
        frow += GV_UW;                                                                      \
    }
#pragma unroll
    for (int d = 0; d < GV_DEPTH - 1; ++d) GV_FETCH(d, d)

    // x of the block's K range into shared memory while those loads fly, 8 values (16 bytes) at a time
    const int per_row = xrows / 4;  // V4s per row
#if GV_PERM  // act-order: x[perm[k]]; the perm of this thread's first 8 read before the wait (not written before)
    const V4* pp = reinterpret_cast<const V4*>(perm + (size_t)s0 * GV_U * GV_CODES);
    V4 p0{0, 0, 0, 0}, p1{0, 0, 0, 0};
    if ((int)threadIdx.x < GV_ROWS * per_row) {
        const int j = threadIdx.x % per_row;
        p0 = pp[2 * j];
        p1 = pp[2 * j + 1];
    }
#endif
#if GV_PDL
    // Launched while the kernel before may still run: the weights above are not written by it (the launcher
    // makes sure), x and everything written below may be. Once it is done, the next launch may start in turn
    // and load its own first weights while this one computes (at most two grids overlap: the next one waits
    // here before it lets a third start).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#if GV_PERM  // all of x (ROWS × K) after the block's pairs, 16 bytes at a time: gathered from there (2-byte
    // reads of global memory would fetch a 32-byte sector each, 16 times the bytes)
    u16* xall = reinterpret_cast<u16*>(smem4 + GV_ROWS * per_row);
    for (int i = threadIdx.x; i < GV_ROWS * (K / 8); i += GV_TPB) {
        const int m = i / (K / 8), j = i % (K / 8);
        reinterpret_cast<V4*>(xall)[i] = reinterpret_cast<const V4*>(x + (size_t)m * ldx)[j];
    }
    __syncthreads();
#endif
    for (int i = threadIdx.x; i < GV_ROWS * per_row; i += GV_TPB) {
        const int m = i / per_row, j = i % per_row;
#if GV_PERM
        if (i != (int)threadIdx.x) {
            p0 = pp[2 * j];
            p1 = pp[2 * j + 1];
        }
        const u16* xm = xall + (size_t)m * K;
        const u32 v0 = xm[p0.a], v1 = xm[p0.b], v2 = xm[p0.c], v3 = xm[p0.d];
        const u32 v4 = xm[p1.a], v5 = xm[p1.b], v6 = xm[p1.c], v7 = xm[p1.d];
#if GV_BITS != 2  // pairs (x_j, x_j+4), as below
        smem4[i] = V4{v0 | v4 << 16, v1 | v5 << 16, v2 | v6 << 16, v3 | v7 << 16};
#else
        smem4[i] = V4{v0 | v1 << 16, v2 | v3 << 16, v4 | v5 << 16, v6 | v7 << 16};
#endif
#else
        const V4 v = reinterpret_cast<const V4*>(x + (size_t)m * ldx + (size_t)s0 * GV_U * GV_CODES)[j];
#if GV_BITS != 2  // pairs (x_j, x_j+4) of each run of 8, as the codes j, j + 4 are paired (16 or 12 bits apart)
        smem4[i] = pair_order(v);
#else  // pairs (x_2i, x_2i+1) as they are
        smem4[i] = v;
#endif
#endif
    }
    __syncthreads();

    float acc[GV_ROWS][GV_C];
#pragma unroll
    for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
        for (int c = 0; c < GV_C; ++c) acc[m][c] = 0.f;

    for (int base = 0; base < nsteps; base += GV_DEPTH) {
#pragma unroll
        for (int d = 0; d < GV_DEPTH; ++d) {
            const int st = base + d;
            if (st < nsteps) {
                GV_FETCH(st + GV_DEPTH - 1, (d + GV_DEPTH - 1) % GV_DEPTH)
                const int xr0 = (w0 - s0 + st) * GV_U;  // the step's first packed block within the block's x
                float s[GV_ROWS][GV_C];
#pragma unroll
                for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
                    for (int c = 0; c < GV_C; ++c) s[m][c] = 0.f;
#pragma unroll
                for (int c = 0; c < GV_C; ++c) {
                    const u32 z = zb[d][c];
#if GV_BITS != 3
                    const u32 nz = (NZ_BASE | z) * 0x10001u;
#endif
#if GV_BITS == 2
                    const u32 nz16 = (NZ16_BASE | (z << 4)) * 0x10001u;
#elif GV_BITS == 3  // −(2**e / 16 + z) low (the code at bit 4 times 1/16), −(2**e + z) high
                    const u32 nz3 = ((NZ_BASE | z) << 16) | (NZ16_BASE | (z << 4));
#endif
#pragma unroll
                    for (int u = 0; u < GV_U; ++u) {
                        u32 a[GV_ROWS];
#if GV_BITS == 3  // 16 pairs a block: x's read a run of 4 pairs at a time (registers at 8 rows)
                        const u32 w0 = buf[d][3 * u][c], w1 = buf[d][3 * u + 1][c], w2 = buf[d][3 * u + 2][c];
#pragma unroll
                        for (int r = 0; r < 4; ++r) {  // run r: codes 8r … 8r + 7, pairs (8r + i, 8r + i + 4)
                            u32 xv[GV_ROWS][4];
#pragma unroll
                            for (int m = 0; m < GV_ROWS; ++m) {
                                const V4 v = smem4[(m * xrows + (xr0 + u) * GV_XW) / 4 + r];
                                xv[m][0] = v.a;
                                xv[m][1] = v.b;
                                xv[m][2] = v.c;
                                xv[m][3] = v.d;
                            }
#pragma unroll
                            for (int i = 0; i < 4; ++i) {
                                const u32 t = window3(w0, w1, w2, 3 * (8 * r + i) - 4);
                                const u32 q = fma2(lop3_or_and(t, 0x00070070u, MAGIC2), ONE_SIXTEENTH, nz3);
#pragma unroll
                                for (int m = 0; m < GV_ROWS; ++m) a[m] = fma2(q, xv[m][i], i ? a[m] : 0x80008000u);
                            }
                            if (r < 3) {  // a run's 4 products widen to float32 (the last run's below)
#pragma unroll
                                for (int m = 0; m < GV_ROWS; ++m) s[m][c] += lo_f32(a[m]) + hi_f32(a[m]);
                            }
                        }
#else
                        u32 xv[GV_ROWS][GV_XW];
#pragma unroll
                        for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
                            for (int i = 0; i < GV_XW; i += 4) {
                                const V4 v = smem4[(m * xrows + (xr0 + u) * GV_XW + i) / 4];
                                xv[m][i] = v.a;
                                xv[m][i + 1] = v.b;
                                xv[m][i + 2] = v.c;
                                xv[m][i + 3] = v.d;
                            }
                        const u32 w = buf[d][u][c];
#endif
#if GV_BITS == 4
#pragma unroll
                        for (int i = 0; i < 4; ++i) {  // codes i, i + 4 at bits 4i, 4i + 16
                            const u32 t = i ? w >> (4 * i) : w;
                            const u32 q = fma2(lop3_or_and(t, 0x000F000Fu, MAGIC2), ONE, nz);
#pragma unroll
                            for (int m = 0; m < GV_ROWS; ++m) a[m] = fma2(q, xv[m][i], i ? a[m] : 0x80008000u);
                        }
#elif GV_BITS == 2
                        const u32 sh = w >> 2;
#pragma unroll
                        for (int b = 0; b < 4; ++b) {  // byte b: codes 4b, 4b + 1 (bits 0, 2), 4b + 2, 4b + 3 (4, 6)
                            const u32 t = prmt(w, sh, b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12));
                            const u32 q0 = fma2(lop3_or_and(t, 0x00030003u, MAGIC2), ONE, nz);
                            const u32 q1 = fma2(lop3_or_and(t, 0x00300030u, MAGIC2), SIXTEENTH, nz16);
#pragma unroll
                            for (int m = 0; m < GV_ROWS; ++m) {
                                a[m] = fma2(q0, xv[m][2 * b], b ? a[m] : 0x80008000u);
                                a[m] = fma2(q1, xv[m][2 * b + 1], a[m]);
                            }
                        }
#endif
#pragma unroll
                        for (int m = 0; m < GV_ROWS; ++m) s[m][c] += lo_f32(a[m]) + hi_f32(a[m]);
                    }
                }
#pragma unroll
                for (int c = 0; c < GV_C; ++c) {
                    const float sc = half2f(sb[d][c]);
#pragma unroll
                    for (int m = 0; m < GV_ROWS; ++m) acc[m][c] = fmaf(s[m][c], sc, acc[m][c]);
                }
            }
        }
    }
#undef GV_FETCH

#pragma unroll
    for (int m = 0; m < GV_ROWS; ++m)
#pragma unroll
        for (int c = 0; c < GV_C; ++c) red[warp][m][lane * GV_C + c] = acc[m][c];
    __syncthreads();

    block_out(red, blockIdx.x * 32 * GV_C, bias, y, ldy, ws, cnt, N);
}
#endif  // !GV_MMA

#if GV_MMA
// The tensor-core variant (GV_MMA, 4 bits, up to 16 rows of x, x in sorted order: act-order's gathered first).
// It reads the GPTQ layout as it is: no copy of the weights in another layout. Work: block (32-column tile,
// K split) = W warps, each a contiguous range of chunks of 64 codes of k (8 word rows); lane (g, t) = (lane / 4,
// lane % 4) loads, per chunk, word rows 2t and 2t + 1 of columns 4g … 4g + 3 of the tile (two 16-byte loads; a
// warp reads 8 rows × 128 bytes). Those columns are the four n8 tiles' column g: tile i's column g is the
// tile's column 4g + i. Along k, mma.m16n8k16 sums over its 16 positions in any order as long as x and the
// weights agree, so step s (0 … 3) of a chunk takes position 2t, 2t + 1, 2t + 8, 2t + 9 of lane (·, t) from
// k = 16t + 4s + 0, 1, 2, 3 of the chunk: the weights' pairs are bytes 2(s & 1) and 2(s & 1) + 1 of word
// row 2t + (s >> 1) (codes 2b, 2b + 1 of byte b: one prmt, one lop3, one packed FMA give code − zero exactly),
// x's are 4 adjacent values of its rows g and g + 8 (8 bytes each). A chunk's four steps accumulate in float32
// in the tensor cores, then times the chunk's scales (lane (g, t) holds output columns 8t … 8t + 7: one 16-byte
// load of scales) into the totals. The warps add up through shared memory; with SPLIT, blocks through the
// workspace as the GEMV's do. With XAHEAD a lane's x of a chunk (its rows' k = 16t … 16t + 15: 32 bytes a row,
// step s's pairs in words 2s, 2s + 1) is loaded in two 16-byte loads a row one chunk ahead, instead of one
// 8-byte load a row a step as the step needs it; rows past MM_ROWS are not loaded.
#define MM_ROWS GV_ROWS  // 1 … 16
#if GV_F16
#define MMA_OP "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#else
#define MMA_OP "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#endif

static __device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(MMA_OP " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void ld_x8(const u16* p, u32& lo, u32& hi) {  // 4 x values, 8 bytes
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(lo), "=r"(hi) : "l"(p));
}

static __device__ __forceinline__ void ld_x16(const u16* p, V4& v) {  // 8 x values, 16 bytes
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(p));
}

#if GV_MMA == 1

GV_KERNEL {
    __shared__ float red[GV_W][MM_ROWS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 32;
    const bool n_ok = n0 + 4 * g < N;  // N is a multiple of 4 (checked by the caller)
    const int nc = n_ok ? n0 + 4 * g : 0;
    const Range rg = warp_range(K / 64, steps_per_split, warp);  // chunks of 64 codes
    const int w0 = rg.w0, nchunks = rg.n;
    const unsigned gr = (unsigned)group_rows;

    V4 wa[GV_DEPTH], wb[GV_DEPTH];  // word rows 2t, 2t + 1 of the 4 columns, per chunk in flight
    u32 zb[GV_DEPTH];               // the 4 columns' zeros
    V4 sb[GV_DEPTH];                // scales of output columns 8t … 8t + 7
#define MM_FETCH(dd, sl)                                                                            \
    if ((dd) < nchunks) {                                                                             \
        const unsigned row = (unsigned)((w0 + (dd)) * 8);                                             \
        const unsigned grp = (row / gr) * (unsigned)N;                                               \
        if (n_ok) {                                                                                  \
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"               \
                         : "=r"(wa[sl].a), "=r"(wa[sl].b), "=r"(wa[sl].c), "=r"(wa[sl].d)    \
                         : "l"(qw + (size_t)(row + 2 * t) * N + nc));                                \
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"               \
                         : "=r"(wb[sl].a), "=r"(wb[sl].b), "=r"(wb[sl].c), "=r"(wb[sl].d)    \
                         : "l"(qw + (size_t)(row + 2 * t + 1) * N + nc));                            \
            zb[sl] = *reinterpret_cast<const u32*>(zeros + grp + nc);                              \
        }                                                                                            \
        if (n0 + 8 * t < N) sb[sl] = *reinterpret_cast<const V4*>(scales + grp + n0 + 8 * t);      \
    }
#pragma unroll
    for (int d = 0; d < GV_DEPTH - 1; ++d) MM_FETCH(d, d)
#if GV_PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const int ra = g < MM_ROWS ? g : 0, rb = g + 8 < MM_ROWS ? g + 8 : 0;  // x's rows for this lane (clamped)
    const u16* xa = x + (size_t)ra * ldx + 16 * t;
    const u16* xb = x + (size_t)rb * ldx + 16 * t;
#if GV_XAHEAD
    // the x of chunk dd (a lane's 16 values of rows g and g + 8) into slot sl; zeros for rows past MM_ROWS
    V4 xv[GV_DEPTH][2];
#if MM_ROWS > 8
    V4 xw[GV_DEPTH][2];
#define MM_XROW8(dd, sl)                                                                             \
    if (g + 8 < MM_ROWS) {                                                                           \
        ld_x16(xb + (w0 + (dd)) * 64, xw[sl][0]);                                                   \
        ld_x16(xb + (w0 + (dd)) * 64 + 8, xw[sl][1]);                                               \
    } else {                                                                                         \
        xw[sl][0] = xw[sl][1] = V4{0u, 0u, 0u, 0u};                                                  \
    }
#else
#define MM_XROW8(dd, sl)
#endif
#define MM_XFETCH(dd, sl)                                                                            \
    if ((dd) < nchunks) {                                                                            \
        if (g < MM_ROWS) {                                                                           \
            ld_x16(xa + (w0 + (dd)) * 64, xv[sl][0]);                                               \
            ld_x16(xa + (w0 + (dd)) * 64 + 8, xv[sl][1]);                                           \
        } else {                                                                                     \
            xv[sl][0] = xv[sl][1] = V4{0u, 0u, 0u, 0u};                                              \
        }                                                                                            \
        MM_XROW8(dd, sl)                                                                             \
    }
#define MM_XNEXT (GV_DEPTH > 1 ? 1 : 0)  // chunks ahead (one slot only: the current chunk's)
    if (MM_XNEXT) MM_XFETCH(0, 0)
#endif

    float tot[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) tot[i][e] = 0.f;

    for (int base = 0; base < nchunks; base += GV_DEPTH) {
#pragma unroll
        for (int d = 0; d < GV_DEPTH; ++d) {
            const int ch = base + d;
            if (ch < nchunks) {
                MM_FETCH(ch + GV_DEPTH - 1, (d + GV_DEPTH - 1) % GV_DEPTH)
#if GV_XAHEAD
                MM_XFETCH(ch + MM_XNEXT, (d + MM_XNEXT) % GV_DEPTH)
                const u32 xr[8] = {xv[d][0].a, xv[d][0].b, xv[d][0].c, xv[d][0].d,
                                   xv[d][1].a, xv[d][1].b, xv[d][1].c, xv[d][1].d};
#if MM_ROWS > 8
                const u32 xs[8] = {xw[d][0].a, xw[d][0].b, xw[d][0].c, xw[d][0].d,
                                   xw[d][1].a, xw[d][1].b, xw[d][1].c, xw[d][1].d};
#endif
#else
                const int k0 = (w0 + ch) * 64;
#endif
                const u32 wz[4] = {zb[d] & 0xFFu, (zb[d] >> 8) & 0xFFu, (zb[d] >> 16) & 0xFFu, zb[d] >> 24};
                u32 nz[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) nz[i] = (NZ_BASE | wz[i]) * 0x10001u;
                const u32 wv[2][4] = {{wa[d].a, wa[d].b, wa[d].c, wa[d].d}, {wb[d].a, wb[d].b, wb[d].c, wb[d].d}};
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    u32 a0, a2, a1 = 0u, a3 = 0u;  // rows g (a0: k pair 0, 1; a2: 2, 3) and g + 8
#if GV_XAHEAD
                    a0 = xr[2 * s];
                    a2 = xr[2 * s + 1];
#if MM_ROWS > 8
                    a1 = xs[2 * s];
                    a3 = xs[2 * s + 1];
#endif
#else
                    ld_x8(xa + k0 + 4 * s, a0, a2);
                    if (g >= MM_ROWS) a0 = a2 = 0u;
#if MM_ROWS > 8
                    ld_x8(xb + k0 + 4 * s, a1, a3);
                    if (g + 8 >= MM_ROWS) a1 = a3 = 0u;
#endif
#endif
                    const int byte = 2 * (s & 1);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const u32 w = wv[s >> 1][i];
                        const u32 u = w >> 4;
                        const u32 b0 = fma2(lop3_or_and(prmt(w, u, byte | (byte << 4) | ((4 + byte) << 8) |
                                                                     ((4 + byte) << 12)), 0x000F000Fu, MAGIC2), ONE, nz[i]);
                        const u32 b1 = fma2(lop3_or_and(prmt(w, u, (byte + 1) | ((byte + 1) << 4) | ((5 + byte) << 8) |
                                                                     ((5 + byte) << 12)), 0x000F000Fu, MAGIC2), ONE, nz[i]);
                        mma16816(acc[i], a0, a1, a2, a3, b0, b1);
                    }
                }
                // tile i's accumulators: (row g, columns 2t, 2t + 1), (row g + 8, the same) of the n8 tile, i.e.
                // output columns 8t + i and 8t + 4 + i of the block's 32
                const u32 sv[4] = {sb[d].a, sb[d].b, sb[d].c, sb[d].d};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float s_lo = half2f((u16)((i & 1) ? sv[i >> 1] >> 16 : sv[i >> 1] & 0xFFFFu));
                    const float s_hi = half2f((u16)((i & 1) ? sv[2 + (i >> 1)] >> 16 : sv[2 + (i >> 1)] & 0xFFFFu));
                    tot[i][0] = fmaf(acc[i][0], s_lo, tot[i][0]);
                    tot[i][1] = fmaf(acc[i][1], s_hi, tot[i][1]);
                    tot[i][2] = fmaf(acc[i][2], s_lo, tot[i][2]);
                    tot[i][3] = fmaf(acc[i][3], s_hi, tot[i][3]);
                }
            }
        }
    }
#undef MM_FETCH
#if GV_XAHEAD
#undef MM_XFETCH
#undef MM_XROW8
#undef MM_XNEXT
#endif

#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e >> 1), col = 8 * t + 4 * (e & 1) + i;
            if (row < MM_ROWS) red[warp][row][col] = tot[i][e];
        }
    __syncthreads();

    block_out(red, n0, bias, y, ldy, ws, cnt, N);
}
#endif  // GV_MMA == 1

#if GV_MMA == 2
// The tensor-core GEMV ("+sw": 4 bits, up to 16 rows of x, x in sorted order: act-order's gathered first). The
// weights are mma's A operand (16 output columns × 16 k) and x its B (k × 8 rows of x; a second B tile past 8
// rows), so one mma.m16n8k16 takes 256 codes and the rows of x cost little more than one. Work: block
// (32·C-column tile, K split) = W warps, each a contiguous range of chunks of 64 codes (8 word rows). Lane
// (g, t) = (lane / 4, lane % 4) loads word rows 2t and 2t + 1 of the chunk at columns 32v + 4g … 32v + 4g + 3
// (v < C: one 16-byte load each); of its 4C words of a row, word j = 4v + e (column 32v + 4g + e) is row g of
// m16 tile j / 2 for even j, row g + 8 for odd j. Along k, mma sums its 16 positions in any order as long as A
// and B agree: step s (0 … 3) of the chunk puts codes (p, p + 4) of word row 2t + (s >> 1) (p = 2(s & 1)) at
// A's positions 2t, 2t + 1 and codes (p + 1, p + 5) at 2t + 8, 2t + 9, and B takes x at the same k: x is staged
// in shared memory as the GEMV stages it (pairs (x_j, x_j+4) of each run of 8), so a word row's four pairs are
// one 16-byte read. The codes go in as 2**e + code (one shift, one lop3 a pair: exact in 16 bits), the tensor
// cores sum in float32, and the zero comes off once per group: Σ (q − z) x = acc − (2**e + z) · Σx, with Σx of
// each (row, chunk) summed as x is staged. Then times the group's scales into the totals; the warps add up
// through shared memory, and with SPLIT the blocks through the workspace, as the GEMV's do.
#define MW_T (2 * GV_C)              // m16 tiles a warp: 16·2C output columns
#define MW_NB ((GV_ROWS + 7) / 8)    // n8 tiles of x's rows
#define MW_COLS (32 * GV_C)          // a block's columns
#if GV_F16
#define MW_MAGIC_F 1024.0f
#else
#define MW_MAGIC_F 128.0f
#endif

GV_KERNEL {
    // dynamic shared memory: the block's x (ROWS × (its chunks × 8 + 1) V4s of pairs: a row's start one V4 on from
    // the last's, so that the lanes reading 8 rows at once hit different banks), then Σx of each (row, chunk)
    extern __shared__ V4 smem4[];
    __shared__ float red[GV_W][GV_ROWS][MW_COLS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * MW_COLS;
    const Range rg = warp_range(K / 64, steps_per_split, warp);  // chunks of 64 codes
    const int c0 = rg.first, nch = rg.end - rg.first, w0 = rg.w0, nchunks = rg.n;
    const unsigned gr = (unsigned)group_rows;

    u32 wq[GV_DEPTH][2][4 * GV_C];  // word rows 2t, 2t + 1 of the chunk: words j = 4v + e
    u32 zq[GV_DEPTH][GV_C];         // zeros of columns 32v + 4g … + 3 (a byte each)
    V2 sq[GV_DEPTH][GV_C];          // their scales (float16)
#define MW_FETCH(dd, sl)                                                                              \
    if ((dd) < nchunks) {                                                                             \
        const unsigned row = (unsigned)((w0 + (dd)) * 8);                                             \
        const unsigned grp = (row / gr) * (unsigned)N;                                               \
        _Pragma("unroll") for (int v = 0; v < GV_C; ++v) {                                            \
            const int col = n0 + 32 * v + 4 * g;                                                      \
            if (col < N) {                                                                            \
                const u32* p = qw + (size_t)(row + 2 * t) * N + col;                                  \
                asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"            \
                             : "=r"(wq[sl][0][4 * v]), "=r"(wq[sl][0][4 * v + 1]), "=r"(wq[sl][0][4 * v + 2]), \
                               "=r"(wq[sl][0][4 * v + 3]) : "l"(p));                                  \
                asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"            \
                             : "=r"(wq[sl][1][4 * v]), "=r"(wq[sl][1][4 * v + 1]), "=r"(wq[sl][1][4 * v + 2]), \
                               "=r"(wq[sl][1][4 * v + 3]) : "l"(p + N));                              \
                zq[sl][v] = *reinterpret_cast<const u32*>(zeros + grp + col);                         \
                sq[sl][v] = *reinterpret_cast<const V2*>(scales + grp + col);                         \
            }                                                                                         \
        }                                                                                             \
    }
#pragma unroll
    for (int d = 0; d < GV_DEPTH - 1; ++d) MW_FETCH(d, d)
#if GV_PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    // x of the block's chunks into shared memory in pair order, and each (row, chunk)'s Σx: the 8 threads of a
    // chunk's 8 V4s add up by shuffles (the trip count is the block's, so every lane takes part)
    const int per_row = nch * 8;  // V4s a row
    const int stride = per_row + 1;
    const int total = GV_ROWS * per_row;
    float* xsum = reinterpret_cast<float*>(smem4 + GV_ROWS * stride);  // [row][chunk of the block]
    for (int i0 = 0; i0 < total; i0 += GV_TPB) {
        const int i = i0 + (int)threadIdx.x;
        float sum = 0.f;
        if (i < total) {
            const int m = i / per_row, j = i % per_row;
            const V4 v = reinterpret_cast<const V4*>(x + (size_t)m * ldx + (size_t)c0 * 64)[j];
            smem4[m * stride + j] = pair_order(v);
            sum = ((lo_f32(v.a) + hi_f32(v.a)) + (lo_f32(v.b) + hi_f32(v.b))) +
                  ((lo_f32(v.c) + hi_f32(v.c)) + (lo_f32(v.d) + hi_f32(v.d)));
        }
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 4);
        if (i < total && (i & 7) == 0) xsum[i >> 3] = sum;
    }
    __syncthreads();

    float acc[MW_T][MW_NB][4], tot[MW_T][MW_NB][4];  // this group's raw sums, and the totals
    float xs[MW_NB][2];                               // Σx of rows 8nb + 2t, 2t + 1 over the chunks in acc
#pragma unroll
    for (int i = 0; i < MW_T; ++i)
#pragma unroll
        for (int nb = 0; nb < MW_NB; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][nb][e] = tot[i][nb][e] = 0.f;
#pragma unroll
    for (int nb = 0; nb < MW_NB; ++nb) xs[nb][0] = xs[nb][1] = 0.f;

    for (int base = 0; base < nchunks; base += GV_DEPTH) {
#pragma unroll
        for (int d = 0; d < GV_DEPTH; ++d) {
            const int ch = base + d;
            if (ch < nchunks) {
                MW_FETCH(ch + GV_DEPTH - 1, (d + GV_DEPTH - 1) % GV_DEPTH)
                const int cl = w0 - c0 + ch;  // the chunk within the block's
                u32 xb[MW_NB][2][4];  // B: x's pairs of word rows 2t, 2t + 1 for row 8nb + g (zeros past ROWS)
#pragma unroll
                for (int nb = 0; nb < MW_NB; ++nb) {
                    const int m = 8 * nb + g;
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        V4 v{0u, 0u, 0u, 0u};
                        if (m < GV_ROWS) v = smem4[m * stride + cl * 8 + 2 * t + r];
                        xb[nb][r][0] = v.a;
                        xb[nb][r][1] = v.b;
                        xb[nb][r][2] = v.c;
                        xb[nb][r][3] = v.d;
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        if (8 * nb + 2 * t + h < GV_ROWS) xs[nb][h] += xsum[(8 * nb + 2 * t + h) * nch + cl];
                }
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const int r = s >> 1, p = 2 * (s & 1);
#pragma unroll
                    for (int i = 0; i < MW_T; ++i) {
                        const u32 wa = wq[d][r][2 * i], wb = wq[d][r][2 * i + 1];
                        const u32 a0 = lop3_or_and(p ? wa >> (4 * p) : wa, 0x000F000Fu, MAGIC2);
                        const u32 a2 = lop3_or_and(wa >> (4 * p + 4), 0x000F000Fu, MAGIC2);
                        const u32 a1 = lop3_or_and(p ? wb >> (4 * p) : wb, 0x000F000Fu, MAGIC2);
                        const u32 a3 = lop3_or_and(wb >> (4 * p + 4), 0x000F000Fu, MAGIC2);
#pragma unroll
                        for (int nb = 0; nb < MW_NB; ++nb) mma16816(acc[i][nb], a0, a1, a2, a3, xb[nb][r][p], xb[nb][r][p + 1]);
                    }
                }
                // the group's last chunk (or the warp's): the zero off, times the scales, into the totals
                const unsigned row = (unsigned)((w0 + ch) * 8);
                if (ch == nchunks - 1 || (row + 8) / gr != row / gr) {
#pragma unroll
                    for (int j = 0; j < 4 * GV_C; ++j) {
                        const int v = j >> 2, e = j & 3, i = j >> 1, half = j & 1;
                        const float zf = MW_MAGIC_F + (float)((zq[d][v] >> (8 * e)) & 0xFFu);
                        const u32 sw = (e < 2 ? sq[d][v].x : sq[d][v].y) >> (16 * (e & 1));
                        const float sc = half2f((u16)(sw & 0xFFFFu));
#pragma unroll
                        for (int nb = 0; nb < MW_NB; ++nb)
#pragma unroll
                            for (int h = 0; h < 2; ++h) {
                                float& a = acc[i][nb][2 * half + h];
                                tot[i][nb][2 * half + h] = fmaf(sc, fmaf(-zf, xs[nb][h], a), tot[i][nb][2 * half + h]);
                                a = 0.f;
                            }
                    }
#pragma unroll
                    for (int nb = 0; nb < MW_NB; ++nb) xs[nb][0] = xs[nb][1] = 0.f;
                }
            }
        }
    }
#undef MW_FETCH

    // c: (row g: word 2i, row g + 8: word 2i + 1) × (x's rows 8nb + 2t, 2t + 1)
#pragma unroll
    for (int i = 0; i < MW_T; ++i)
#pragma unroll
        for (int nb = 0; nb < MW_NB; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = 2 * i + (e >> 1), m = 8 * nb + 2 * t + (e & 1);
                if (m < GV_ROWS) red[warp][m][32 * (j >> 2) + 4 * g + (j & 3)] = tot[i][nb][e];
            }
    __syncthreads();

    block_out(red, n0, bias, y, ldy, ws, cnt, N);
}
#endif  // GV_MMA == 2

#endif  // GV_MMA
