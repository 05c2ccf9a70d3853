/* What layerzero._accel reads of a tensor, from the C++ tensor itself (_accel_meta.cpp). */
#ifndef LAYERZERO_ACCEL_META_H
#define LAYERZERO_ACCEL_META_H
#include <Python.h>
#include <stdint.h>

#define LZ_MAX_DIMS 8
#define LZ_SCALAR_TYPES 64   /* c10::ScalarType values below this are cached (there are about 45) */
#define LZ_DEVICE_TYPES 64   /* c10::DeviceType values below this, */
#define LZ_DEVICE_INDEXES 16 /* and device indexes below this, are cached */

typedef struct {
    int ndim;
    int64_t sizes[LZ_MAX_DIMS];
    int scalar_type;  /* c10::ScalarType */
    int device_type;  /* c10::DeviceType */
    int device_index; /* -1: none */
    int is_cpu;
} lz_meta;

#ifdef __cplusplus
extern "C" {
#endif
/* Reads the metadata of obj, a torch.Tensor of exactly that type (the caller checks); 0 when obj is not a
 * plain strided tensor of at most LZ_MAX_DIMS concrete sizes (symbolic, nested, sparse), 1 otherwise. */
int lz_tensor_meta(PyObject *obj, lz_meta *m);
#ifdef __cplusplus
}
#endif
#endif
