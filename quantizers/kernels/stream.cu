// A read-only kernel: what reading a given number of bytes once costs, as a reference for the products.
//
// read_xor streams n16 16-byte words from p with streaming loads (not kept in L1), UNROLL loads a thread
// a round (at 8, ptxas keeps 5 in flight), in a grid-stride loop or a contiguous run a block, and folds
// them into a 32-bit XOR a warp that it adds to one of RS_SLOTS words of out by atomicXor: the XOR of
// out depends on every word, so no load can be dropped, and a test checks it against the XOR computed
// on the host. python -m harness.bench kernels times the packed-weight products against it, as a
// reference rather than a proven bound.
// Compiled at run time by NVRTC (quantizers/kernels/cuda.py) with -DRS_TPB=<threads a block>,
// -DRS_UNROLL=<loads a thread a round>, -DRS_CHUNK=<0|1> (grid-stride, or a contiguous run a block) and
// -DRS_PDL=<0|1|2>: with 1 or 2 (sm_90+) a launch lets the next kernel start at once (1) or once its block
// has loaded its words (2), and waits for the one before only to write out.

#ifndef RS_TPB
#define RS_TPB 256
#endif
#ifndef RS_UNROLL
#define RS_UNROLL 4
#endif
#ifndef RS_PDL  // 0: plain; 1: the next kernel may start at once; 2: once this block's loads are done
#define RS_PDL 0
#endif
#ifndef RS_CHUNK  // 0: the grid strides over all of p; 1: each block reads its own contiguous run
#define RS_CHUNK 0
#endif

#ifndef RS_SLOTS  // words of out the warps' results are spread over (the caller XORs them together)
#define RS_SLOTS 4096
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(RS_TPB) read_xor(const uint4* __restrict__ p, u64 n16, u32* out) {
#if RS_PDL == 1
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#if RS_CHUNK  // block b: words [b·per, (b + 1)·per), per a multiple of the block's threads
    const u64 per = ((n16 + gridDim.x - 1) / gridDim.x + RS_TPB - 1) / RS_TPB * RS_TPB;
    const u64 stride = RS_TPB, first = (u64)blockIdx.x * per, end = first + per < n16 ? first + per : n16;
    u64 i = first + threadIdx.x;
#else
    const u64 stride = (u64)gridDim.x * RS_TPB, end = n16;
    u64 i = (u64)blockIdx.x * RS_TPB + threadIdx.x;
#endif
    u32 acc = 0;
    for (; i + (RS_UNROLL - 1) * stride < end; i += RS_UNROLL * stride) {  // UNROLL loads a round
        uint4 v[RS_UNROLL];
#pragma unroll
        for (int u = 0; u < RS_UNROLL; ++u)
            asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + i + u * stride));
#pragma unroll
        for (int u = 0; u < RS_UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < end; i += stride) {  // the last round's remainder
        uint4 v;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
#if RS_PDL == 2
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#if RS_PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");  // out may be reset by the work before
#endif
    // one slot of out a warp, RS_SLOTS of them round robin: thousands of warps adding to one word would queue
    // at its L2 slice
    const u64 slot = ((u64)blockIdx.x * (RS_TPB / 32) + threadIdx.x / 32) % RS_SLOTS;
    if ((threadIdx.x & 31) == 0) atomicXor(out + slot, acc);
}
