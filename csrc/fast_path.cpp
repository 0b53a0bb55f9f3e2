// The eager fast path of the optimizers (docs/design.md section 3, "The host's share").
//
// A call of torch.ops.sam_fast.<op> from Python converts every tensor of
// every list argument from a PyObject to an IValue: on a model of a few
// hundred tensors that conversion, not the kernel, is most of a small step,
// and it is paid again for lists that never change (parameters, backups,
// optimizer state). A Bucket keeps those lists in C++ once per plan
// (sam_fast/plan.py), reads each parameter's .grad itself, and calls the same
// registered ops through the dispatcher from C++, where passing a list is
// free. Every result is the op's own: the same kernels, the same version
// counter bumps, the same profiler events.
//
// Each call first checks that the plan still holds (the same parameter
// objects in the param group's list, with the dtype, device and shape their
// backups were made for) and that every gradient is there and dense; it
// returns kLayoutChanged or kIncomplete, having touched nothing, when not, and
// the Python side rebuilds the plan or takes its general path.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <optional>
#include <vector>

#include "fast_path.h"

namespace sam_fast::fast {
namespace {

constexpr int kOk = 0;
constexpr int kLayoutChanged = 1;
constexpr int kIncomplete = 2;

// What a bucket keeps besides its parameters and backups.
enum Slot : int {
  kMomentumBuffer = 0,
  kExpAvg,
  kExpAvgSq,
  kMaxExpAvgSq,
  kStateStep,
  kYs,          // SAMPa's y
  kGradsY,      // SAMPa's g_y, kept from one step to the next
  kGradsTilde,  // SAMPa's gradient at x~, kept between two closure calls
  kSlots
};

struct BucketData {
  PyObject* group_params = nullptr;  // the param group's list (owned reference)
  Py_ssize_t group_len = 0;          // its length when the plan was made
  std::vector<Py_ssize_t> positions; // this bucket's positions in it
  // Those parameters (owned references to the Python objects only: a C++ reference
  // would make torch.utils.swap_tensors refuse them), what they held when the plan
  // was made (their TensorImpl and storage address; never dereferenced).
  std::vector<PyObject*> objects;
  std::vector<const c10::TensorImpl*> impls;
  std::vector<const void*> addresses;
  std::vector<at::Tensor> backups;
  std::array<std::vector<at::Tensor>, kSlots> slots;
  at::ScalarType dtype = at::kFloat;
  at::Device device{at::kCPU};
};

struct Bucket {
  PyObject_HEAD
  BucketData* data;
};

// One call's parameters and gradients, taken from the Python objects.
struct Lists {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
};

void bucket_dealloc(PyObject* self) {
  BucketData* data = reinterpret_cast<Bucket*>(self)->data;
  if (data != nullptr) {
    Py_XDECREF(data->group_params);
    for (PyObject* obj : data->objects) Py_DECREF(obj);
    delete data;
  }
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject BucketType = {
    PyVarObject_HEAD_INIT(nullptr, 0) "sam_fast._C.Bucket", /* tp_name */
    sizeof(Bucket),                                         /* tp_basicsize */
};

BucketData& unpack_bucket(PyObject* obj) {
  TORCH_CHECK_TYPE(Py_TYPE(obj) == &BucketType, "expected a sam_fast._C.Bucket");
  return *reinterpret_cast<Bucket*>(obj)->data;
}

std::vector<at::Tensor> tensor_list(PyObject* seq, const char* what) {
  TORCH_CHECK_TYPE(PyList_Check(seq) || PyTuple_Check(seq), what, " must be a list of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    TORCH_CHECK_TYPE(THPVariable_Check(items[i]), what, "[", i, "] is not a tensor");
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return out;
}

// The plan's check, then the parameters (and with want_grads their gradients)
// into `out`.
int gather(const BucketData& b, Lists& out, bool want_grads) {
  if (!PyList_Check(b.group_params) || PyList_GET_SIZE(b.group_params) != b.group_len) {
    return kLayoutChanged;
  }
  const size_t n = b.objects.size();
  out.params.clear();
  out.params.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(b.group_params, b.positions[i]);
    if (obj != b.objects[i]) return kLayoutChanged;
    const at::Tensor& p = THPVariable_Unpack(obj);
    // swap_tensors() gives the object another TensorImpl; .data = / set_() keep it
    // and change what it holds (the Python path's key: its storage address; new
    // storage may alias another parameter's, which the plan's checks refuse).
    if (p.unsafeGetTensorImpl() != b.impls[i] || p.const_data_ptr() != b.addresses[i] ||
        p.scalar_type() != b.dtype || p.device() != b.device ||
        p.sizes() != b.backups[i].sizes()) {
      return kLayoutChanged;
    }
    out.params.push_back(p);
  }
  if (!want_grads) return kOk;
  out.grads.clear();
  out.grads.reserve(n);
  for (const at::Tensor& p : out.params) {
    const at::Tensor& g = p.grad();
    if (!g.defined() || g.layout() != c10::kStrided) return kIncomplete;
    out.grads.push_back(g);
  }
  return kOk;
}

// -- argument parsing (positional, METH_FASTCALL) ----------------------------------------------

double as_double(PyObject* obj) {
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

bool as_bool(PyObject* obj) {
  const int v = PyObject_IsTrue(obj);
  if (v < 0) throw python_error();
  return v != 0;
}

long as_long(PyObject* obj) {
  const long v = PyLong_AsLong(obj);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

std::optional<double> as_optional_double(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return as_double(obj);
}

std::optional<at::Tensor> as_optional_tensor(PyObject* obj, const char* what) {
  if (obj == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(obj), what, " must be a tensor or None");
  return THPVariable_Unpack(obj);
}

const at::Tensor& as_tensor(PyObject* obj, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), what, " must be a tensor");
  return THPVariable_Unpack(obj);
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* fn) {
  TORCH_CHECK_TYPE(nargs == want, fn, "() takes ", want, " arguments (", nargs, " given)");
}

// Runs an op call with the GIL released, as torch.ops does (a long CPU kernel
// must not stall the other Python threads).
template <typename F>
void without_gil(F&& call) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    call();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using TL = at::TensorList;
using OptTensor = const std::optional<at::Tensor>&;

// -- the functions ------------------------------------------------------------------------------

// bucket(group_params: list, positions: list[int], backups: list[Tensor]) -> Bucket
PyObject* make_bucket(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 3, "bucket");
  PyObject* group = args[0];
  TORCH_CHECK_TYPE(PyList_Check(group), "group_params must be a list");
  auto data = std::make_unique<BucketData>();
  data->backups = tensor_list(args[2], "backups");
  PyObject* positions = args[1];
  TORCH_CHECK_TYPE(PyList_Check(positions), "positions must be a list of ints");
  const Py_ssize_t n = PyList_GET_SIZE(positions);
  TORCH_CHECK(n > 0, "a bucket holds at least one parameter");
  TORCH_CHECK(static_cast<size_t>(n) == data->backups.size(), "positions has ", n,
              " entries but backups has ", data->backups.size());
  data->group_len = PyList_GET_SIZE(group);
  // Checked first, referenced after: a failed check leaves no reference behind.
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Py_ssize_t pos = PyLong_AsSsize_t(PyList_GET_ITEM(positions, i));
    if (pos == -1 && PyErr_Occurred()) throw python_error();
    TORCH_CHECK(pos >= 0 && pos < data->group_len, "position ", pos, " is out of range");
    PyObject* obj = PyList_GET_ITEM(group, pos);
    TORCH_CHECK_TYPE(THPVariable_Check(obj), "group_params[", pos, "] is not a tensor");
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (i == 0) {
      data->dtype = p.scalar_type();
      data->device = p.device();
    }
    TORCH_CHECK(p.scalar_type() == data->dtype && p.device() == data->device,
                "a bucket's parameters share one dtype and device");
    TORCH_CHECK(data->backups[i].sizes() == p.sizes(), "backups[", i, "] has shape ",
                data->backups[i].sizes(), " but its parameter has ", p.sizes());
    data->positions.push_back(pos);
    data->impls.push_back(p.unsafeGetTensorImpl());
    data->addresses.push_back(p.const_data_ptr());
    data->objects.push_back(obj);
  }
  Bucket* self = PyObject_New(Bucket, &BucketType);
  if (self == nullptr) return nullptr;
  for (PyObject* obj : data->objects) Py_INCREF(obj);
  Py_INCREF(group);
  data->group_params = group;
  self->data = data.release();
  return reinterpret_cast<PyObject*>(self);
  END_HANDLE_TH_ERRORS
}

// bucket_set(bucket, slot: int, tensors: list[Tensor] | None) -> None
PyObject* bucket_set(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 3, "bucket_set");
  BucketData& b = unpack_bucket(args[0]);
  const long slot = as_long(args[1]);
  TORCH_CHECK(slot >= 0 && slot < kSlots, "no slot ", slot);
  if (args[2] == Py_None) {
    b.slots[slot].clear();
  } else {
    std::vector<at::Tensor> tensors = tensor_list(args[2], "tensors");
    TORCH_CHECK(tensors.size() == b.objects.size(), "slot ", slot, " takes ",
                b.objects.size(), " tensors, got ", tensors.size());
    b.slots[slot] = std::move(tensors);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// bucket_get(bucket, slot: int) -> list[Tensor] (empty when the slot is)
PyObject* bucket_get(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 2, "bucket_get");
  BucketData& b = unpack_bucket(args[0]);
  const long slot = as_long(args[1]);
  TORCH_CHECK(slot >= 0 && slot < kSlots, "no slot ", slot);
  const auto& tensors = b.slots[slot];
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), THPVariable_Wrap(tensors[i]));
  }
  return out;
  END_HANDLE_TH_ERRORS
}

// take_grads(bucket, slot: int, clear: bool) -> int: the gradients into a slot (kept
// alive there), and with clear every parameter's .grad set to None (as `p.grad = None`).
PyObject* take_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 3, "take_grads");
  BucketData& b = unpack_bucket(args[0]);
  const long slot = as_long(args[1]);
  TORCH_CHECK(slot == kGradsY || slot == kGradsTilde, "take_grads fills a gradient slot");
  const bool clear = as_bool(args[2]);
  Lists lists;
  const int status = gather(b, lists, true);
  if (status == kOk) {
    b.slots[slot] = std::move(lists.grads);
    if (clear) {
      for (at::Tensor& p : lists.params) p.mutable_grad().reset();
    }
  }
  return PyLong_FromLong(status);
  END_HANDLE_TH_ERRORS
}

// clear_grads(bucket) -> int: every parameter's .grad set to None (as `p.grad = None`),
// when the plan still holds.
PyObject* clear_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 1, "clear_grads");
  Lists lists;
  const int status = gather(unpack_bucket(args[0]), lists, false);
  if (status == kOk) {
    for (at::Tensor& p : lists.params) p.mutable_grad().reset();
  }
  return PyLong_FromLong(status);
  END_HANDLE_TH_ERRORS
}

// check(bucket) -> int: whether the plan still holds (kOk or kLayoutChanged).
PyObject* check(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 1, "check");
  Lists lists;
  return PyLong_FromLong(gather(unpack_bucket(args[0]), lists, false));
  END_HANDLE_TH_ERRORS
}

// sumsq(buckets: tuple[Bucket, ...], eta: float | None, slot: int) -> Tensor | int
// grad_sumsq over the gradients of every bucket (one device and dtype): the
// parameters' .grad (slot -1) or a gradient slot; with eta, of (|w| + eta) * g (ASAM).
PyObject* sumsq(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 3, "sumsq");
  PyObject* buckets = args[0];
  TORCH_CHECK_TYPE(PyTuple_Check(buckets) && PyTuple_GET_SIZE(buckets) > 0,
                   "buckets must be a non-empty tuple");
  const std::optional<double> eta = as_optional_double(args[1]);
  const long slot = as_long(args[2]);
  TORCH_CHECK(slot == -1 || slot == kGradsY || slot == kGradsTilde,
              "sumsq reads the gradients or a gradient slot");
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> weights;
  Lists lists;
  const Py_ssize_t nb = PyTuple_GET_SIZE(buckets);
  for (Py_ssize_t k = 0; k < nb; ++k) {
    const BucketData& b = unpack_bucket(PyTuple_GET_ITEM(buckets, k));
    const int status = gather(b, lists, slot == -1);
    if (status != kOk) return PyLong_FromLong(status);
    const auto& part = slot == -1 ? lists.grads : b.slots[slot];
    TORCH_CHECK(part.size() == b.objects.size(), "sumsq: gradient slot ", slot, " is empty");
    if (nb == 1 && slot == -1) {
      grads = std::move(lists.grads);
    } else {
      grads.insert(grads.end(), part.begin(), part.end());
    }
    if (eta.has_value()) weights.insert(weights.end(), lists.params.begin(), lists.params.end());
  }
  static const auto grad_sumsq = op<at::Tensor(TL, TL, double)>("sam_fast::grad_sumsq");
  at::Tensor result;
  without_gil([&] { result = grad_sumsq.call(grads, weights, eta.value_or(0.0)); });
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

// perturb(bucket, sumsq, rho, eps, normalize, eta, grad_scale) -> int
PyObject* perturb(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 7, "perturb");
  BucketData& b = unpack_bucket(args[0]);
  const at::Tensor& total = as_tensor(args[1], "sumsq");
  const double rho = as_double(args[2]);
  const double eps = as_double(args[3]);
  const bool normalize = as_bool(args[4]);
  const std::optional<double> eta = as_optional_double(args[5]);
  const std::optional<at::Tensor> grad_scale = as_optional_tensor(args[6], "grad_scale");
  Lists c;
  const int status = gather(b, c, true);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto perturb_ =
      op<void(TL, TL, TL, const at::Tensor&, double, double, bool, std::optional<double>,
              OptTensor)>("sam_fast::perturb_");
  without_gil([&] {
    perturb_.call(c.params, c.grads, b.backups, total, rho, eps, normalize, eta, grad_scale);
  });
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

// restore(bucket, from_ys: bool) -> int: w <- backup (or SAMPa's y); no gradient needed.
PyObject* restore(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 2, "restore");
  BucketData& b = unpack_bucket(args[0]);
  const bool from_ys = as_bool(args[1]);
  const auto& source = from_ys ? b.slots[kYs] : b.backups;
  TORCH_CHECK(source.size() == b.objects.size(), "restore: the bucket holds no y");
  Lists c;
  const int status = gather(b, c, false);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto restore_ = op<void(TL, TL)>("sam_fast::restore_");
  without_gil([&] { restore_.call(c.params, source); });
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

// restore_sgd(bucket, lr, momentum, dampening, weight_decay, nesterov, maximize,
//             grad_scale, found_inf) -> int; the momentum buffers from their slot.
PyObject* restore_sgd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 9, "restore_sgd");
  BucketData& b = unpack_bucket(args[0]);
  const double lr = as_double(args[1]);
  const double momentum = as_double(args[2]);
  const double dampening = as_double(args[3]);
  const double weight_decay = as_double(args[4]);
  const bool nesterov = as_bool(args[5]);
  const bool maximize = as_bool(args[6]);
  const std::optional<at::Tensor> grad_scale = as_optional_tensor(args[7], "grad_scale");
  const std::optional<at::Tensor> found_inf = as_optional_tensor(args[8], "found_inf");
  static const std::vector<at::Tensor> none;
  const auto& bufs = momentum != 0.0 ? b.slots[kMomentumBuffer] : none;
  TORCH_CHECK(momentum == 0.0 || bufs.size() == b.objects.size(),
              "restore_sgd: the bucket holds no momentum buffers");
  Lists c;
  const int status = gather(b, c, true);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto restore_sgd_ =
      op<void(TL, TL, TL, TL, double, double, double, double, bool, bool, bool, OptTensor,
              OptTensor)>("sam_fast::restore_sgd_");
  without_gil([&] {
    restore_sgd_.call(c.params, b.backups, c.grads, bufs, lr, momentum, dampening, weight_decay,
                      nesterov, maximize, /*init_buffers=*/false, grad_scale, found_inf);
  });
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

// restore_adamw(bucket, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
//               decoupled_weight_decay, grad_scale, found_inf) -> int; state from the slots.
PyObject* restore_adamw(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 11, "restore_adamw");
  BucketData& b = unpack_bucket(args[0]);
  const double lr = as_double(args[1]);
  const double beta1 = as_double(args[2]);
  const double beta2 = as_double(args[3]);
  const double eps = as_double(args[4]);
  const double weight_decay = as_double(args[5]);
  const bool amsgrad = as_bool(args[6]);
  const bool maximize = as_bool(args[7]);
  const bool decoupled = as_bool(args[8]);
  const std::optional<at::Tensor> grad_scale = as_optional_tensor(args[9], "grad_scale");
  const std::optional<at::Tensor> found_inf = as_optional_tensor(args[10], "found_inf");
  const size_t n = b.objects.size();
  TORCH_CHECK(b.slots[kExpAvg].size() == n && b.slots[kExpAvgSq].size() == n &&
                  b.slots[kStateStep].size() == n && (!amsgrad || b.slots[kMaxExpAvgSq].size() == n),
              "restore_adamw: the bucket holds no Adam state");
  static const std::vector<at::Tensor> none;
  Lists c;
  const int status = gather(b, c, true);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto restore_adamw_ =
      op<void(TL, TL, TL, TL, TL, TL, TL, double, double, double, double, double, bool, bool,
              bool, OptTensor, OptTensor)>("sam_fast::restore_adamw_");
  without_gil([&] {
    restore_adamw_.call(c.params, b.backups, c.grads, b.slots[kExpAvg], b.slots[kExpAvgSq],
                        amsgrad ? b.slots[kMaxExpAvgSq] : none, b.slots[kStateStep], lr, beta1,
                        beta2, eps, weight_decay, amsgrad, maximize, decoupled, grad_scale,
                        found_inf);
  });
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

// sampa_points(bucket, sumsq, rho, eps, lr, momentum, dampening, weight_decay, nesterov,
//              maximize, init_buffers) -> int: g_y and the momentum buffers from their slots.
PyObject* sampa_points(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 11, "sampa_points");
  BucketData& b = unpack_bucket(args[0]);
  const at::Tensor& total = as_tensor(args[1], "sumsq");
  const double rho = as_double(args[2]);
  const double eps = as_double(args[3]);
  const double lr = as_double(args[4]);
  const double momentum = as_double(args[5]);
  const double dampening = as_double(args[6]);
  const double weight_decay = as_double(args[7]);
  const bool nesterov = as_bool(args[8]);
  const bool maximize = as_bool(args[9]);
  const bool init_buffers = as_bool(args[10]);
  const size_t n = b.objects.size();
  static const std::vector<at::Tensor> none;
  const bool read_buffers = momentum != 0.0 && !init_buffers;
  TORCH_CHECK(b.slots[kGradsY].size() == n && b.slots[kYs].size() == n &&
                  (!read_buffers || b.slots[kMomentumBuffer].size() == n),
              "sampa_points: the bucket holds no g_y, y or momentum buffers");
  Lists c;
  const int status = gather(b, c, false);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto sampa_points_ =
      op<void(TL, TL, TL, TL, TL, const at::Tensor&, double, double, double, double, double,
              double, bool, bool, bool)>("sam_fast::sampa_points_");
  without_gil([&] {
    sampa_points_.call(c.params, b.slots[kGradsY], read_buffers ? b.slots[kMomentumBuffer] : none,
                       b.backups, b.slots[kYs], total, rho, eps, lr, momentum, dampening,
                       weight_decay, nesterov, maximize, init_buffers);
  });
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

// sampa_update(bucket, lam, lr, momentum, dampening, weight_decay, nesterov, maximize,
//              init_buffers) -> int: g~ and g_y from their slots (g~ is dropped after),
//              the momentum buffers (written) from theirs.
PyObject* sampa_update(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 9, "sampa_update");
  BucketData& b = unpack_bucket(args[0]);
  const double lam = as_double(args[1]);
  const double lr = as_double(args[2]);
  const double momentum = as_double(args[3]);
  const double dampening = as_double(args[4]);
  const double weight_decay = as_double(args[5]);
  const bool nesterov = as_bool(args[6]);
  const bool maximize = as_bool(args[7]);
  const bool init_buffers = as_bool(args[8]);
  const size_t n = b.objects.size();
  static const std::vector<at::Tensor> none;
  TORCH_CHECK(b.slots[kGradsTilde].size() == n && b.slots[kGradsY].size() == n &&
                  (momentum == 0.0 || b.slots[kMomentumBuffer].size() == n),
              "sampa_update: the bucket holds no g~, g_y or momentum buffers");
  Lists c;
  const int status = gather(b, c, false);
  if (status != kOk) return PyLong_FromLong(status);
  static const auto sampa_update_ =
      op<void(TL, TL, TL, TL, TL, double, double, double, double, double, bool, bool, bool)>(
          "sam_fast::sampa_update_");
  without_gil([&] {
    sampa_update_.call(c.params, b.backups, b.slots[kGradsTilde], b.slots[kGradsY],
                       momentum != 0.0 ? b.slots[kMomentumBuffer] : none, lam, lr, momentum,
                       dampening, weight_decay, nesterov, maximize, init_buffers);
  });
  b.slots[kGradsTilde].clear();
  return PyLong_FromLong(kOk);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"bucket", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&make_bucket)),
     METH_FASTCALL, "bucket(group_params, positions, backups) -> Bucket"},
    {"bucket_set", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bucket_set)),
     METH_FASTCALL, "bucket_set(bucket, slot, tensors or None)"},
    {"bucket_get", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bucket_get)),
     METH_FASTCALL, "bucket_get(bucket, slot) -> list of tensors"},
    {"take_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&take_grads)),
     METH_FASTCALL, "take_grads(bucket, slot, clear) -> status"},
    {"clear_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&clear_grads)),
     METH_FASTCALL, "clear_grads(bucket) -> status"},
    {"check", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&check)),
     METH_FASTCALL, "check(bucket) -> status"},
    {"sumsq", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sumsq)),
     METH_FASTCALL, "sumsq(buckets, eta, slot) -> Tensor or status"},
    {"perturb", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&perturb)),
     METH_FASTCALL, "perturb(bucket, sumsq, rho, eps, normalize, eta, grad_scale) -> status"},
    {"restore", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&restore)),
     METH_FASTCALL, "restore(bucket, from_ys) -> status"},
    {"restore_sgd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&restore_sgd)),
     METH_FASTCALL, "restore_sgd(bucket, lr, momentum, dampening, weight_decay, nesterov, "
                    "maximize, grad_scale, found_inf) -> status"},
    {"restore_adamw",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&restore_adamw)), METH_FASTCALL,
     "restore_adamw(bucket, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, "
     "decoupled_weight_decay, grad_scale, found_inf) -> status"},
    {"sampa_points",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sampa_points)), METH_FASTCALL,
     "sampa_points(bucket, sumsq, rho, eps, lr, momentum, dampening, weight_decay, nesterov, "
     "maximize, init_buffers) -> status"},
    {"sampa_update",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sampa_update)), METH_FASTCALL,
     "sampa_update(bucket, lam, lr, momentum, dampening, weight_decay, nesterov, maximize, "
     "init_buffers) -> status"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "sam_fast._C.fast",
                       "the optimizers' eager fast path (csrc/fast_path.cpp)", -1, kMethods};

}  // namespace

PyObject* make_module() {
  BucketType.tp_dealloc = &bucket_dealloc;
  BucketType.tp_flags = Py_TPFLAGS_DEFAULT;
  BucketType.tp_doc = "The static lists of one plan bucket (csrc/fast_path.cpp).";
  if (PyType_Ready(&BucketType) < 0) return nullptr;
  PyObject* mod = PyModule_Create(&kModule);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "OK", kOk) < 0 ||
      PyModule_AddIntConstant(mod, "LAYOUT_CHANGED", kLayoutChanged) < 0 ||
      PyModule_AddIntConstant(mod, "INCOMPLETE", kIncomplete) < 0 ||
      PyModule_AddIntConstant(mod, "MOMENTUM_BUFFER", kMomentumBuffer) < 0 ||
      PyModule_AddIntConstant(mod, "EXP_AVG", kExpAvg) < 0 ||
      PyModule_AddIntConstant(mod, "EXP_AVG_SQ", kExpAvgSq) < 0 ||
      PyModule_AddIntConstant(mod, "MAX_EXP_AVG_SQ", kMaxExpAvgSq) < 0 ||
      PyModule_AddIntConstant(mod, "STATE_STEP", kStateStep) < 0 ||
      PyModule_AddIntConstant(mod, "YS", kYs) < 0 ||
      PyModule_AddIntConstant(mod, "GRADS_Y", kGradsY) < 0 ||
      PyModule_AddIntConstant(mod, "GRADS_TILDE", kGradsTilde) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  Py_INCREF(&BucketType);
  if (PyModule_AddObject(mod, "Bucket", reinterpret_cast<PyObject*>(&BucketType)) < 0) {
    Py_DECREF(&BucketType);
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}

}  // namespace sam_fast::fast
