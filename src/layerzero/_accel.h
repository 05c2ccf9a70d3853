/* layerzero._accel: what its two files share (see _accel.c). */
#ifndef LAYERZERO_ACCEL_H
#define LAYERZERO_ACCEL_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_accel_meta.h"

/* Interned attribute names and constants, made once by the module's init (_accel.c). */
typedef struct {
    PyObject *dtype, *device, *shape, *plans, *data, *scopes, *gate, *blocked, *stats, *calls, *direct, *fn,
        *cnst, *recover, *bhsd, *bshd, *transpose, *one, *two, *zero;
    PyTypeObject *ordered_dict; /* collections.OrderedDict: the runtime's plan cache */
} lz_names;
extern lz_names LZ;

enum { KIND_ATTENTION, KIND_RMS_NORM, KIND_LAYER_NORM };

/* A __slots__ attribute read (or written) at its offset, as CPython's specializing interpreter does: valid while
 * the object's type is ``type`` and its version tag is unchanged (a class attribute assigned since resets it). */
typedef struct {
    PyTypeObject *type; /* strong reference; NULL: not learned */
    unsigned int version;
    Py_ssize_t offset;  /* -1: not a slot of that type (the ordinary lookup serves) */
} lz_slot;
enum { SLOT_SCOPES, SLOT_GATE, SLOT_BLOCKED, SLOT_STATS, SLOT_CALLS, SLOT_DIRECT, SLOT_FN, SLOT_CONST, SLOT_PLANS,
       SLOT_DATA, N_SLOTS };
#define MAX_PARAMS 16

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    PyObject *runtime;   /* RT: RT.plans.data is the plan dict, RT.recover the failure contract */
    PyObject *live;      /* LIVE: LIVE.scopes is truthy while any policy scope is open */
    PyObject *op_a;      /* the operation ("attention.full"; "rms_norm", "layer_norm") */
    PyObject *op_b;      /* attention's causal operation ("attention.causal") */
    PyObject *miss;      /* the sentinel returned for every call this path does not serve */
    PyTypeObject *tensor_type; /* torch.Tensor: tensors of exactly this type are read by lz_tensor_meta */
    PyTypeObject *param_type;  /* torch.nn.Parameter (torch function off): read so too where it may stand (weights) */
    lz_slot slots[N_SLOTS];    /* LIVE.scopes, plan.gate, gate.blocked, ... (see lz_get) */
    PyObject *dtypes[LZ_SCALAR_TYPES]; /* t.dtype by scalar type, as Python read it the first time */
    PyObject *devices[LZ_DEVICE_TYPES][LZ_DEVICE_INDEXES]; /* t.device by (type, index), likewise */
    /* set by entry(): the public function and the Python entry's parameters */
    PyObject *fallback;  /* the generated Python entry: serves every call this path does not */
    PyObject *doc;       /* the text signature and docstring (def.ml_doc points into it) */
    PyObject *name;      /* the function's name (def.ml_name points into it) */
    PyObject *module;    /* the name of the module that holds it */
    PyObject *entry_fn;  /* the public function (a pickle of it names it: see hit_reduce) */
    Py_ssize_t nparams, npositional;
    PyObject *params[MAX_PARAMS];   /* the parameter names, in order */
    PyObject *defaults[MAX_PARAMS]; /* their defaults (NULL: required) */
    PyMethodDef def;
} Hit;
/* _accel_serve.c: the cached hit of each kind */
PyObject *lz_serve(Hit *self, PyObject *const *a);                /* the output, or self->miss */
PyObject *lz_miss(Hit *self);                                     /* self->miss, a read's error cleared */
PyObject *lz_find_plan(Hit *self, PyObject *plans, PyObject *op, PyObject *q, PyObject *k, PyObject *v,
                       PyObject *mask, PyObject *is_causal, PyObject *dropout_p, PyObject *window);
int lz_admits(Hit *self, PyObject *q, PyObject *k, PyObject *v); /* the attention shape guard, maskless */
/* what the exact key of a maskless attention call carries besides its constants (q's scalar type and device, the
 * sizes of q, k, v), where its shape guard holds: 1, or 0 (not plain 4-D tensors, or the guard fails) */
#define LZ_ATTENTION_SIG 15
int lz_attention_sig(Hit *self, PyObject *q, PyObject *k, PyObject *v, int64_t sig[LZ_ATTENTION_SIG]);
/* the exact key of a maskless attention call whose shape guard holds (new reference), or NULL (an error may be set) */
PyObject *lz_attention_key(Hit *self, PyObject *op, PyObject *q, PyObject *k, PyObject *v, PyObject *is_causal,
                           PyObject *dropout_p, PyObject *window);
/* the plan a norm hit's lookup finds in plans for its canonical arguments (new reference), or NULL */
PyObject *lz_find_norm_plan(Hit *self, PyObject *plans, PyObject *const *a);
/* what the exact key of a norm call carries besides its operation (x's dtype, device and shape, the weight's and
 * bias's dtypes, eps): 1, or 0 (not read here) */
#define LZ_NORM_SIG 16
int lz_norm_sig(Hit *self, PyObject *const *a, int64_t sig[LZ_NORM_SIG]);
/* the exact key of a norm call (its guard holding; new reference), or NULL (an error may be set) */
PyObject *lz_norm_key(Hit *self, PyObject *const *a);
/* obj.name through ``slot`` (new reference; NULL with an error set), and obj.name = value (a reference taken) */
PyObject *lz_slot_get(lz_slot *slot, PyObject *obj, PyObject *name);
int lz_slot_set(lz_slot *slot, PyObject *obj, PyObject *name, PyObject *value);
PyObject *lz_transpose12(PyObject *x);      /* x.transpose(1, 2) (new reference; NULL with an error set) */
int lz_scoped(Hit *self);                   /* LIVE.scopes is truthy: 1, falsy: 0, an error: -1 */
/* ``not plan.gate.blocked``, then ``plan.stats.calls += 1``: 1 when the plan runs here, 0 when the slow runner
 * must (fallback, timing, verify mode: the Python entry calls plan.run), -1 on an error. */
int lz_open_and_count(Hit *self, PyObject *plan);
PyObject *lz_fetch_exception(void); /* the raised exception, normalized, its traceback on it (new reference) */
void lz_chain(PyObject *exc);       /* the exception now raised happened while handling exc (its __context__) */
int lz_method_init(PyObject *module); /* _accel_dispatch.c: adds the Method type and its constants */
PyTypeObject *lz_hit_type(void);     /* the Hit type */
#endif
