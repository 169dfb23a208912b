// The extension module mdgd_kernels._C: the CPU kernels of the mdgd:: ops.
//
// The schemas of the two mdgd:: ops are defined once, in Python
// (mdgd_kernels/_ops.py, with the composed-torch kernel as the
// CompositeExplicitAutograd default and the fake kernels for torch.compile);
// C++ only adds implementations, each backend file registering its own with
// TORCH_LIBRARY_IMPL: csrc/cpu/segment_gram.cpp and segment_combine.cpp for the
// CPU key, in this module; csrc/cuda/segment_gram.cu and segment_combine.cu for
// the CUDA key, in the other one, mdgd_kernels._C_cuda (csrc/ops_cuda.cpp). The
// two are built and loaded apart, so that a CUDA toolkit that fails to build or
// link never costs the CPU kernels (setup.py). The dispatcher accepts an
// implementation before its schema, so the import order does not matter.
//
// The Python module itself exposes nothing: importing it runs the registrations,
// and the kernels are reached through torch.ops.mdgd.*, never as bare functions.
#include <Python.h>

static PyModuleDef mdgd_cpu_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "mdgd's compiled CPU kernels, registered as torch.ops.mdgd.segment_gram / segment_combine_",
    0,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&mdgd_cpu_module);
}
