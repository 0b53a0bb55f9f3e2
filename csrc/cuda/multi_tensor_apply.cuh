// Multi-tensor apply: one kernel launch covers many tensors.
//
// The scheme of apex and of PyTorch's foreach kernels: the tensors' addresses
// and sizes travel *by value* in the kernel's parameters (no host-to-device
// copy, nothing to synchronize, so a launch can be captured in a CUDA graph),
// each tensor is cut into chunks of kChunkSize elements, and a block -> (tensor,
// chunk) map says which chunk each block works on. When the parameter struct
// is full (tensors or blocks), the launcher launches and starts a new one,
// carrying over a tensor that is only partly covered.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace sam_fast::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kMaxBlocks = 320;        // blocks per launch (the map's length)
// Every CUDA version and GPU accepts 4 KiB of kernel parameters; the
// metadata takes what the op's own parameters leave.
constexpr size_t kParamBytes = 4096;
constexpr size_t kOpParamBytes = 256;  // room kept for the op functor and extra arguments

struct NoExtra {};

// Per launch: Depth lists of up to kMaxTensors tensors, an optional
// per-tensor Extra (e.g. Adam's bias corrections), and the block map.
template <int Depth, typename Extra>
struct TensorListMetadata {
  static constexpr size_t kExtraBytes = std::is_empty_v<Extra> ? 0 : sizeof(Extra);
  static constexpr size_t kBytesPerTensor = Depth * sizeof(void*) + sizeof(int64_t) + kExtraBytes;
  static constexpr size_t kMapBytes = kMaxBlocks * (sizeof(unsigned char) + sizeof(int32_t));
  static constexpr int kFit =
      static_cast<int>((kParamBytes - kOpParamBytes - kMapBytes - 16) / kBytesPerTensor);
  static constexpr int kMaxTensors = kFit < 255 ? kFit : 255;  // block_to_tensor is a byte

  void* addresses[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  Extra extra[std::is_empty_v<Extra> ? 1 : kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// Fills metadata from `ptrs` (Depth lists of data pointers, a list may be empty
// when the op does not use it) and `numels`, and calls
// launch(metadata, num_blocks, first_block) for every full batch: first_block
// is the number of blocks launched before this one (a global block index for
// per-block outputs such as norm partials). Returns the total number of blocks.
template <int Depth, typename Extra, typename Launch>
int64_t multi_tensor_apply(const std::vector<std::vector<void*>>& ptrs,
                           const std::vector<int64_t>& numels, const std::vector<Extra>& extras,
                           const Launch& launch) {
  using Meta = TensorListMetadata<Depth, Extra>;
  static_assert(sizeof(Meta) + kOpParamBytes <= kParamBytes, "kernel parameters exceed 4 KiB");
  Meta meta;
  int tensors = 0;
  int blocks = 0;
  int64_t launched = 0;
  const size_t n = numels.size();
  for (size_t t = 0; t < n; ++t) {
    for (int k = 0; k < Depth; ++k) {
      meta.addresses[k][tensors] = ptrs[k].empty() ? nullptr : ptrs[k][t];
    }
    meta.numel[tensors] = numels[t];
    if constexpr (!std::is_empty_v<Extra>) meta.extra[tensors] = extras[t];
    ++tensors;
    const int64_t chunks = (numels[t] + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = tensors == Meta::kMaxTensors && last_chunk;
      const bool blocks_full = blocks == kMaxBlocks;
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
  return launched;
}

}  // namespace sam_fast::cuda
