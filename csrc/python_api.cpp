// The Python module eman_fused._C: loading it registers the ops (static initializers of the
// other files); it also offers an unboxed fast path for eager calls. torch.ops converts each
// list element to an IValue (~0.4 us per tensor: 2 ms for 5,000 tensors); here a tensor
// costs a type check and a refcount, and the op is still called through the dispatcher, so
// fake/dispatch modes and every backend see it as usual.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/DynamicTypes.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "ema/handle.h"
#include "ema/layout.h"
#include "ema/plan.h"
#include "optim/hyper.h"
#include "optim/layout.h"
#include "optim/math.h"
#include "optim/step_plan.h"
#include "posthoc/layout.h"

namespace {

// A C-level type test: THPVariable_Check calls nn.Parameter's Python __instancecheck__
// (~100 ns per parameter).
bool is_tensor(PyObject* obj) {
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  return Py_TYPE(obj) == tensor_type || PyType_IsSubtype(Py_TYPE(obj), tensor_type);
}

// Non-owning views of the tensors of a Python sequence. `items` (a tuple) owns them, so
// they stay alive while the GIL is released, and no C++ refcount is touched per tensor
// (a C++ reference to a Python-owned tensor also increfs its PyObject).
class BorrowedTensors {
 public:
  BorrowedTensors(PyObject* seq, const char* side, const char* op = "ema_update_") {
    items_ = PySequence_Tuple(seq);
    if (items_ == nullptr) throw python_error();
    const Py_ssize_t n = PyTuple_GET_SIZE(items_);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(items_, i);
      TORCH_CHECK_TYPE(is_tensor(item), op, ": ", side, "[", i, "] is a ",
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

// ema_update_'s checks of a pair of lists, writing nothing (the fused optimizers run them on the
// teacher's other tensors before their first write): a cached plan means these exact tensors
// (pointers, shapes, strides, dtypes) passed before; else the full validation runs, and caches.
PyObject* ema_check_lists(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *teacher_obj, *student_obj;
  if (!PyArg_ParseTuple(args, "OO", &teacher_obj, &student_obj)) return nullptr;
  const BorrowedTensors teacher(teacher_obj, "teacher");
  const BorrowedTensors student(student_obj, "student");
  {
    pybind11::gil_scoped_release no_gil;
    eman_fused::get_ema_plan(teacher.list(), student.list());
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// -- the fused optimizers' host path: the per-param walks of a step in C, and the step ops
// called without boxing each tensor (torch.ops converts every list element to an IValue).

// The numbers of a Python sequence, each converted by `convert` (PyLong_AsLongLong,
// PyFloat_AsDouble: -1 with an exception set on failure).
template <typename T, typename Convert>
std::vector<T> number_list(PyObject* seq, const char* what, Convert convert) {
  PyObject* items = PySequence_Fast(seq, what);
  if (items == nullptr) throw python_error();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  std::vector<T> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(convert(PySequence_Fast_GET_ITEM(items, i)));
    if (out[i] == static_cast<T>(-1) && PyErr_Occurred()) {
      Py_DECREF(items);
      throw python_error();
    }
  }
  Py_DECREF(items);
  return out;
}

c10::List<std::optional<at::Tensor>> optional_tensors(PyObject* seq) {
  PyObject* items = PySequence_Fast(seq, "expected a sequence of tensors or None");
  if (items == nullptr) throw python_error();
  c10::List<std::optional<at::Tensor>> out;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(items, i);
    if (item == Py_None) {
      out.push_back(std::nullopt);
    } else if (is_tensor(item)) {
      out.push_back(THPVariable_Unpack(item));
    } else {
      Py_DECREF(items);
      TORCH_CHECK_TYPE(false, "hyper_tensors[", i, "] is a ", Py_TYPE(item)->tp_name,
                       ", not a tensor or None");
    }
  }
  Py_DECREF(items);
  return out;
}

using StepSig = void(int64_t, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, at::TensorList, c10::ArrayRef<int64_t>, at::TensorList,
                     c10::ArrayRef<double>, const c10::List<std::optional<at::Tensor>>&);
using TableSig = at::Tensor(int64_t, at::TensorList, at::TensorList, at::TensorList,
                            at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                            at::TensorList, c10::ArrayRef<double>,
                            const c10::List<std::optional<at::Tensor>>&, bool);

// optim_step_lists(optimizer, params, grads, first, second, max_second, teacher, flags, steps,
// hyper, hyper_tensors, table_only): torch.ops.eman_fused.optim_ema_step_ (or, table_only,
// _optim_ema_table: the checks, writing nothing) through the dispatcher, unboxed.
PyObject* optim_step_lists(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  long long optimizer;
  PyObject *p_obj, *g_obj, *m1_obj, *m2_obj, *m3_obj, *t_obj, *flags_obj, *steps_obj, *hyper_obj,
      *ht_obj;
  int table_only;
  if (!PyArg_ParseTuple(args, "LOOOOOOOOOOp", &optimizer, &p_obj, &g_obj, &m1_obj, &m2_obj,
                        &m3_obj, &t_obj, &flags_obj, &steps_obj, &hyper_obj, &ht_obj, &table_only))
    return nullptr;
  constexpr const char* op = "optim_ema_step_";
  const BorrowedTensors params(p_obj, "params", op), grads(g_obj, "grads", op);
  const BorrowedTensors first(m1_obj, "first_moments", op), second(m2_obj, "second_moments", op);
  const BorrowedTensors max_second(m3_obj, "max_second_moments", op);
  const BorrowedTensors teacher(t_obj, "teacher", op), steps(steps_obj, "steps", op);
  const auto flags = number_list<int64_t>(flags_obj, "flags must be a sequence of ints",
                                          PyLong_AsLongLong);
  const auto hyper = number_list<double>(hyper_obj, "hyper must be a sequence of floats",
                                         PyFloat_AsDouble);
  const c10::List<std::optional<at::Tensor>> hyper_tensors = optional_tensors(ht_obj);
  if (table_only) {
    static const auto table_op = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("eman_fused::_optim_ema_table", "")
                                     .typed<TableSig>();
    pybind11::gil_scoped_release no_gil;
    table_op.call(optimizer, params.list(), grads.list(), first.list(), second.list(),
                  max_second.list(), teacher.list(), flags, steps.list(), hyper, hyper_tensors,
                  false);
  } else {
    static const auto step_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("eman_fused::optim_ema_step_", "")
                                    .typed<StepSig>();
    pybind11::gil_scoped_release no_gil;
    step_op.call(optimizer, params.list(), grads.list(), first.list(), second.list(),
                 max_second.list(), teacher.list(), flags, steps.list(), hyper, hyper_tensors);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// optim_gather(params) -> (params with a grad, their grads, dtype, devices, regular): one walk
// over a param group. dtype: the params' dtype if they share one, else None; devices: the
// distinct (type, index) pairs; regular: False if any param needs the Python walk's handling
// (not a tensor, a sparse or non-strided grad, a device other than CPU/CUDA, a grad of the
// param's shape and device in other strides).
PyObject* optim_gather(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* seq;
  if (!PyArg_ParseTuple(args, "O", &seq)) return nullptr;
  PyObject* items = PySequence_Fast(seq, "params must be a sequence");
  if (items == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  auto params = pybind11::reinterpret_steal<pybind11::list>(PyList_New(0));
  auto grads = pybind11::reinterpret_steal<pybind11::list>(PyList_New(0));
  bool regular = true, one_dtype = true;
  std::optional<at::ScalarType> dtype;
  std::vector<at::Device> devices;
  for (Py_ssize_t i = 0; i < n && regular; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(items, i);
    if (!is_tensor(item)) {
      regular = false;
      break;
    }
    const at::Tensor& p = THPVariable_Unpack(item);
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    const at::Device d = p.device();
    if (g.layout() != at::kStrided || (d.type() != at::kCPU && d.type() != at::kCUDA) ||
        (g.strides() != p.strides() && g.sizes() == p.sizes() && g.device() == d)) {
      regular = false;
      break;
    }
    if (std::find(devices.begin(), devices.end(), d) == devices.end()) devices.push_back(d);
    if (!dtype) dtype = p.scalar_type();
    one_dtype = one_dtype && *dtype == p.scalar_type();
    if (PyList_Append(params.ptr(), item) != 0) {
      Py_DECREF(items);
      throw python_error();
    }
    PyObject* g_obj = THPVariable_Wrap(g);
    if (g_obj == nullptr || PyList_Append(grads.ptr(), g_obj) != 0) {
      Py_XDECREF(g_obj);
      Py_DECREF(items);
      throw python_error();
    }
    Py_DECREF(g_obj);
  }
  Py_DECREF(items);
  pybind11::tuple device_tuple(devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    device_tuple[i] = pybind11::make_tuple(devices[i].is_cpu() ? "cpu" : "cuda",
                                           static_cast<int>(devices[i].index()));
  }
  pybind11::object dtype_obj = pybind11::none();
  if (dtype && one_dtype) {
    dtype_obj = pybind11::reinterpret_borrow<pybind11::object>(
        reinterpret_cast<PyObject*>(torch::getTHPDtype(*dtype)));
  }
  return pybind11::make_tuple(params, grads, dtype_obj, device_tuple, regular).release().ptr();
  END_HANDLE_TH_ERRORS
}

// state_lookup(state, params, keys) -> one list per key: state.get(p, {}).get(key) for every
// param. torch.Tensor hashes by id() in Python (~100 ns a call from C); for tensors of types
// that keep that __hash__ the hash is formed here, as Python forms it from that int.
PyObject* state_lookup(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *state, *seq, *keys;
  if (!PyArg_ParseTuple(args, "O!OO!", &PyDict_Type, &state, &seq, &PyTuple_Type, &keys))
    return nullptr;
  static PyObject* tensor_hash = nullptr;
  if (tensor_hash == nullptr) {
    tensor_hash = PyObject_GetAttrString(THPVariableClass, "__hash__");
    if (tensor_hash == nullptr) return nullptr;
  }
  PyObject* items = PySequence_Fast(seq, "params must be a sequence");
  if (items == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items), k = PyTuple_GET_SIZE(keys);
  PyObject* out = PyTuple_New(k);
  for (Py_ssize_t j = 0; j < k; ++j) PyTuple_SET_ITEM(out, j, PyList_New(n));
  PyTypeObject* known_type = nullptr;  // the last type seen to keep Tensor.__hash__
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PySequence_Fast_GET_ITEM(items, i);
    if (Py_TYPE(p) != known_type) {
      PyObject* h = PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(p)), "__hash__");
      const bool same = h == tensor_hash;
      Py_XDECREF(h);
      if (h == nullptr) PyErr_Clear();
      known_type = same ? Py_TYPE(p) : nullptr;
    }
    PyObject* entry;
    if (known_type != nullptr) {
      // What hash(p) is for these types: the int id(p) that __hash__ returns, taken as a
      // Py_ssize_t (slot_tp_hash), -1 being reserved for errors.
      auto h = static_cast<Py_hash_t>(reinterpret_cast<intptr_t>(p));
      if (h == -1) h = -2;
      entry = _PyDict_GetItem_KnownHash(state, p, h);
    } else {
      entry = PyDict_GetItemWithError(state, p);
    }
    if (entry == nullptr && PyErr_Occurred()) {
      Py_DECREF(items);
      Py_DECREF(out);
      return nullptr;
    }
    for (Py_ssize_t j = 0; j < k; ++j) {
      PyObject* v = nullptr;
      if (entry != nullptr && PyDict_Check(entry)) {
        v = PyDict_GetItemWithError(entry, PyTuple_GET_ITEM(keys, j));
        if (v == nullptr && PyErr_Occurred()) {
          Py_DECREF(items);
          Py_DECREF(out);
          return nullptr;
        }
      }
      if (v == nullptr) v = Py_None;
      Py_INCREF(v);
      PyList_SET_ITEM(PyTuple_GET_ITEM(out, j), i, v);
    }
  }
  Py_DECREF(items);
  return out;
  END_HANDLE_TH_ERRORS
}

// eman_fused._C.OptimStepPlan: an optim/step_plan.h plan of a fused optimizer's step, with the
// Python objects the step's lists came from: the param groups (each dict, its params list and
// their order, which params had no grad, the values of the keys given as `same`) and the
// optimizer's state dict (every entry and every entry of its per-param dicts). A step compares
// those by identity, reads each call's hyper-parameters from its group, reads the current
// TensorImpl of every tensor object of the plan, and runs the plan; anything else different
// makes it return False, having written nothing (the caller then takes the checked path).
// The plan holds references to the objects it compares (so an identical address is the same
// object): a state tensor dropped from the state dict stays alive until the next step, which
// finds the state changed and the caller drops the plan.
class PyOptimStepPlan {
 public:
  // calls: per kernel call (optimizer, params, grads, first, second, max_second, teacher, flags,
  // steps, hyper, group index, sources), sources giving each hyper-parameter's (group key, index
  // into its value or -1), or None for the teacher momentum the step is given; same: per group,
  // the keys whose values must stay the same objects.
  PyOptimStepPlan(pybind11::list calls, pybind11::list groups, pybind11::dict state,
                  pybind11::list same)
      : groups_(pybind11::tuple(groups)), state_(state) {
    namespace py = pybind11;
    constexpr const char* op = "OptimStepPlan";
    TORCH_CHECK_VALUE(same.size() == groups.size(), op, ": one `same` tuple per group");
    std::vector<std::unique_ptr<BorrowedTensors>> borrowed;
    std::vector<eman_fused::StepCallLists> lists;
    std::vector<std::vector<int64_t>> flags(calls.size());
    for (size_t c = 0; c < calls.size(); ++c) {
      const py::tuple call = calls[c].cast<py::tuple>();
      TORCH_CHECK_VALUE(call.size() == 12, op, ": a call is 12 items");
      auto list = [&](size_t k, const char* name) {
        borrowed.push_back(std::make_unique<BorrowedTensors>(call[k].ptr(), name, op));
        return borrowed.back()->list();
      };
      eman_fused::StepCallLists l;
      l.optimizer = call[0].cast<int64_t>();
      l.lists.params = list(1, "params");
      l.lists.grads = list(2, "grads");
      l.lists.first_moments = list(3, "first_moments");
      l.lists.second_moments = list(4, "second_moments");
      l.lists.max_second_moments = list(5, "max_second_moments");
      l.lists.teacher = list(6, "teacher");
      flags[c] = number_list<int64_t>(call[7].ptr(), "flags must be ints", PyLong_AsLongLong);
      l.lists.flags = flags[c];
      l.lists.steps = list(8, "steps");
      l.hyper = number_list<double>(call[9].ptr(), "hyper must be floats", PyFloat_AsDouble);
      lists.push_back(std::move(l));

      Call mine;
      mine.group = call[10].cast<size_t>();
      TORCH_CHECK_VALUE(mine.group < groups.size(), op, ": no group ", mine.group);
      py::list objects;
      for (size_t k : {1, 3, 4, 5, 6, 8}) {
        for (py::handle t : call[k]) objects.append(t);
      }
      mine.tensors = py::tuple(objects);
      for (py::handle source : call[11]) {
        if (source.is_none()) {
          mine.sources.push_back({py::object(), -1});
        } else {
          const py::tuple pair = source.cast<py::tuple>();
          mine.sources.push_back({pair[0], pair[1].cast<int64_t>()});
        }
      }
      TORCH_CHECK_VALUE(mine.sources.size() == lists.back().hyper.size(), op,
                        ": one source per hyper-parameter");
      calls_.push_back(std::move(mine));
    }
    plan_ = std::make_unique<eman_fused::OptimStepPlan>(lists);

    for (size_t g = 0; g < groups.size(); ++g) {
      Group mine;
      PyObject* group = PyTuple_GET_ITEM(groups_.ptr(), g);
      TORCH_CHECK_VALUE(PyDict_Check(group), op, ": param group ", g, " is not a dict");
      PyObject* params = PyDict_GetItemWithError(group, params_key());
      TORCH_CHECK_VALUE(params != nullptr && PyList_Check(params), op, ": group ", g,
                        "['params'] is not a list");
      mine.params = py::reinterpret_borrow<py::object>(params);
      mine.items = py::tuple(mine.params);
      for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mine.items.ptr()); ++i) {
        PyObject* p = PyTuple_GET_ITEM(mine.items.ptr(), i);
        if (is_tensor(p) && !THPVariable_Unpack(p).grad().defined()) mine.without_grad.push_back(i);
      }
      for (py::handle key : same[g]) {
        PyObject* value = PyDict_GetItemWithError(group, key.ptr());
        if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
        mine.same.emplace_back(py::reinterpret_borrow<py::object>(key),
                               py::reinterpret_borrow<py::object>(value ? value : Py_None));
      }
      groups_seen_.push_back(std::move(mine));
    }
    walk_state(
        [&](PyObject* obj) {
          state_items_.push_back(py::reinterpret_borrow<py::object>(obj));
          return true;
        },
        [&](Py_ssize_t size) {
          state_sizes_.push_back(size);
          return true;
        });
  }

  bool step(pybind11::handle groups, pybind11::handle state, double teacher_momentum) {
    PyObject* gl = groups.ptr();
    if (state.ptr() != state_.ptr() || !PyList_Check(gl) ||
        PyList_GET_SIZE(gl) != PyTuple_GET_SIZE(groups_.ptr())) {
      return false;
    }
    for (size_t g = 0; g < groups_seen_.size(); ++g) {
      PyObject* group = PyList_GET_ITEM(gl, g);
      if (group != PyTuple_GET_ITEM(groups_.ptr(), g)) return false;
      const Group& seen = groups_seen_[g];
      PyObject* params = PyDict_GetItemWithError(group, params_key());
      if (params != seen.params.ptr()) return false;  // (an error: the checked path raises it)
      const Py_ssize_t n = PyTuple_GET_SIZE(seen.items.ptr());
      if (PyList_GET_SIZE(params) != n) return false;
      PyObject* const* now = &PyList_GET_ITEM(params, 0);
      PyObject* const* then = &PyTuple_GET_ITEM(seen.items.ptr(), 0);
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (now[i] != then[i]) return false;
      }
      for (const Py_ssize_t i : seen.without_grad) {
        if (THPVariable_Unpack(then[i]).grad().defined()) return false;
      }
      for (const auto& [key, value] : seen.same) {
        if (PyDict_GetItemWithError(group, key.ptr()) != value.ptr()) return false;
      }
    }
    size_t k = 0, d = 0;
    const bool same_state = walk_state(
        [&](PyObject* obj) { return k < state_items_.size() && state_items_[k++].ptr() == obj; },
        [&](Py_ssize_t size) { return d < state_sizes_.size() && state_sizes_[d++] == size; });
    if (!same_state || k != state_items_.size() || d != state_sizes_.size()) return false;

    thread_local std::vector<const c10::TensorImpl*> impls;
    thread_local std::vector<double> hyper;
    // The params' grads, read here under the GIL and held until the kernels are done: without
    // the GIL another thread may set `p.grad = None` (or zero_grad()) during the step, and the
    // kernels must not read a grad that was freed. Released below with the GIL held again.
    thread_local std::vector<at::Tensor> grads;
    struct Release {
      ~Release() { grads.clear(); }
    } release;
    impls.clear();
    hyper.clear();
    grads.clear();
    for (size_t ci = 0; ci < calls_.size(); ++ci) {
      const Call& c = calls_[ci];
      PyObject* group = PyList_GET_ITEM(gl, c.group);
      for (const auto& [key, index] : c.sources) {
        double v = teacher_momentum;
        if (key.ptr() != nullptr && !read_value(group, key.ptr(), index, &v)) return false;
        hyper.push_back(v);
      }
      const Py_ssize_t n = PyTuple_GET_SIZE(c.tensors.ptr());
      const auto num_params = static_cast<Py_ssize_t>(plan_->params_of_call(ci));
      for (Py_ssize_t i = 0; i < n; ++i) {
        const at::Tensor& t = THPVariable_Unpack(PyTuple_GET_ITEM(c.tensors.ptr(), i));
        impls.push_back(t.unsafeGetTensorImpl());
        if (i < num_params) grads.push_back(t.grad());
      }
    }
    bool stepped;
    {
      pybind11::gil_scoped_release no_gil;
      stepped = plan_->step(impls.data(), grads.data(), hyper.data());
    }
    return stepped;
  }

 private:
  struct Group {
    pybind11::object params;  // the group's params list
    pybind11::tuple items;    // its params then
    std::vector<Py_ssize_t> without_grad;
    std::vector<std::pair<pybind11::object, pybind11::object>> same;
  };
  struct Call {
    size_t group = 0;
    pybind11::tuple tensors;  // in the plan's order
    std::vector<std::pair<pybind11::object, int64_t>> sources;  // null key: teacher momentum
  };

  static PyObject* params_key() {
    static PyObject* key = PyUnicode_InternFromString("params");
    return key;
  }

  // Calls size(n) with the state dict's size, then f on every key and value of it, and for
  // each value that is a dict, size(its size) and f on its keys and values; stops at the first
  // call that returns false.
  template <typename F, typename S>
  bool walk_state(F&& f, S&& size) const {
    PyObject* state = state_.ptr();
    if (!size(PyDict_GET_SIZE(state))) return false;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(state, &pos, &key, &value)) {
      if (!f(key) || !f(value)) return false;
      if (!PyDict_Check(value)) continue;
      if (!size(PyDict_GET_SIZE(value))) return false;
      Py_ssize_t inner = 0;
      PyObject *k2, *v2;
      while (PyDict_Next(value, &inner, &k2, &v2)) {
        if (!f(k2) || !f(v2)) return false;
      }
    }
    return true;
  }

  // group[key] (or its item `index`) as a float, as the checked path's float(v) takes it: a
  // Python number, or a 0-dim CPU tensor. False for anything else (the checked path handles it).
  static bool read_value(PyObject* group, PyObject* key, int64_t index, double* out) {
    PyObject* v = PyDict_GetItemWithError(group, key);
    if (v == nullptr) return false;
    if (index >= 0) {
      if (!PyTuple_Check(v) || index >= PyTuple_GET_SIZE(v)) return false;
      v = PyTuple_GET_ITEM(v, index);
    }
    if (PyFloat_CheckExact(v)) {
      *out = PyFloat_AS_DOUBLE(v);
      return true;
    }
    if (PyLong_Check(v)) {  // int and bool
      *out = PyLong_AsDouble(v);
      if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
      }
      return true;
    }
    if (is_tensor(v)) {
      const at::Tensor& t = THPVariable_Unpack(v);
      if (t.dim() != 0 || !t.device().is_cpu() || needs_dispatcher_keys(t)) return false;
      *out = t.item<double>();
      return true;
    }
    return false;
  }
  static bool needs_dispatcher_keys(const at::Tensor& t) {
    return eman_fused::needs_dispatcher(t.key_set()) || t.layout() != at::kStrided;
  }

  pybind11::tuple groups_;
  pybind11::object state_;
  std::vector<Group> groups_seen_;
  std::vector<pybind11::object> state_items_;
  std::vector<Py_ssize_t> state_sizes_;
  std::vector<Call> calls_;
  std::unique_ptr<eman_fused::OptimStepPlan> plan_;
};

// eman_fused._C.EmaHandle(teacher, student): an ema/handle.h handle over the tensor objects of
// two sequences, held (as tuples) for the handle's life. Each step re-reads every object's
// current tensor (a `param.data = new` or swap_tensors shows there): no Python call, no
// refcount per tensor. What a call reads is its own (a thread-local buffer, or borrowed slots
// made by the call): steps of one handle from two threads run while the GIL is released.
class PyEmaHandle {
 public:
  PyEmaHandle(PyObject* teacher_seq, PyObject* student_seq, bool replan, bool plan)
      : teacher_(tuple_of_tensors(teacher_seq, "teacher")),
        student_(tuple_of_tensors(student_seq, "student")),
        replan_(replan) {
    const BorrowedSlots t(teacher_), s(student_);
    pybind11::gil_scoped_release no_gil;
    handle_ = std::make_unique<eman_fused::EmaHandle>(t.tensors, s.tensors, replan, plan);
  }
  PyEmaHandle(const PyEmaHandle&) = delete;
  PyEmaHandle& operator=(const PyEmaHandle&) = delete;

  // An EmaStep value: 0 updated; 1 nothing written, call the op; 2 nothing written, a tensor
  // changed (replan=False handles only).
  int step(pybind11::handle momentum_obj) {
    PyObject* m = momentum_obj.ptr();
    double momentum = 0.0;
    const at::Tensor* momentum_tensor = nullptr;
    if (PyFloat_CheckExact(m)) {
      momentum = PyFloat_AS_DOUBLE(m);
    } else if (is_tensor(m)) {
      momentum_tensor = &THPVariable_Unpack(m);
    } else {
      TORCH_CHECK_TYPE(!PyBool_Check(m) && PyNumber_Check(m), "momentum must be a float or a ",
                       "0-dim tensor, got ", Py_TYPE(m)->tp_name);
      momentum = PyFloat_AsDouble(m);
      if (momentum == -1.0 && PyErr_Occurred()) throw python_error();
    }
    const std::vector<const c10::TensorImpl*>& impls = read_impls();
    {
      pybind11::gil_scoped_release no_gil;
      if (handle_->step_if_unchanged(impls.data(), momentum, momentum_tensor)) {
        return static_cast<int>(eman_fused::EmaStep::kUpdated);
      }
    }
    const BorrowedSlots t(teacher_), s(student_);
    pybind11::gil_scoped_release no_gil;
    return static_cast<int>(handle_->step(t.tensors, s.tensors, momentum, momentum_tensor));
  }

  // Pickling (torch.save of a module holding a handle) and copy.deepcopy keep the tensor
  // objects; unpickling builds a new handle over them, which plans at its first step (the
  // tensors may not be where they will run yet).
  pybind11::tuple state() const { return pybind11::make_tuple(teacher_, student_, replan_); }

  void validate() {
    const BorrowedSlots t(teacher_), s(student_);
    pybind11::gil_scoped_release no_gil;
    handle_->validate(t.tensors, s.tensors);
  }

  // Whether any tensor changed since the plan (the check of a step, writing nothing).
  bool changed() {
    const std::vector<const c10::TensorImpl*>& impls = read_impls();
    pybind11::gil_scoped_release no_gil;
    return !handle_->matches(impls.data());
  }

  int64_t plans_built() const { return handle_->plans_built(); }
  at::Tensor table() const { return handle_->table(); }
  size_t size() const { return handle_->size(); }

 private:
  static pybind11::tuple tuple_of_tensors(PyObject* seq, const char* side) {
    PyObject* items = PySequence_Tuple(seq);
    if (items == nullptr) throw python_error();
    auto tuple = pybind11::reinterpret_steal<pybind11::tuple>(items);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); ++i) {
      PyObject* item = PyTuple_GET_ITEM(items, i);
      TORCH_CHECK_TYPE(is_tensor(item), "ema_update_: ", side, "[", i, "] is a ",
                       Py_TYPE(item)->tp_name, ", not a tensor");
    }
    return tuple;
  }

  // Each object's current TensorImpl (one pointer read per object, under the GIL), into this
  // thread's buffer: valid until this thread's next call, which cannot start before this one
  // returns (the kernels call no Python).
  const std::vector<const c10::TensorImpl*>& read_impls() const {
    thread_local std::vector<const c10::TensorImpl*> impls;
    const Py_ssize_t n = PyTuple_GET_SIZE(teacher_.ptr());
    impls.resize(2 * n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      impls[2 * i] = THPVariable_Unpack(PyTuple_GET_ITEM(teacher_.ptr(), i)).unsafeGetTensorImpl();
      impls[2 * i + 1] =
          THPVariable_Unpack(PyTuple_GET_ITEM(student_.ptr(), i)).unsafeGetTensorImpl();
    }
    return impls;
  }

  // Borrowed (+0) views of a tuple's tensors, made under the GIL; released without a decref
  // (also when a constructor throws). The tuple keeps the tensors alive.
  struct BorrowedSlots {
    std::vector<at::Tensor> tensors;
    explicit BorrowedSlots(const pybind11::tuple& tuple) {
      const Py_ssize_t n = PyTuple_GET_SIZE(tuple.ptr());
      tensors.reserve(n);
      for (Py_ssize_t i = 0; i < n; ++i) {
        tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(
            THPVariable_Unpack(PyTuple_GET_ITEM(tuple.ptr(), i))));
      }
    }
    BorrowedSlots(const BorrowedSlots&) = delete;
    BorrowedSlots& operator=(const BorrowedSlots&) = delete;
    ~BorrowedSlots() {
      for (auto& t : tensors) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    }
  };

  pybind11::tuple teacher_, student_;
  bool replan_;
  std::unique_ptr<eman_fused::EmaHandle> handle_;
};

PyObject* ema_plan_cache_info(PyObject* /*self*/, PyObject* /*args*/) {
  HANDLE_TH_ERRORS
  return Py_BuildValue("(LLL)", static_cast<long long>(eman_fused::ema_plans_cached()),
                       static_cast<long long>(eman_fused::ema_plans_kept_for_graphs()),
                       static_cast<long long>(eman_fused::ema_plan_builds()));
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
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, first_moment);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, second_moment);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, max_second_moment);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, teacher);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, numel);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, first_chunk);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, num_chunks);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, flags);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, bias_correction1);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, bias_correction2_sqrt);
  EMAN_FUSED_FIELD(optim_fields, OptimEntry, step);
  // Each optimizer's hyper-parameter names in the step op's order, and its scalar block's word
  // offsets (both generated from the lists in optim/hyper.h and optim/math.h).
  py::dict hyper, scalars, sgd_scalars, adamw_scalars, lars_scalars, optimizers;
  py::list sgd_hyper, adamw_hyper, lars_hyper;
#define EMAN_FUSED_NAME(list, name, check) list.append(#name);
#define EMAN_FUSED_SGD_NAME(name, check) EMAN_FUSED_NAME(sgd_hyper, name, check)
#define EMAN_FUSED_ADAMW_NAME(name, check) EMAN_FUSED_NAME(adamw_hyper, name, check)
#define EMAN_FUSED_LARS_NAME(name, check) EMAN_FUSED_NAME(lars_hyper, name, check)
  EMAN_FUSED_SGD_HYPER(EMAN_FUSED_SGD_NAME)
  EMAN_FUSED_ADAMW_HYPER(EMAN_FUSED_ADAMW_NAME)
  EMAN_FUSED_LARS_HYPER(EMAN_FUSED_LARS_NAME)
#undef EMAN_FUSED_SGD_NAME
#undef EMAN_FUSED_ADAMW_NAME
#undef EMAN_FUSED_LARS_NAME
#undef EMAN_FUSED_NAME
#define EMAN_FUSED_SCALAR(dict, Struct, name) \
  dict[#name] = static_cast<int64_t>(offsetof(Struct, name) / sizeof(double));
#define EMAN_FUSED_SGD_SCALAR(name) EMAN_FUSED_SCALAR(sgd_scalars, SgdScalars, name)
#define EMAN_FUSED_ADAMW_SCALAR(name) EMAN_FUSED_SCALAR(adamw_scalars, AdamWScalars, name)
#define EMAN_FUSED_LARS_SCALAR(name) EMAN_FUSED_SCALAR(lars_scalars, LarsScalars, name)
  EMAN_FUSED_SGD_SCALARS(EMAN_FUSED_SGD_SCALAR)
  EMAN_FUSED_ADAMW_SCALARS(EMAN_FUSED_ADAMW_SCALAR)
  EMAN_FUSED_LARS_SCALARS(EMAN_FUSED_LARS_SCALAR)
#undef EMAN_FUSED_SGD_SCALAR
#undef EMAN_FUSED_ADAMW_SCALAR
#undef EMAN_FUSED_LARS_SCALAR
#undef EMAN_FUSED_SCALAR
  hyper["sgd"] = sgd_hyper, hyper["adamw"] = adamw_hyper, hyper["lars"] = lars_hyper;
  scalars["sgd"] = sgd_scalars, scalars["adamw"] = adamw_scalars, scalars["lars"] = lars_scalars;
  optimizers["sgd"] = static_cast<int64_t>(Optimizer::kSgd);
  optimizers["adamw"] = static_cast<int64_t>(Optimizer::kAdamW);
  optimizers["lars_simclr"] = static_cast<int64_t>(Optimizer::kLarsSimclr);
  optimizers["lars_you2017"] = static_cast<int64_t>(Optimizer::kLarsYou2017);
  py::dict chunk_fields;  // common/multi_tensor.h's TensorChunk, shared by both tables
  EMAN_FUSED_FIELD(chunk_fields, TensorChunk, tensor);
  EMAN_FUSED_FIELD(chunk_fields, TensorChunk, start);
  py::dict posthoc_fields;
  EMAN_FUSED_FIELD(posthoc_fields, PosthocTensorEntry, student);
  EMAN_FUSED_FIELD(posthoc_fields, PosthocTensorEntry, numel);
  EMAN_FUSED_FIELD(posthoc_fields, PosthocTensorEntry, kind);
  EMAN_FUSED_FIELD(posthoc_fields, PosthocTensorEntry, num_profiles);
  EMAN_FUSED_FIELD(posthoc_fields, PosthocTensorEntry, profiles);
  py::dict ema, optim, posthoc, out;
  ema["chunk_elems"] = kEmaChunkElems, ema["entry_words"] = kEmaEntryWords;
  ema["chunk_words"] = kChunkWords, ema["kind_copy_bytes"] = kKindCopyBytes;
  ema["num_float_tags"] = kNumFloatTags, ema["fields"] = ema_fields;
  ema["chunk_fields"] = chunk_fields;
  optim["chunk_elems"] = kOptimChunkElems, optim["entry_words"] = kOptimEntryWords;
  optim["chunk_words"] = kChunkWords, optim["flag_first"] = kOptimFirst;
  optim["flag_adapt"] = kOptimAdapt, optim["fields"] = optim_fields;
  optim["chunk_fields"] = chunk_fields;
  optim["scalar_words"] = kOptimScalarWords, optim["scalars"] = scalars;
  optim["hyper"] = hyper, optim["optimizers"] = optimizers;
  posthoc["chunk_elems"] = kPosthocChunkElems, posthoc["entry_words"] = kPosthocEntryWords;
  posthoc["chunk_words"] = kChunkWords, posthoc["kind_copy_bytes"] = kKindCopyBytes;
  posthoc["max_profiles"] = kMaxPosthocProfiles, posthoc["fields"] = posthoc_fields;
  out["float_tags"] = tags, out["ema"] = ema, out["optim"] = optim, out["posthoc"] = posthoc;
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

// recording_functions(): whether a torch.autograd.profiler.record_function range opened now
// would be recorded: any RecordFunction callback, this thread's (a profiler started here) or
// global (all-threads or on-demand profiling, the execution-trace observer).
PyObject* recording_functions(PyObject* /*self*/, PyObject* /*args*/) {
  if (at::hasCallbacks()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"recording_functions", recording_functions, METH_NOARGS,
     "recording_functions() -> bool: whether a record_function range opened now would be "
     "recorded (any thread-local or global RecordFunction callback)."},
    {"watch_changed", watch_changed, METH_VARARGS,
     "watch_changed(tensor_dicts, other_dicts, state) -> bool: whether the watched dicts' entries "
     "(objects, tensor storages) differ from the key in `state`; updates `state`."},
    {"ema_update_lists", ema_update_lists, METH_VARARGS,
     "ema_update_lists(teacher, student, momentum): torch.ops.eman_fused.ema_update_ without "
     "per-tensor boxing; eager only (torch.compile traces the op itself)."},
    {"ema_check_lists", ema_check_lists, METH_VARARGS,
     "ema_check_lists(teacher, student): ema_update_'s checks of the lists (cached), no update."},
    {"ema_plan_cache_info", ema_plan_cache_info, METH_NOARGS,
     "ema_plan_cache_info() -> (plans cached, plans kept for captured CUDA graphs, plans built)"},
    {"optim_step_lists", optim_step_lists, METH_VARARGS,
     "optim_step_lists(optimizer, params, grads, first, second, max_second, teacher, flags, "
     "steps, hyper, hyper_tensors, table_only): optim_ema_step_ (or _optim_ema_table) unboxed."},
    {"optim_gather", optim_gather, METH_VARARGS,
     "optim_gather(params) -> (params with a grad, grads, shared dtype or None, devices, regular)"},
    {"state_lookup", state_lookup, METH_VARARGS,
     "state_lookup(state, params, keys) -> per key, [state.get(p, {}).get(key) for p in params]"},
    {"table_layout", table_layout, METH_NOARGS,
     "table_layout(): the EMA and optimizer tables' sizes, flags and entry field offsets (in "
     "int64 words), the optimizers' enum values, hyper-parameter names and scalar offsets, as "
     "the C++ kernels define them."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
  try {
    namespace py = pybind11;
    auto m = py::reinterpret_borrow<py::module_>(mod);
    py::class_<PyEmaHandle> handle_class(m, "EmaHandle",
                            "EmaHandle(teacher, student): a persistent, validated EMA plan of two "
                            "tensor sequences (eman_fused/csrc/ema/handle.h).");
    handle_class
        .def(py::init([](py::handle t, py::handle s, bool replan, bool plan) {
               return std::make_unique<PyEmaHandle>(t.ptr(), s.ptr(), replan, plan);
             }),
             py::arg("teacher"), py::arg("student"), py::arg("replan") = true,
             py::arg("plan") = true,
             "plan=False: validate and plan at the first step (construction cannot raise).")
        .def("step", &PyEmaHandle::step, py::arg("momentum"),
             "One update: returns UPDATED, USE_OP (nothing written: call the op) or CHANGED "
             "(nothing written: a tensor changed; replan=False handles only).")
        .def(py::pickle([](const PyEmaHandle& h) { return h.state(); },
                        [](const py::tuple& state) {
                          TORCH_CHECK_VALUE(state.size() == 3, "EmaHandle: bad pickled state");
                          return std::make_unique<PyEmaHandle>(state[0].ptr(), state[1].ptr(),
                                                               state[2].cast<bool>(), false);
                        }))
        .def("validate", &PyEmaHandle::validate,
             "The checks of a step (raising what it would), writing nothing.")
        .def("changed", &PyEmaHandle::changed,
             "Whether a tensor changed since the plan (a step's check, nothing written).")
        .def_property_readonly("plans_built", &PyEmaHandle::plans_built)
        .def_property_readonly("table", &PyEmaHandle::table)
        .def("__len__", &PyEmaHandle::size);
    py::class_<PyOptimStepPlan>(m, "OptimStepPlan",
                                "OptimStepPlan(calls, groups, state, same): a persistent, checked "
                                "plan of a fused optimizer's step (eman_fused/csrc/optim/step_plan.h).")
        .def(py::init<py::list, py::list, py::dict, py::list>(), py::arg("calls"),
             py::arg("groups"), py::arg("state"), py::arg("same"))
        .def("step", &PyOptimStepPlan::step, py::arg("groups"), py::arg("state"),
             py::arg("teacher_momentum"),
             "One step if nothing changed beyond what the plan takes (True), else False, with "
             "nothing written.");
    using eman_fused::EmaStep;
    handle_class.attr("UPDATED") = static_cast<int>(EmaStep::kUpdated);
    handle_class.attr("USE_OP") = static_cast<int>(EmaStep::kUseOp);
    handle_class.attr("CHANGED") = static_cast<int>(EmaStep::kChanged);
  } catch (py::error_already_set& e) {
    e.restore();
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
