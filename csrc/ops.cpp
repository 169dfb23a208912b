// The extension module mdgd_kernels._C.
//
// The schemas of the two mdgd:: ops are defined once, in Python
// (mdgd_kernels/_ops.py, with the composed-torch kernel as the
// CompositeExplicitAutograd default and the fake kernels for torch.compile);
// C++ only adds implementations, each backend file registering its own with
// TORCH_LIBRARY_IMPL: csrc/cpu/segment_gram.cpp and segment_combine.cpp for the
// CPU key, csrc/cuda/segment_gram.cu and segment_combine.cu for the CUDA key.
// The dispatcher accepts an implementation before its schema, so the import
// order does not matter.
//
// The Python module itself exposes nothing but built_with_cuda(): the kernels
// are reached through torch.ops.mdgd.*, never as bare pybind11 functions.
#include <torch/extension.h>

namespace {

bool built_with_cuda() {
#if defined(MDGD_WITH_CUDA) && MDGD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mdgd compiled kernels; the ops are torch.ops.mdgd.segment_gram / segment_combine_";
  m.def("built_with_cuda", &built_with_cuda, "True iff the CUDA kernels were compiled in.");
}
