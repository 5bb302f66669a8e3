// pybind11 bindings for phased_dmd_mp._C.
//
// Kernels take raw data pointers (Python passes tensor.data_ptr()) so the extension needs no
// libtorch headers and builds against any torch. The Python wrappers in phased_dmd_mp/ops
// validate devices, dtypes, shapes and contiguity before calling in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "subinterval_loss/subinterval_loss.h"

namespace py = pybind11;

namespace {

template <typename T>
const T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}

template <typename T>
T* as_mut_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void subinterval_loss_forward(const std::string& dtype, std::uintptr_t pred, std::uintptr_t x_s,
                              std::uintptr_t eps, std::uintptr_t scale, std::uintptr_t xs_coef,
                              std::uintptr_t eps_coef, std::uintptr_t weight, std::uintptr_t loss,
                              int64_t batch, int64_t per_sample) {
  const auto* s = as_ptr<double>(scale);
  const auto* a = as_ptr<double>(xs_coef);
  const auto* e = as_ptr<double>(eps_coef);
  const auto* w = as_ptr<double>(weight);
  if (dtype == "float32") {
    phased_dmd::subinterval_loss_forward_cpu<float>(as_ptr<float>(pred), as_ptr<float>(x_s),
                                                    as_ptr<float>(eps), s, a, e, w,
                                                    as_mut_ptr<float>(loss), batch, per_sample);
  } else if (dtype == "float64") {
    phased_dmd::subinterval_loss_forward_cpu<double>(as_ptr<double>(pred), as_ptr<double>(x_s),
                                                     as_ptr<double>(eps), s, a, e, w,
                                                     as_mut_ptr<double>(loss), batch, per_sample);
  } else {
    throw std::invalid_argument("subinterval_loss_forward: unsupported dtype " + dtype);
  }
}

void subinterval_loss_backward(const std::string& dtype, std::uintptr_t grad_loss,
                               std::uintptr_t pred, std::uintptr_t x_s, std::uintptr_t eps,
                               std::uintptr_t scale, std::uintptr_t xs_coef,
                               std::uintptr_t eps_coef, std::uintptr_t weight,
                               std::uintptr_t grad_pred, int64_t batch, int64_t per_sample) {
  const auto* s = as_ptr<double>(scale);
  const auto* a = as_ptr<double>(xs_coef);
  const auto* e = as_ptr<double>(eps_coef);
  const auto* w = as_ptr<double>(weight);
  if (dtype == "float32") {
    phased_dmd::subinterval_loss_backward_cpu<float>(
        as_ptr<float>(grad_loss), as_ptr<float>(pred), as_ptr<float>(x_s), as_ptr<float>(eps), s,
        a, e, w, as_mut_ptr<float>(grad_pred), batch, per_sample);
  } else if (dtype == "float64") {
    phased_dmd::subinterval_loss_backward_cpu<double>(
        as_ptr<double>(grad_loss), as_ptr<double>(pred), as_ptr<double>(x_s),
        as_ptr<double>(eps), s, a, e, w, as_mut_ptr<double>(grad_pred), batch, per_sample);
  } else {
    throw std::invalid_argument("subinterval_loss_backward: unsupported dtype " + dtype);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "phased_dmd_mp compiled kernels (see csrc/*/ *.h for their reference semantics)";
  m.def("subinterval_loss_forward_cpu", &subinterval_loss_forward,
        py::call_guard<py::gil_scoped_release>(), py::arg("dtype"), py::arg("pred"),
        py::arg("x_s"), py::arg("eps"), py::arg("scale"), py::arg("xs_coef"),
        py::arg("eps_coef"), py::arg("weight"), py::arg("loss"), py::arg("batch"),
        py::arg("per_sample"));
  m.def("subinterval_loss_backward_cpu", &subinterval_loss_backward,
        py::call_guard<py::gil_scoped_release>(), py::arg("dtype"), py::arg("grad_loss"),
        py::arg("pred"), py::arg("x_s"), py::arg("eps"), py::arg("scale"), py::arg("xs_coef"),
        py::arg("eps_coef"), py::arg("weight"), py::arg("grad_pred"), py::arg("batch"),
        py::arg("per_sample"));
}
