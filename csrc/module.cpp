// Python entry point of the extension module fastreplay._C. The module itself is empty: importing
// it loads this shared library, whose static TORCH_LIBRARY initializers (ops.cpp, ops_cuda.cu)
// register torch.ops.fastreplay.*. Plain CPython API (no pybind11) keeps the build fast.
#include <Python.h>

static struct PyModuleDef fastreplay_c_module = {
    PyModuleDef_HEAD_INIT, "fastreplay._C",
    "Registers the custom ops torch.ops.fastreplay.* (sgd_step_, sgd_adjoint_, adam_step_, "
    "adam_adjoint_, built_with_cuda).",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastreplay_c_module); }
