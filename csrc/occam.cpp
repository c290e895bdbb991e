// Schemas of the occam operator library and what the build was made with.
#include <torch/extension.h>

#ifndef OCCAM_TORCH_VERSION
#define OCCAM_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(occam, m) {
  // Keeps the rows of x (and of index) where keep is true, in order; one device->host read
  // of the count on CUDA.
  m.def("compact(Tensor x, Tensor keep, Tensor index) -> (Tensor, Tensor)");
}

static pybind11::dict build_info() {
  pybind11::dict info;
#ifdef WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(OCCAM_CUDA_ARCHS);
  info["nvcc_version"] = std::string(OCCAM_NVCC_VERSION);
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = pybind11::none();
  info["nvcc_version"] = pybind11::none();
#endif
  info["torch_version"] = std::string(OCCAM_TORCH_VERSION);
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How occam_kernels._C was compiled");
}
