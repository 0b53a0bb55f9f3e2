// CPU implementations of the sam_fast ops (the "cpp" backend).
//
// Every op is one fused pass over all the tensors of a group: the tensors are
// cut into chunks of kChunk elements, and parallel_for hands chunks of
// *all* tensors to the intra-op threads, so a model of many small tensors
// keeps every core busy, unlike a per-parameter loop. The inner loops run over
// plain contiguous arrays with restrict pointers, so the compiler vectorizes
// them; the per-element math is csrc/elementwise.h, shared with CUDA.

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../elementwise.h"
#include "../bsam.h"
#include "../family.h"
#include "../op_args.h"

#ifndef SAM_FAST_STABLE
#include <torch/library.h>
#endif

namespace sam_fast::cpu {
namespace {

// Elements per chunk: large enough to amortize the per-chunk overhead, small
// enough that a model's tensors split into many chunks to balance threads.
constexpr int64_t kChunk = 16384;
// Below this many elements in a whole call, waking threads costs more than it saves.
constexpr int64_t kSerialBelow = 65536;

struct Chunk {
  int64_t tensor;  // index among the FlatLists' non-empty tensors
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> chunks_of(const FlatLists& lists) {
  std::vector<Chunk> chunks;
  for (size_t j = 0; j < lists.size(); ++j) {
    const int64_t n = lists.numel(j);
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(j), b, std::min(n, b + kChunk)});
    }
  }
  return chunks;
}

// Runs f(chunk_index, chunk) over every chunk of every tensor, in parallel
// when the call is large enough.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, const F& f) {
  if (total < kSerialBelow) {
    for (size_t c = 0; c < chunks.size(); ++c) f(static_cast<int64_t>(c), chunks[c]);
    return;
  }
  parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, chunks[c]);
  });
}

int64_t total_numel(const FlatLists& lists) {
  int64_t total = 0;
  for (size_t j = 0; j < lists.size(); ++j) total += lists.numel(j);
  return total;
}

template <typename T>
T* at_chunk(const FlatLists& lists, size_t k, const Chunk& c) {
  return static_cast<T*>(lists.ptrs(k)[c.tensor]) + c.begin;
}

template <typename T>
inline float ld(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T st(float v) {
  return static_cast<T>(v);
}

// Calls f(std::bool_constant<b>{}): a loop whose optional list is read or
// written under a compile-time flag has no conditional loads or stores, so
// the compiler can vectorize it.
template <typename F>
void with_flag(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

float host_scalar(const Tensor& s, const char* what) {
  return item<float>(scalar_on(s, cpu_device(), what));
}

// The perturbation's scale (elementwise.h: scale_from_norm), derived on the
// host from the sum of squares; an fp64 chain is rounded to fp32 at the end,
// as torch rounds an fp64 0-dim scale when it multiplies fp32 tensors by it.
//
// The norm of an fp32 sum of squares is IEEE sqrt (correctly rounded), as in
// the CUDA and Triton kernels and the torch backend (which takes the fp64
// sqrt of it and rounds: exact, since 53 >= 2 * 24 + 2 bits). An fp64 sum of
// squares (a model with fp64 groups too, whose chain the torch backend
// computes with torch.sqrt in fp64) takes ATen's sqrt, so both agree bit for
// bit: ATen's CPU sqrt is not correctly rounded (it calls a vector math
// library, about an ulp), and fp64 has no wider type to round from. The rest
// of the chain (+, 1/x, *) is IEEE in ATen's CPU kernels as here.
template <typename Acc>
Acc scale_on_host(const ScaleInputs& in, double rho, double eps, bool normalize) {
  const Acc sumsq = *in.sumsq.const_data_ptr<Acc>();
  Acc norm = Acc(0);
  if (normalize) {
    if constexpr (std::is_same_v<Acc, float>) {
      norm = std::sqrt(sumsq);
    } else {
      norm = item<Acc>(sqrt_of(in.sumsq));
    }
  }
  const Acc* gs = in.grad_scale ? in.grad_scale->const_data_ptr<Acc>() : nullptr;
  return scale_from_norm<Acc>(norm, is_finite(sumsq), static_cast<Acc>(rho),
                              static_cast<Acc>(eps), normalize, gs);
}

float derive_scale(const Tensor& sumsq, double rho, double eps, bool normalize,
                   OptTensorArg grad_scale) {
  const ScaleInputs in = scale_inputs(sumsq, grad_scale, cpu_device());
  if (in.is_double) return static_cast<float>(scale_on_host<double>(in, rho, eps, normalize));
  return scale_on_host<float>(in, rho, eps, normalize);
}

// ---------------------------------------------------------------------------
// grad_sumsq: per-chunk partial sums in a fixed lane order, then the partials
// in chunk order: the same bits for any number of threads.

constexpr int kLanes = 16;

template <typename T, bool kWeighted>
float chunk_sumsq(const T* __restrict g, const T* __restrict w, int64_t n, bool has_eta,
                  float eta) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float v = ld(g[i + l]);
      if constexpr (kWeighted) {
        float t = std::fabs(ld(w[i + l]));
        if (has_eta) t = t + eta;
        v = t * v;
      }
      acc[l] += v * v;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    float v = ld(g[i]);
    if constexpr (kWeighted) {
      float t = std::fabs(ld(w[i]));
      if (has_eta) t = t + eta;
      v = t * v;
    }
    acc[l] += v * v;
  }
  // Pairwise over the lanes: fixed order, and a little more accurate.
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

Tensor grad_sumsq(ListArg grads, ListArg params, double eta) {
  SAM_FAST_CHECK(grads.size() > 0, "grad_sumsq needs at least one tensor");
  const bool weighted = !params.empty();
  FlatLists lists({{"grads", grads, true, false}, {"params", params, true, false}},
                  "grad_sumsq");
  check_storage_dtype(grads[0].scalar_type(), "grad_sumsq");
  const auto chunks = chunks_of(lists);
  std::vector<float> partial(chunks.size());
  const float eta_f = static_cast<float>(eta);
  dispatch_storage(lists.dtype(), "grad_sumsq", [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(chunks, total_numel(lists), [&](int64_t ci, const Chunk& c) {
      const T* g = at_chunk<T>(lists, 0, c);
      const int64_t n = c.end - c.begin;
      partial[ci] = weighted ? chunk_sumsq<T, true>(g, at_chunk<T>(lists, 1, c), n,
                                                    eta != 0.0, eta_f)
                             : chunk_sumsq<T, false>(g, nullptr, n, false, 0.0f);
    });
  });
  double sum = 0.0;
  for (float p : partial) sum += p;
  Tensor out = empty_scalar(kFloat, cpu_device());
  *out.mutable_data_ptr<float>() = static_cast<float>(sum);
  return out;
}

// ---------------------------------------------------------------------------
// perturb_: backups <- w; w <- w + e.

template <typename T>
void perturb_range(T* __restrict w, const T* __restrict g, T* __restrict b, int64_t n,
                   float scale, bool adaptive, bool has_eta, float eta) {
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i];
    const float x = ld(wi);
    b[i] = wi;
    w[i] = st<T>(perturbed(x, ld(g[i]), scale, adaptive, has_eta, eta));
  }
}

void perturb_(ListArg params, ListArg grads, ListArg backups,
              const Tensor& sumsq, double rho, double eps, bool normalize,
              std::optional<double> eta, OptTensorArg grad_scale) {
  FlatLists lists({{"params", params, true, true},
                   {"grads", grads, true, false},
                   {"backups", backups, false, true}},
                  "perturb_");
  if (lists.empty()) return;
  const float s = derive_scale(sumsq, rho, eps, normalize, grad_scale);
  const bool adaptive = eta.has_value();
  const float eta_f = static_cast<float>(eta.value_or(0.0));
  const bool has_eta = adaptive && *eta != 0.0;
  const auto chunks = chunks_of(lists);
  dispatch_storage(lists.dtype(), "perturb_", [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& c) {
      perturb_range(at_chunk<T>(lists, 0, c), at_chunk<T>(lists, 1, c), at_chunk<T>(lists, 2, c),
                    c.end - c.begin, s, adaptive, has_eta, eta_f);
    });
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_: w <- backup, bit for bit (a byte copy).

void copy_lists(const FlatLists& lists, size_t dst, size_t src) {
  const size_t elem = element_size(lists.dtype());
  const auto chunks = chunks_of(lists);
  for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& c) {
    char* d = static_cast<char*>(lists.ptrs(dst)[c.tensor]) + c.begin * elem;
    const char* s = static_cast<const char*>(lists.ptrs(src)[c.tensor]) + c.begin * elem;
    std::memcpy(d, s, (c.end - c.begin) * elem);
  });
}

void restore_(ListArg params, ListArg backups) {
  FlatLists lists({{"params", params, false, true}, {"backups", backups, true, false}},
                  "restore_");
  if (lists.empty()) return;
  check_storage_dtype(lists.dtype(), "restore_");
  copy_lists(lists, 0, 1);
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_sgd_: w <- backup, then torch.optim.SGD's step.

template <typename T, bool kMomentum, bool kReadBuf>
void restore_sgd_range(T* __restrict w, const T* __restrict b, const T* __restrict g,
                       T* __restrict buf, int64_t n, const SgdCoeffs& c, bool unscale,
                       float inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = ld(b[i]);
    float gi = ld(g[i]);
    if (unscale) gi = gi * inv_scale;
    float new_buf = 0.0f;
    const float d = sgd_direction(c, x, gi, kReadBuf ? ld(buf[i]) : 0.0f, &new_buf);
    if constexpr (kMomentum) buf[i] = st<T>(new_buf);
    w[i] = st<T>(x + c.neg_lr * d);
  }
}

// Calls f(momentum, read_buf) with both as std::bool_constant.
template <typename F>
void with_momentum_flags(const SgdCoeffs& c, const F& f) {
  with_flag(c.has_momentum, [&](auto momentum) {
    with_flag(c.has_momentum && !c.init_buffers, [&](auto read_buf) {
      constexpr bool kMomentum = std::decay_t<decltype(momentum)>::value;
      constexpr bool kReadBuf = std::decay_t<decltype(read_buf)>::value;
      if constexpr (kMomentum || !kReadBuf) f(momentum, read_buf);
    });
  });
}

void restore_sgd_(ListArg params, ListArg backups, ListArg grads,
                  ListArg momentum_buffers, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool init_buffers,
                  OptTensorArg grad_scale,
                  OptTensorArg found_inf) {
  const bool has_momentum = momentum != 0.0;
  SAM_FAST_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
                 "restore_sgd_: momentum != 0 needs momentum_buffers");
  const bool skip = found_inf.has_value() && host_scalar(*found_inf, "found_inf") != 0.0f;
  if (skip) {
    restore_(params, backups);
    return;
  }
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"momentum_buffers", has_momentum ? TensorList(momentum_buffers) : TensorList(),
                    !init_buffers, true}},
                  "restore_sgd_");
  if (lists.empty()) return;
  const SgdCoeffs c = make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                      init_buffers);
  const bool unscale = grad_scale.has_value();
  const float inv = unscale ? 1.0f / host_scalar(*grad_scale, "grad_scale") : 1.0f;
  const auto chunks = chunks_of(lists);
  dispatch_storage(lists.dtype(), "restore_sgd_", [&](auto tag) {
    using T = decltype(tag);
    with_momentum_flags(c, [&](auto momentum, auto read_buf) {
      for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
        restore_sgd_range<T, decltype(momentum)::value, decltype(read_buf)::value>(
            at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch), at_chunk<T>(lists, 2, ch),
            has_momentum ? at_chunk<T>(lists, 3, ch) : nullptr, ch.end - ch.begin, c, unscale,
            inv);
      });
    });
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// restore_adamw_: w <- backup, then torch.optim.Adam / AdamW's step.

template <typename T, bool kAmsgrad>
void restore_adam_range(T* __restrict w, const T* __restrict b, const T* __restrict g,
                        T* __restrict m, T* __restrict v, T* __restrict vmax, int64_t n,
                        const AdamCoeffs& c, const AdamStepScalars& s, bool unscale,
                        float inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = ld(g[i]);
    if (unscale) gi = gi * inv_scale;
    float mi = ld(m[i]);
    float vi = ld(v[i]);
    float vmaxi = kAmsgrad ? ld(vmax[i]) : 0.0f;
    const float x =
        adam_update<kAmsgrad>(c, s, /*host_counters=*/true, ld(b[i]), gi, &mi, &vi, &vmaxi);
    m[i] = st<T>(mi);
    v[i] = st<T>(vi);
    if constexpr (kAmsgrad) vmax[i] = st<T>(vmaxi);
    w[i] = st<T>(x);
  }
}

void restore_adamw_(ListArg params, ListArg backups, ListArg grads,
                    ListArg exp_avgs, ListArg exp_avg_sqs,
                    ListArg max_exp_avg_sqs, ListArg state_steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay,
                    OptTensorArg grad_scale,
                    OptTensorArg found_inf) {
  SAM_FAST_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(),
                 "restore_adamw_: amsgrad=True needs max_exp_avg_sqs");
  SAM_FAST_CHECK(state_steps.size() == params.size(), "restore_adamw_: state_steps has ",
                 state_steps.size(), " tensors but params has ", params.size());
  // CPU parameters keep their step counters on the host (steps_on_host checks).
  SAM_FAST_CHECK(steps_on_host(state_steps, cpu_device()),
                 "restore_adamw_: CPU parameters need host step counters");
  if (found_inf.has_value() && host_scalar(*found_inf, "found_inf") != 0.0f) {
    restore_(params, backups);
    return;
  }
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"exp_avgs", exp_avgs, true, true},
                   {"exp_avg_sqs", exp_avg_sqs, true, true},
                   {"max_exp_avg_sqs", amsgrad ? TensorList(max_exp_avg_sqs) : TensorList(), true,
                    true}},
                  "restore_adamw_");
  if (!lists.empty()) check_storage_dtype(lists.dtype(), "restore_adamw_");
  const auto scalars = bump_host_steps(state_steps, lists, lr, beta1, beta2);
  if (lists.empty()) return;
  const AdamCoeffs c = make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                        decoupled_weight_decay);
  const bool unscale = grad_scale.has_value();
  const float inv = unscale ? 1.0f / host_scalar(*grad_scale, "grad_scale") : 1.0f;
  const auto chunks = chunks_of(lists);
  dispatch_storage(lists.dtype(), "restore_adamw_", [&](auto tag) {
    using T = decltype(tag);
    with_flag(amsgrad, [&](auto ams) {
      for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
        restore_adam_range<T, decltype(ams)::value>(
            at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch), at_chunk<T>(lists, 2, ch),
            at_chunk<T>(lists, 3, ch), at_chunk<T>(lists, 4, ch),
            amsgrad ? at_chunk<T>(lists, 5, ch) : nullptr, ch.end - ch.begin, c,
            scalars[ch.tensor], unscale, inv);
      });
    });
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// sampa_points_: backups <- x; ys <- SGD lookahead of x with g_y; x <- x + scale * g_y.

template <typename T, bool kReadBuf>
void sampa_points_range(T* __restrict w, const T* __restrict gy, const T* __restrict buf,
                        T* __restrict b, T* __restrict y, int64_t n, const SgdCoeffs& c,
                        float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i];
    const float x = ld(wi);
    const float g = ld(gy[i]);
    float unused = 0.0f;
    const float d = sgd_direction(c, x, g, kReadBuf ? ld(buf[i]) : 0.0f, &unused);
    y[i] = st<T>(x + c.neg_lr * d);
    b[i] = wi;
    w[i] = st<T>(perturbed(x, g, scale, false, false, 0.0f));
  }
}

void sampa_points_(ListArg params, ListArg grads_y, ListArg momentum_buffers,
                   ListArg backups, ListArg ys, const Tensor& sumsq, double rho,
                   double eps, double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool init_buffers) {
  const bool reads_buffers = momentum != 0.0 && !init_buffers;
  SAM_FAST_CHECK(!reads_buffers || momentum_buffers.size() == params.size(),
                 "sampa_points_: momentum != 0 needs momentum_buffers");
  FlatLists lists({{"params", params, true, true},
                   {"grads_y", grads_y, true, false},
                   {"momentum_buffers",
                    reads_buffers ? TensorList(momentum_buffers) : TensorList(), true, false},
                   {"backups", backups, false, true},
                   {"ys", ys, false, true}},
                  "sampa_points_");
  if (lists.empty()) return;
  const SgdCoeffs c = make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                      init_buffers);
  const float s = derive_scale(sumsq, rho, eps, /*normalize=*/true, std::nullopt);
  const auto chunks = chunks_of(lists);
  dispatch_storage(lists.dtype(), "sampa_points_", [&](auto tag) {
    using T = decltype(tag);
    with_flag(reads_buffers, [&](auto read_buf) {
      for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
        sampa_points_range<T, decltype(read_buf)::value>(
            at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch),
            reads_buffers ? at_chunk<T>(lists, 2, ch) : nullptr, at_chunk<T>(lists, 3, ch),
            at_chunk<T>(lists, 4, ch), ch.end - ch.begin, c, s);
      });
    });
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// sampa_update_: w <- SGD step from x = backups with (1 - lam) g~ + lam g_y.

template <typename T, bool kMomentum, bool kReadBuf>
void sampa_update_range(T* __restrict w, const T* __restrict b, const T* __restrict gt,
                        const T* __restrict gy, T* __restrict buf, int64_t n, const SgdCoeffs& c,
                        float one_minus_lam, float lam) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = ld(b[i]);
    const float g = ld(gt[i]) * one_minus_lam + lam * ld(gy[i]);
    float new_buf = 0.0f;
    const float d = sgd_direction(c, x, g, kReadBuf ? ld(buf[i]) : 0.0f, &new_buf);
    if constexpr (kMomentum) buf[i] = st<T>(new_buf);
    w[i] = st<T>(x + c.neg_lr * d);
  }
}

void sampa_update_(ListArg params, ListArg backups, ListArg grads_tilde,
                   ListArg grads_y, ListArg momentum_buffers, double lam, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, bool init_buffers) {
  const bool has_momentum = momentum != 0.0;
  SAM_FAST_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
                 "sampa_update_: momentum != 0 needs momentum_buffers");
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads_tilde", grads_tilde, true, false},
                   {"grads_y", grads_y, true, false},
                   {"momentum_buffers", has_momentum ? TensorList(momentum_buffers) : TensorList(),
                    !init_buffers, true}},
                  "sampa_update_");
  if (lists.empty()) return;
  const SgdCoeffs c = make_sgd_coeffs(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                      init_buffers);
  const float one_minus_lam = static_cast<float>(1.0 - lam);
  const float lam_f = static_cast<float>(lam);
  const auto chunks = chunks_of(lists);
  dispatch_storage(lists.dtype(), "sampa_update_", [&](auto tag) {
    using T = decltype(tag);
    with_momentum_flags(c, [&](auto momentum, auto read_buf) {
      for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
        sampa_update_range<T, decltype(momentum)::value, decltype(read_buf)::value>(
            at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch), at_chunk<T>(lists, 2, ch),
            at_chunk<T>(lists, 3, ch), has_momentum ? at_chunk<T>(lists, 4, ch) : nullptr,
            ch.end - ch.begin, c, one_minus_lam, lam_f);
      });
    });
  });
  lists.finish();
}

// ---------------------------------------------------------------------------
// The SAM family's generic ops (sam_fast/family_ops.py; specification:
// sam_fast/backends/torch_family.py; per-element math: family.h). Unlike the
// ops above they take fp64 storage too (math in fp64 then), as the
// specification does. The chunk cores below see raw pointers, sizes and
// scalars only; the wrappers after them do the ATen work (checks, layouts,
// scalars, the result tensor).

void check_family_dtype(ScalarType dtype, const char* op) {
  dispatch_family(dtype, op, [](auto) {});
}

// dot_sumsq keeps three sums, so 8 lanes each: 3 x 16 fp32 lanes are 12 of the 16
// SSE registers in accumulators alone, and GCC kept part of them on the stack in
// the loop (8 lanes: a third of the stack accesses; no speed difference measurable
// on the shared 2-core machine, where the op is near its 2x-grad_sumsq bytes).
constexpr int kDotLanes = 8;

// The lanes of a chunk's accumulators, pairwise in a fixed order.
template <int kN = kLanes, typename Acc>
Acc fold_lanes(Acc* acc) {
  for (int width = kN / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// Chunk partials summed in chunk order in double: the same bits for any
// number of threads (as grad_sumsq).
template <typename Acc>
Acc ordered_sum(const Acc* partials, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += partials[i];
  return static_cast<Acc>(sum);
}

// dot_sumsq's chunk core: out = [<a, b>, |a|^2, |b|^2] of n elements.
template <typename T, typename Acc>
void dot_sumsq_chunk(const T* __restrict a, const T* __restrict b, int64_t n, Acc* out) {
  Acc ab[kDotLanes] = {};
  Acc aa[kDotLanes] = {};
  Acc bb[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int l = 0; l < kDotLanes; ++l) {
      const Acc x = static_cast<Acc>(a[i + l]);
      const Acc y = static_cast<Acc>(b[i + l]);
      ab[l] += x * y;
      aa[l] += x * x;
      bb[l] += y * y;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const Acc x = static_cast<Acc>(a[i]);
    const Acc y = static_cast<Acc>(b[i]);
    ab[l] += x * y;
    aa[l] += x * x;
    bb[l] += y * y;
  }
  out[0] = fold_lanes<kDotLanes>(ab);
  out[1] = fold_lanes<kDotLanes>(aa);
  out[2] = fold_lanes<kDotLanes>(bb);
}

// combine_'s chunk core: a <- coef0 a + coef1 b. No restrict: b may be a.
template <typename T, typename Acc>
void combine_chunk(T* a, const T* b, int64_t n, Acc coef0, Acc coef1) {
  for (int64_t i = 0; i < n; ++i) {
    a[i] = static_cast<T>(
        combine_value(static_cast<Acc>(a[i]), static_cast<Acc>(b[i]), coef0, coef1));
  }
}

// One element of ema_residual_: writes m' and the stored residual, returns
// the residual's square as stored.
template <typename T, typename Acc>
inline Acc ema_element(T* __restrict m, T* __restrict g, int64_t i, const EmaCoeffs<Acc>& c) {
  Acc next, d;
  ema_values(c, static_cast<Acc>(m[i]), static_cast<Acc>(g[i]), &next, &d);
  const T stored = static_cast<T>(d);
  m[i] = static_cast<T>(next);
  g[i] = stored;
  const Acc back = static_cast<Acc>(stored);
  return back * back;
}

// ema_residual_'s chunk core: the average and residual of n elements, and
// the residual's sum of squares.
template <typename T, typename Acc>
Acc ema_residual_chunk(T* __restrict m, T* __restrict g, int64_t n, const EmaCoeffs<Acc>& c) {
  Acc acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += ema_element(m, g, i + l, c);
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += ema_element(m, g, i, c);
  return fold_lanes(acc);
}

void check_same_length(ListArg first, ListArg second, const char* op,
                       const char* first_name, const char* second_name) {
  SAM_FAST_CHECK(second.size() == first.size(), op, ": ", second_name, " has ", second.size(),
                 " tensors but ", first_name, " has ", first.size());
}

Tensor dot_sumsq(ListArg a, ListArg b) {
  SAM_FAST_CHECK(!a.empty(), "dot_sumsq needs at least one tensor");
  check_same_length(a, b, "dot_sumsq", "a", "b");
  FlatLists lists({{"a", a, true, false}, {"b", b, true, false}}, "dot_sumsq");
  Tensor out = empty_1d(3, family_math_dtype(lists.dtype()), a[0].device());
  const auto chunks = chunks_of(lists);
  dispatch_family(lists.dtype(), "dot_sumsq", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    // partial[3 c + j]: sum j of chunk c.
    std::vector<Acc> partial(3 * chunks.size());
    for_each_chunk(chunks, total_numel(lists), [&](int64_t ci, const Chunk& c) {
      dot_sumsq_chunk<T, Acc>(at_chunk<T>(lists, 0, c), at_chunk<T>(lists, 1, c), c.end - c.begin,
                              partial.data() + 3 * ci);
    });
    double sums[3] = {0.0, 0.0, 0.0};
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      for (int j = 0; j < 3; ++j) sums[j] += partial[3 * ci + j];
    }
    Acc* o = out.mutable_data_ptr<Acc>();
    for (int j = 0; j < 3; ++j) o[j] = static_cast<Acc>(sums[j]);
  });
  return out;
}

void combine_(ListArg a, ListArg b, const Tensor& coef) {
  check_same_length(a, b, "combine_", "a", "b");
  SAM_FAST_CHECK(coef.numel() == 2, "combine_: coef must hold two elements, got shape ",
                 shape_str(coef));
  FlatLists lists({{"a", a, true, true}, {"b", b, true, false}}, "combine_");
  if (lists.empty()) return;
  dispatch_family(lists.dtype(), "combine_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    // Rounded to the math dtype as torch_family does (coef.to(math)).
    const Tensor c =
        contiguous_of(to_device(coef, cpu_device(), family_math_dtype(lists.dtype())));
    const Acc c0 = c.const_data_ptr<Acc>()[0];
    const Acc c1 = c.const_data_ptr<Acc>()[1];
    const auto chunks = chunks_of(lists);
    for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
      combine_chunk<T, Acc>(at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch),
                            ch.end - ch.begin, c0, c1);
    });
  });
  lists.finish();
}

Tensor ema_residual_(ListArg m, ListArg g, double decay, double sigma,
                         bool updated, OptTensorArg grad_scale,
                         OptTensorArg skip) {
  SAM_FAST_CHECK(!m.empty(), "ema_residual_ needs at least one tensor");
  check_same_length(m, g, "ema_residual_", "m", "g");
  FlatLists lists({{"m", m, true, true}, {"g", g, true, true}}, "ema_residual_");
  check_family_dtype(lists.dtype(), "ema_residual_");
  const ScalarType math = family_math_dtype(lists.dtype());
    if (skip.has_value()) {
    SAM_FAST_CHECK(skip->numel() == 1, "skip must hold one element, got shape ", shape_str(*skip));
    // A skipped step writes nothing and reports NaN (a CPU flag: no device sync).
    if (item<double>(*skip) != 0.0) return full_scalar(std::nan(""), math, m[0].device());
  }
  Tensor out = empty_scalar(math, m[0].device());
  dispatch_family(lists.dtype(), "ema_residual_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    EmaCoeffs<Acc> c{static_cast<Acc>(decay), static_cast<Acc>(1.0 - decay),
                     static_cast<Acc>(sigma), Acc(1), updated};
    if (grad_scale.has_value()) {
      SAM_FAST_CHECK(grad_scale->numel() == 1, "grad_scale must hold one element, got shape ",
                     shape_str(*grad_scale));
      c.inv_scale = Acc(1) / item<Acc>(to_device(*grad_scale, cpu_device(), math));
    }
    const auto chunks = chunks_of(lists);
    std::vector<Acc> partial(chunks.size());
    for_each_chunk(chunks, total_numel(lists), [&](int64_t ci, const Chunk& ch) {
      partial[ci] = ema_residual_chunk<T, Acc>(at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch),
                                               ch.end - ch.begin, c);
    });
    *out.mutable_data_ptr<Acc>() = ordered_sum(partial.data(), partial.size());
  });
  lists.finish();
  return out;
}


// ---------------------------------------------------------------------------
// BSAM's three ops (sam_fast/bsam_ops.py; specification:
// sam_fast/backends/torch_bsam.py; per-element math: bsam.h). Storage fp32,
// fp16, bf16 and fp64 (math in fp64 then), like the family ops; the noise is
// fp32 whatever the group's dtype (the optimizer's one normal_ per device).
//
// The square roots come from ATen's sqrt, as in the specification (bsam.h
// says why): a first pass writes every element's argument into one scratch
// tensor of the math dtype (the whole call's elements, tensor after tensor),
// one sqrt_ takes their roots (elementwise: the same bits as the
// specification's per-tensor torch.sqrt, for any number of threads), and a
// second pass does the rest. One ATen call per op call, whatever the number
// of tensors.

// Where each non-empty tensor's elements start in the call's scratch.
std::vector<int64_t> scratch_offsets(const FlatLists& lists) {
  std::vector<int64_t> offsets(lists.size());
  int64_t at = 0;
  for (size_t j = 0; j < lists.size(); ++j) {
    offsets[j] = at;
    at += lists.numel(j);
  }
  return offsets;
}

// A skip flag read on the host (a CPU tensor: no device sync): set where != 0
// (NaN included), as the specification's skip != 0.
bool skip_set(OptTensorArg skip) {
  if (!skip.has_value()) return false;
  SAM_FAST_CHECK(skip->numel() == 1, "skip must hold one element, got shape ", shape_str(*skip));
  return item<double>(*skip) != 0.0;
}

// 1 / S in the math dtype (torch.reciprocal of grad_scale.to(math)), or 1.
template <typename Acc>
Acc inv_scale_of(OptTensorArg grad_scale, ScalarType math) {
  if (!grad_scale.has_value()) return Acc(1);
  SAM_FAST_CHECK(grad_scale->numel() == 1, "grad_scale must hold one element, got shape ",
                 shape_str(*grad_scale));
  return Acc(1) / item<Acc>(to_device(*grad_scale, cpu_device(), math));
}

// bsam_noise_'s chunk cores: the variances 1 / (s N), then backup <- w and
// w <- w + z sigma (sigma: the roots of the variances).
template <typename T, typename Acc>
void bsam_variance_chunk(const T* __restrict s, Acc* __restrict out, int64_t n, Acc num_data) {
  for (int64_t i = 0; i < n; ++i) out[i] = bsam_noise_variance(static_cast<Acc>(s[i]), num_data);
}

template <typename T, typename Acc>
void bsam_noise_chunk(T* __restrict w, T* __restrict b, const float* __restrict z,
                      const Acc* __restrict sigma, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i];
    b[i] = wi;
    w[i] = static_cast<T>(bsam_noisy(static_cast<Acc>(wi), static_cast<Acc>(z[i]), sigma[i]));
  }
}

// bsam_ascent_'s cores: s widened (the roots' argument), then w and gs.
template <typename T, typename Acc>
void widen_chunk(const T* __restrict s, Acc* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(s[i]);
}

template <typename T, typename Acc>
void bsam_ascent_chunk(T* __restrict w, const T* __restrict b, const T* __restrict g,
                       const T* __restrict s, T* __restrict gs, const Acc* __restrict sqrt_s,
                       int64_t n, const BsamAscentCoeffs<Acc>& c) {
  for (int64_t i = 0; i < n; ++i) {
    Acc wi, gi;
    bsam_ascent_values(c, static_cast<Acc>(b[i]), static_cast<Acc>(g[i]),
                       static_cast<Acc>(s[i]), sqrt_s[i], &wi, &gi);
    w[i] = static_cast<T>(wi);
    gs[i] = static_cast<T>(gi);
  }
}

// bsam_update_'s core: w, m and s from w0 = backup.
template <typename T, typename Acc>
void bsam_update_chunk(T* __restrict w, const T* __restrict b, const T* __restrict g,
                       T* __restrict m, T* __restrict s, const T* __restrict gs, int64_t n,
                       const BsamUpdateCoeffs<Acc>& c) {
  for (int64_t i = 0; i < n; ++i) {
    Acc wi, mi, si;
    bsam_update_values(c, static_cast<Acc>(b[i]), static_cast<Acc>(g[i]),
                       static_cast<Acc>(m[i]), static_cast<Acc>(s[i]),
                       static_cast<Acc>(gs[i]), &wi, &mi, &si);
    w[i] = static_cast<T>(wi);
    m[i] = static_cast<T>(mi);
    s[i] = static_cast<T>(si);
  }
}

void bsam_noise_(ListArg params, ListArg backups, ListArg noise,
                 ListArg s, double num_data) {
  check_same_length(params, backups, "bsam_noise_", "params", "backups");
  check_same_length(params, noise, "bsam_noise_", "params", "noise");
  check_same_length(params, s, "bsam_noise_", "params", "s");
  FlatLists lists({{"params", params, true, true},
                   {"backups", backups, false, true},
                   {"noise", noise, true, false, kFloat},
                   {"s", s, true, false}},
                  "bsam_noise_");
  check_family_dtype(lists.dtype(), "bsam_noise_");
  if (lists.empty()) return;
  const auto chunks = chunks_of(lists);
  const int64_t total = total_numel(lists);
  const auto offsets = scratch_offsets(lists);
  const ScalarType math = family_math_dtype(lists.dtype());
  dispatch_family(lists.dtype(), "bsam_noise_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const Acc n_acc = static_cast<Acc>(num_data);
    Tensor sigma = empty_1d(total, math, cpu_device());
    Acc* sg = sigma.mutable_data_ptr<Acc>();
    for_each_chunk(chunks, total, [&](int64_t, const Chunk& c) {
      bsam_variance_chunk<T, Acc>(at_chunk<T>(lists, 3, c), sg + offsets[c.tensor] + c.begin,
                                  c.end - c.begin, n_acc);
    });
    sqrt_inplace(sigma);
    for_each_chunk(chunks, total, [&](int64_t, const Chunk& c) {
      bsam_noise_chunk<T, Acc>(at_chunk<T>(lists, 0, c), at_chunk<T>(lists, 1, c),
                               at_chunk<float>(lists, 2, c), sg + offsets[c.tensor] + c.begin,
                               c.end - c.begin);
    });
  });
  lists.finish();
}

void bsam_ascent_(ListArg params, ListArg backups, ListArg grads,
                  ListArg s, ListArg gs, double rho,
                  OptTensorArg grad_scale,
                  OptTensorArg skip) {
  check_same_length(params, backups, "bsam_ascent_", "params", "backups");
  check_same_length(params, grads, "bsam_ascent_", "params", "grads");
  check_same_length(params, s, "bsam_ascent_", "params", "s");
  check_same_length(params, gs, "bsam_ascent_", "params", "gs");
  const bool skipped = skip_set(skip);
  // Skipped: w <- backup, gs <- 0 (nothing else read).
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", skipped ? TensorList() : TensorList(grads), true, false},
                   {"s", skipped ? TensorList() : TensorList(s), true, false},
                   {"gs", gs, false, true}},
                  "bsam_ascent_");
  check_family_dtype(lists.dtype(), "bsam_ascent_");
  if (lists.empty()) return;
  const auto chunks = chunks_of(lists);
  const int64_t total = total_numel(lists);
  if (skipped) {
    copy_lists(lists, 0, 1);
    const size_t elem = element_size(lists.dtype());
    for_each_chunk(chunks, total, [&](int64_t, const Chunk& c) {
      std::memset(static_cast<char*>(lists.ptrs(4)[c.tensor]) + c.begin * elem, 0,
                  (c.end - c.begin) * elem);
    });
    lists.finish();
    return;
  }
  const ScalarType math = family_math_dtype(lists.dtype());
  const auto offsets = scratch_offsets(lists);
  dispatch_family(lists.dtype(), "bsam_ascent_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const BsamAscentCoeffs<Acc> coeffs{static_cast<Acc>(rho), inv_scale_of<Acc>(grad_scale, math)};
    Tensor roots = empty_1d(total, math, cpu_device());
    Acc* r = roots.mutable_data_ptr<Acc>();
    for_each_chunk(chunks, total, [&](int64_t, const Chunk& c) {
      widen_chunk<T, Acc>(at_chunk<T>(lists, 3, c), r + offsets[c.tensor] + c.begin,
                          c.end - c.begin);
    });
    sqrt_inplace(roots);
    for_each_chunk(chunks, total, [&](int64_t, const Chunk& c) {
      bsam_ascent_chunk<T, Acc>(at_chunk<T>(lists, 0, c), at_chunk<T>(lists, 1, c),
                                at_chunk<T>(lists, 2, c), at_chunk<T>(lists, 3, c),
                                at_chunk<T>(lists, 4, c), r + offsets[c.tensor] + c.begin,
                                c.end - c.begin, coeffs);
    });
  });
  lists.finish();
}

void bsam_update_(ListArg params, ListArg backups, ListArg grads,
                  ListArg m, ListArg s, ListArg gs, double lr,
                  double beta1, double beta2, double weight_decay, double damping, bool new_s,
                  OptTensorArg grad_scale,
                  OptTensorArg skip) {
  check_same_length(params, backups, "bsam_update_", "params", "backups");
  check_same_length(params, grads, "bsam_update_", "params", "grads");
  check_same_length(params, m, "bsam_update_", "params", "m");
  check_same_length(params, s, "bsam_update_", "params", "s");
  check_same_length(params, gs, "bsam_update_", "params", "gs");
  const bool skipped = skip_set(skip);
  if (skipped) {  // w <- w0; m and s untouched
    FlatLists lists({{"params", params, false, true}, {"backups", backups, true, false}},
                    "bsam_update_");
    check_family_dtype(lists.dtype(), "bsam_update_");
    if (!lists.empty()) copy_lists(lists, 0, 1);
    lists.finish();
    return;
  }
  FlatLists lists({{"params", params, false, true},
                   {"backups", backups, true, false},
                   {"grads", grads, true, false},
                   {"m", m, true, true},
                   {"s", s, true, true},
                   {"gs", gs, true, false}},
                  "bsam_update_");
  check_family_dtype(lists.dtype(), "bsam_update_");
  if (lists.empty()) return;
  const ScalarType math = family_math_dtype(lists.dtype());
  const auto chunks = chunks_of(lists);
  dispatch_family(lists.dtype(), "bsam_update_", [&](auto tag) {
    using T = decltype(tag);
    using Acc = math_t<T>;
    const BsamUpdateCoeffs<Acc> c{static_cast<Acc>(lr),
                                  static_cast<Acc>(beta1),
                                  static_cast<Acc>(1.0 - beta1),
                                  static_cast<Acc>(beta2),
                                  static_cast<Acc>(1.0 - beta2),
                                  static_cast<Acc>(weight_decay),
                                  static_cast<Acc>(damping + weight_decay),
                                  inv_scale_of<Acc>(grad_scale, math),
                                  new_s};
    for_each_chunk(chunks, total_numel(lists), [&](int64_t, const Chunk& ch) {
      bsam_update_chunk<T, Acc>(at_chunk<T>(lists, 0, ch), at_chunk<T>(lists, 1, ch),
                                at_chunk<T>(lists, 2, ch), at_chunk<T>(lists, 3, ch),
                                at_chunk<T>(lists, 4, ch), at_chunk<T>(lists, 5, ch),
                                ch.end - ch.begin, c);
    });
  });
  lists.finish();
}

}  // namespace

// Every op's CPU kernel, in either build (csrc/api.h).
SAM_FAST_LIBRARY_IMPL(CPU, m) { SAM_FAST_IMPL_EVERY_OP(m); }

}  // namespace sam_fast::cpu
