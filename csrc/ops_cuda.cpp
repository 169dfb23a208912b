// The extension module mdgd_kernels._C_cuda: the CUDA kernels of the mdgd:: ops.
//
// csrc/cuda/segment_gram.cu and segment_combine.cu register them for the CUDA key
// (TORCH_LIBRARY_IMPL) into the schemas mdgd_kernels/_ops.py defines; see
// csrc/ops.cpp for the CPU module and why the two are separate extensions. setup.py
// builds this one only against a CUDA torch with a CUDA toolkit, and a failure here
// is recorded, not fatal. Like _C, the Python module exposes nothing.
#include <Python.h>

static PyModuleDef mdgd_cuda_module = {
    PyModuleDef_HEAD_INIT,
    "_C_cuda",
    "mdgd's compiled CUDA kernels, registered as torch.ops.mdgd.segment_gram / segment_combine_",
    0,
    nullptr,
};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  return PyModule_Create(&mdgd_cuda_module);
}
