// Multi-tensor apply: one kernel launch covers many tensors.
//
// The scheme of apex and of PyTorch's foreach kernels: the tensors' addresses
// and sizes travel *by value* in the kernel's parameters (no host-to-device
// copy, nothing to synchronize, so a launch can be captured in a CUDA graph),
// each tensor is cut into chunks of kChunkSize elements, and a block -> (tensor,
// chunk) map says which chunk each block works on. When the parameter struct
// is full (tensors or blocks), the launcher launches and starts a new one,
// carrying over a tensor that is only partly covered.
//
// Two sizes of parameter struct. Every CUDA version and GPU accepts 4 KiB of
// kernel parameters; CUDA 12.1 and later accept 32 764 bytes on Volta and
// newer when the driver is 12.1 or newer too (the runtime may be newer than
// the driver: minor-version compatibility), which PyTorch's own foreach
// kernels use as well. With 8x the metadata a model of a few hundred tensors
// takes one launch per op instead of several (ResNet-50's 161 tensors, 508
// chunks: 3 launches of perturb_, 4 of restore_sgd_, 6 of restore_adamw_ with
// 4 KiB; 1 each with 32 KiB). Both kernels are compiled
// where the toolkit has large parameters; which one runs is decided per call
// (large_params_usable below, and only when the 4 KiB struct would need more
// than one launch: a smaller struct is less to copy per launch).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda_api.h"  // both builds: ATen's CUDA context, or the stable ABI's

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && !defined(USE_ROCM)
#define SAMF_LARGE_PARAMS 1
#else
#define SAMF_LARGE_PARAMS 0
#endif

// A device pass for an architecture older than Volta cannot even compile a
// kernel whose parameters exceed 4 KiB: there the 32 KiB kernels are only
// declared (the host never launches them on such a device).
#if SAMF_LARGE_PARAMS && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#define SAMF_LARGE_KERNEL_DEFINED 0
#else
#define SAMF_LARGE_KERNEL_DEFINED 1
#endif

namespace sam_fast::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr size_t kOpParamBytes = 256;  // room kept for the op functor and extra arguments

// The two launch configurations. The large one's block map has 2048 entries
// (134M elements per launch: for perturb_ ~2 GB of traffic, ~0.5 ms on an
// H200, so more blocks would save nothing measurable) and the rest of its
// 32 KiB holds tensors (280 to 841 depending on the op), so its tensor index
// needs 16 bits.
template <bool kLarge>
struct LaunchConfig;

template <>
struct LaunchConfig<false> {
  static constexpr size_t kParamBytes = 4096;
  static constexpr int kMaxBlocks = 320;
  using TensorIndex = unsigned char;
};

template <>
struct LaunchConfig<true> {
  static constexpr size_t kParamBytes = 32764;  // CUDA's limit with large parameters
  static constexpr int kMaxBlocks = 2048;
  using TensorIndex = uint16_t;
};

struct NoExtra {};

// Per launch: Depth lists of up to kMaxTensors tensors, an optional
// per-tensor Extra (e.g. Adam's bias corrections), and the block map.
template <int Depth, typename Extra, bool kLarge>
struct TensorListMetadata {
  using Config = LaunchConfig<kLarge>;
  using TensorIndex = typename Config::TensorIndex;
  static constexpr int kMaxBlocks = Config::kMaxBlocks;
  static constexpr size_t kExtraBytes = std::is_empty_v<Extra> ? 0 : sizeof(Extra);
  static constexpr size_t kBytesPerTensor = Depth * sizeof(void*) + sizeof(int64_t) + kExtraBytes;
  static constexpr size_t kMapBytes = kMaxBlocks * (sizeof(TensorIndex) + sizeof(int32_t));
  static constexpr int kFit = static_cast<int>(
      (Config::kParamBytes - kOpParamBytes - kMapBytes - 16) / kBytesPerTensor);
  static constexpr int kIndexLimit = static_cast<int>(std::numeric_limits<TensorIndex>::max()) + 1;
  static constexpr int kMaxTensors = kFit < kIndexLimit ? kFit : kIndexLimit;

  void* addresses[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  Extra extra[std::is_empty_v<Extra> ? 1 : kMaxTensors];
  TensorIndex block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// The data pointers of the Depth lists of one call, one per non-empty tensor;
// a null list is one the op does not use (e.g. absent momentum buffers).
template <int Depth>
struct ListPointers {
  void* const* list[Depth];
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Whether this process may launch 32 KiB kernels on `device`: built with
// CUDA >= 12.1, a driver >= 12.1 (checked once) and a Volta or newer GPU.
// SAM_FAST_KERNEL_PARAMS=4096 forces the 4 KiB path (to test it on new GPUs).
inline bool large_params_usable(int device) {
#if SAMF_LARGE_PARAMS
  static const bool process_ok = [] {
    const char* forced = std::getenv("SAM_FAST_KERNEL_PARAMS");
    if (forced != nullptr && std::strcmp(forced, "4096") == 0) return false;
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010;
  }();
  return process_ok && device_major(device) >= 7;
#else
  (void)device;
  return false;
#endif
}

// Fills metadata from `ptrs` and `numels` (n tensors, none empty) and calls
// launch(metadata, num_blocks, first_block) for every full batch: first_block
// is the number of blocks launched before this one (a global block index for
// per-block outputs such as norm partials).
template <int Depth, typename Extra, bool kLarge, typename Launch>
void fill_and_launch(const ListPointers<Depth>& ptrs, const int64_t* numels, size_t n,
                     const Extra* extras, const Launch& launch) {
  using Meta = TensorListMetadata<Depth, Extra, kLarge>;
  static_assert(sizeof(Meta) + kOpParamBytes <= LaunchConfig<kLarge>::kParamBytes,
                "kernel parameters exceed the launch configuration's limit");
  Meta meta;
  int tensors = 0;
  int blocks = 0;
  int64_t launched = 0;
  for (size_t t = 0; t < n; ++t) {
    for (int k = 0; k < Depth; ++k) {
      meta.addresses[k][tensors] = ptrs.list[k] == nullptr ? nullptr : ptrs.list[k][t];
    }
    meta.numel[tensors] = numels[t];
    if constexpr (!std::is_empty_v<Extra>) meta.extra[tensors] = extras[t];
    ++tensors;
    const int64_t chunks = chunks_of(numels[t]);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<typename Meta::TensorIndex>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = tensors == Meta::kMaxTensors && last_chunk;
      const bool blocks_full = blocks == Meta::kMaxBlocks;
      const bool last = t == n - 1 && last_chunk;
      if (!(tensors_full || blocks_full || last)) continue;
      launch(meta, blocks, launched);
      launched += blocks;
      blocks = 0;
      if (last_chunk) {
        tensors = 0;
      } else {
        // The current tensor goes on in the next launch, as its tensor 0.
        for (int k = 0; k < Depth; ++k) meta.addresses[k][0] = meta.addresses[k][tensors - 1];
        meta.numel[0] = meta.numel[tensors - 1];
        if constexpr (!std::is_empty_v<Extra>) meta.extra[0] = meta.extra[tensors - 1];
        tensors = 1;
      }
    }
  }
}

// Runs the op over all tensors: launch is a generic callable invoked as
// launch(meta, num_blocks, first_block) with a TensorListMetadata of either
// size, so the caller instantiates its kernel for both. The 32 KiB struct is
// used where it is usable and the 4 KiB one would need more than one launch.
// Returns the total number of blocks (one per chunk).
template <int Depth, typename Extra, typename Launch>
int64_t multi_tensor_apply(int device, const ListPointers<Depth>& ptrs, const int64_t* numels,
                           size_t n, const Extra* extras, const Launch& launch) {
  int64_t blocks = 0;
  for (size_t t = 0; t < n; ++t) blocks += chunks_of(numels[t]);
  if (n == 0) return 0;
  using Small = TensorListMetadata<Depth, Extra, false>;
  const bool one_small_launch =
      n <= static_cast<size_t>(Small::kMaxTensors) && blocks <= Small::kMaxBlocks;
#if SAMF_LARGE_PARAMS
  if (!one_small_launch && large_params_usable(device)) {
    fill_and_launch<Depth, Extra, true>(ptrs, numels, n, extras, launch);
    return blocks;
  }
#else
  (void)one_small_launch;
  (void)device;
#endif
  fill_and_launch<Depth, Extra, false>(ptrs, numels, n, extras, launch);
  return blocks;
}

}  // namespace sam_fast::cuda
