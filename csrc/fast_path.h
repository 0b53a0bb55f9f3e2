// The optimizers' eager fast path (fast_path.cpp): a module sam_fast._C carries as `fast`.
#pragma once

#include <Python.h>

namespace sam_fast::fast {

// A new reference to the module, or nullptr with a Python error set.
PyObject* make_module();

}  // namespace sam_fast::fast
