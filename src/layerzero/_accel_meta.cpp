// layerzero._accel's one C++ piece: a tensor's sizes, dtype and device read from the C++ tensor, the values
// q.shape, q.dtype and q.device are made from, without creating the Python objects (three torch.Size
// objects cost more than the rest of a cached lz.attention call). Compiled against the torch it runs with
// (setup.py records the version; layerzero.accel refuses the extension under another one).
#include "_accel_meta.h"

#include <torch/csrc/autograd/python_variable.h>

extern "C" int lz_tensor_meta(PyObject *obj, lz_meta *m) {
  try {
    const c10::TensorImpl *impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
    if (impl->has_symbolic_sizes_strides() || impl->is_nested() || impl->layout() != c10::kStrided) {
      return 0;
    }
    c10::IntArrayRef sizes = impl->sizes();
    if (sizes.size() > LZ_MAX_DIMS) {
      return 0;
    }
    m->ndim = static_cast<int>(sizes.size());
    for (size_t i = 0; i < sizes.size(); i++) {
      m->sizes[i] = sizes[i];
    }
    m->scalar_type = static_cast<int>(impl->dtype().toScalarType());
    c10::Device device = impl->device();
    m->device_type = static_cast<int>(device.type());
    m->device_index = device.index();
    m->is_cpu = impl->is_cpu();
    return 1;
  } catch (...) {  // an undefined or exotic tensor: the Python entry reads it
    return 0;
  }
}
