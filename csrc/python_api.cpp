// The Python module eman_fused._C: loading it registers the ops (static initializers of the
// other files); it also offers an unboxed fast path for eager calls. torch.ops converts each
// list element to an IValue (~0.4 us per tensor: 2 ms for 5,000 tensors); here a tensor
// costs a type check and a refcount, and the op is still called through the dispatcher, so
// fake/dispatch modes and every backend see it as usual.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstddef>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "ema/layout.h"
#include "optim/layout.h"

namespace {

// Non-owning views of the tensors of a Python sequence. `items` (a tuple) owns them, so
// they stay alive while the GIL is released, and no C++ refcount is touched per tensor
// (a C++ reference to a Python-owned tensor also increfs its PyObject).
class BorrowedTensors {
 public:
  BorrowedTensors(PyObject* seq, const char* side) {
    items_ = PySequence_Tuple(seq);
    if (items_ == nullptr) throw python_error();
    const Py_ssize_t n = PyTuple_GET_SIZE(items_);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(items_, i);
      TORCH_CHECK_TYPE(THPVariable_Check(item), "ema_update_: ", side, "[", i, "] is a ",
                       Py_TYPE(item)->tp_name, ", not a tensor");
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(item)));
    }
  }
  ~BorrowedTensors() {
    for (auto& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    Py_XDECREF(items_);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  at::TensorList list() const { return tensors_; }

 private:
  PyObject* items_ = nullptr;
  std::vector<at::Tensor> tensors_;
};

PyObject* ema_update_lists(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *teacher_obj, *student_obj, *momentum_obj;
  if (!PyArg_ParseTuple(args, "OOO", &teacher_obj, &student_obj, &momentum_obj)) return nullptr;
  const BorrowedTensors teacher(teacher_obj, "teacher");
  const BorrowedTensors student(student_obj, "student");
  if (THPVariable_Check(momentum_obj)) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("eman_fused::ema_update_", "tensor")
                               .typed<void(at::TensorList, at::TensorList, const at::Tensor&)>();
    const at::Tensor momentum = THPVariable_Unpack(momentum_obj);
    pybind11::gil_scoped_release no_gil;
    op.call(teacher.list(), student.list(), momentum);
  } else {
    const double momentum = PyFloat_AsDouble(momentum_obj);
    if (momentum == -1.0 && PyErr_Occurred()) return nullptr;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("eman_fused::ema_update_", "")
                               .typed<void(at::TensorList, at::TensorList, double)>();
    pybind11::gil_scoped_release no_gil;
    op.call(teacher.list(), student.list(), momentum);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// The table layouts as Python sees them (the Triton kernels and the fake kernels read the same
// int64 tables as the C++ kernels): sizes, flags and each entry field's word offset, taken from
// the structs themselves so the two sides cannot drift apart.
#define EMAN_FUSED_FIELD(dict, Struct, field) \
  dict[#field] = static_cast<int64_t>(offsetof(Struct, field) / sizeof(int64_t))

PyObject* table_layout(PyObject* /*self*/, PyObject* /*args*/) {
  using namespace eman_fused;
  HANDLE_TH_ERRORS
  namespace py = pybind11;
  py::dict tags;
  tags["float32"] = static_cast<int64_t>(kF32), tags["bfloat16"] = static_cast<int64_t>(kBF16);
  tags["float16"] = static_cast<int64_t>(kF16), tags["float64"] = static_cast<int64_t>(kF64);
  tags["absent"] = static_cast<int64_t>(kAbsent);
  py::dict ema_fields, optim_fields;
  EMAN_FUSED_FIELD(ema_fields, EmaTensorEntry, teacher);
  EMAN_FUSED_FIELD(ema_fields, EmaTensorEntry, student);
  EMAN_FUSED_FIELD(ema_fields, EmaTensorEntry, numel);
  EMAN_FUSED_FIELD(ema_fields, EmaTensorEntry, kind);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, param);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, grad);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, state0);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, state1);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, state2);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, teacher);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, numel);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, first_chunk);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, num_chunks);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, flags);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, scalar0);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, scalar1);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, step);
  py::dict ema, optim, out;
  ema["chunk_elems"] = kEmaChunkElems, ema["entry_words"] = kEmaEntryWords;
  ema["chunk_words"] = kChunkWords, ema["kind_copy_bytes"] = kKindCopyBytes;
  ema["num_float_tags"] = kNumFloatTags, ema["fields"] = ema_fields;
  optim["chunk_elems"] = kOptimChunkElems, optim["entry_words"] = kOptimEntryWords;
  optim["chunk_words"] = kChunkWords, optim["flag_first"] = kOptimFirst;
  optim["flag_adapt"] = kOptimAdapt, optim["fields"] = optim_fields;
  out["float_tags"] = tags, out["ema"] = ema, out["optim"] = optim;
  return out.release().ptr();
  END_HANDLE_TH_ERRORS
}
#undef EMAN_FUSED_FIELD

// watch_changed(tensor_dicts, other_dicts, state): a key of every dict's entries (the objects,
// and for tensors their storage), compared with the key in `state` (a bytearray), which is
// overwritten when they differ. EMATeacher passes its student's and its own module dicts
// (_parameters and _buffers first, then _modules): a tensor or module replaced or added changes
// an entry; a move, cast or re-layout through nn.Module._apply (`param.data = new`) changes a
// storage. One C walk over the dicts (PyDict_Next: no hashing), where Python would take ~100 ns
// per entry.
// Walks the dicts, giving each key word to `sink`; stops early when the sink returns false.
template <typename Sink>
bool walk_watched(PyObject* tensor_dicts, PyObject* other_dicts, PyTypeObject* tensor_type,
                  Sink&& sink) {
  for (PyObject* dicts : {tensor_dicts, other_dicts}) {
    const bool tensors = dicts == tensor_dicts;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dicts); ++i) {
      PyObject* d = PyTuple_GET_ITEM(dicts, i);
      TORCH_CHECK_TYPE(PyDict_Check(d), "watch_changed: expected tuples of dicts");
      if (!sink(PyDict_GET_SIZE(d))) return false;
      Py_ssize_t pos = 0;
      PyObject *name, *v;
      while (PyDict_Next(d, &pos, &name, &v)) {
        if (!sink(reinterpret_cast<intptr_t>(name)) || !sink(reinterpret_cast<intptr_t>(v)))
          return false;
        // A C-level type test: THPVariable_Check would call Parameter's Python __instancecheck__.
        if (tensors && (Py_TYPE(v) == tensor_type || PyType_IsSubtype(Py_TYPE(v), tensor_type))) {
          const c10::TensorImpl* impl = THPVariable_Unpack(v).unsafeGetTensorImpl();
          if (!sink(reinterpret_cast<intptr_t>(impl->unsafe_storage().unsafeGetStorageImpl())))
            return false;
        }
      }
    }
  }
  return true;
}

PyObject* watch_changed(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensor_dicts, *other_dicts, *state;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyTuple_Type, &tensor_dicts, &PyTuple_Type, &other_dicts,
                        &PyByteArray_Type, &state))
    return nullptr;
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  TORCH_CHECK(tensor_type != nullptr, "watch_changed: torch.Tensor is not initialized");
  // The steady state reads the stored key and compares word by word, writing nothing.
  const auto* old = reinterpret_cast<const int64_t*>(PyByteArray_AS_STRING(state));
  const Py_ssize_t n_old = PyByteArray_GET_SIZE(state) / static_cast<Py_ssize_t>(sizeof(int64_t));
  Py_ssize_t at = 0;
  const bool same = walk_watched(tensor_dicts, other_dicts, tensor_type, [&](int64_t w) {
    return at < n_old && old[at++] == w;
  });
  if (same && at == n_old) Py_RETURN_FALSE;
  std::vector<int64_t> key;
  key.reserve(static_cast<size_t>(n_old) + 64);
  walk_watched(tensor_dicts, other_dicts, tensor_type, [&](int64_t w) {
    key.push_back(w);
    return true;
  });
  const Py_ssize_t bytes = static_cast<Py_ssize_t>(key.size() * sizeof(int64_t));
  if (PyByteArray_Resize(state, bytes) != 0) return nullptr;
  std::memcpy(PyByteArray_AS_STRING(state), key.data(), bytes);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"watch_changed", watch_changed, METH_VARARGS,
     "watch_changed(tensor_dicts, other_dicts, state) -> bool: whether the watched dicts' entries "
     "(objects, tensor storages) differ from the key in `state`; updates `state`."},
    {"ema_update_lists", ema_update_lists, METH_VARARGS,
     "ema_update_lists(teacher, student, momentum): torch.ops.eman_fused.ema_update_ without "
     "per-tensor boxing; eager only (torch.compile traces the op itself)."},
    {"table_layout", table_layout, METH_NOARGS,
     "table_layout(): the EMA and optimizer tables' sizes, flags and entry field offsets (in "
     "int64 words), as the C++ kernels define them."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
