// The CUDA kernels of the portable build (sam_fast._C_stable_cuda): ops_cuda.cu itself,
// compiled against PyTorch's stable ABI (csrc/api.h, cuda/cuda_api.h) for torch 2.10
// and later. A file of its own, so the two builds of the same source never share an
// object file.
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION 0x020a000000000000ULL  // torch 2.10: the oldest torch served
#endif
#ifndef USE_CUDA
#define USE_CUDA 1  // declares the stable ABI's CUDA shims (current stream, check message)
#endif
#define SAM_FAST_STABLE 1
#include "ops_cuda.cu"
