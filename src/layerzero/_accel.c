/* layerzero._accel: the compiled form of lz.attention's cached hit.
 *
 * The call contract in layerzero/ops/attention.py is the definition; this file serves the common case of it
 * without the interpreter: plain q, k, v (BHSD), no variants, no operation name, no live policy scope. It
 * computes the same family key, runs the same shape guard, looks the plan up in the same dict, and calls the
 * kernel exactly as the generated Python entry does. Whatever it does not serve (anything unusual, a missing
 * plan, a blocked gate, an attribute that raises) it answers with the MISS sentinel, and the Python entry
 * then handles the call from the start, so every rejection and every first call keeps its one home.
 *
 * Built as an optional extension (setup.py): without a compiler, or with LAYERZERO_PURE_PYTHON=1, the
 * Python entry runs alone. tests/test_accel.py checks the two agree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>

#include "_accel_meta.h"

/* attribute names, interned once */
static PyObject *s_dtype, *s_is_cpu, *s_device, *s_shape, *s_plans, *s_data, *s_scopes, *s_gate, *s_blocked,
    *s_stats, *s_calls, *s_direct, *s_fn, *s_recover, *s_bhsd, *one;
static PyTypeObject *ordered_dict; /* collections.OrderedDict: the runtime's plan cache */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *runtime;   /* RT: RT.plans.data is the plan dict, RT.recover the failure contract */
    PyObject *live;      /* LIVE: LIVE.scopes is truthy while any policy scope is open */
    PyObject *op_full;   /* "attention.full" */
    PyObject *op_causal; /* "attention.causal" */
    PyObject *miss;      /* the sentinel returned for every call this path does not serve */
    PyTypeObject *tensor_type; /* torch.Tensor: tensors of exactly this type are read by lz_tensor_meta */
    PyObject *dtypes[LZ_SCALAR_TYPES]; /* q.dtype by scalar type, as Python read it the first time */
    PyObject *devices[LZ_DEVICE_TYPES][LZ_DEVICE_INDEXES]; /* q.device by (type, index), likewise */
    PyObject *fallback;  /* the generated Python entry (set by entry()): serves every call this path does not */
    PyObject *doc;       /* the entry's text signature and docstring (ml_doc points into it) */
    PyObject *entry_fn;  /* the public function entry() made (a pickle of it names it: see hit_reduce) */
    PyObject *module;    /* the name of the module that holds it as ``attention`` */
    PyMethodDef def;     /* the public function's definition (it lives as long as this object) */
} AttentionHit;

/* The metadata of a plain torch.Tensor (0: another type, or not a plain strided tensor). */
static inline int
read_meta(AttentionHit *self, PyObject *t, lz_meta *m)
{
    return Py_TYPE(t) == self->tensor_type && lz_tensor_meta(t, m);
}

/* The Python object t.<name> gives for the cached slot (borrowed; NULL with an error set). Torch's dtype and
 * device objects are values (a dtype is a singleton, a device compares and hashes by type and index), so the
 * object read the first time stands for every later tensor with the same scalar type or device. */
static PyObject *
cached_attr(PyObject **slot, PyObject *t, PyObject *name)
{
    if (*slot == NULL)
        *slot = PyObject_GetAttr(t, name);
    return *slot;
}

/* q.is_cpu or q.device, as the contract's family key writes it (borrowed). */
static PyObject *
device_key(AttentionHit *self, PyObject *t, const lz_meta *m)
{
    if (m->is_cpu)
        return Py_True;
    if (m->device_type < 0 || m->device_type >= LZ_DEVICE_TYPES || m->device_index < -1 ||
        m->device_index + 1 >= LZ_DEVICE_INDEXES) {
        PyErr_SetString(PyExc_ValueError, "device outside the cached range");
        return NULL;
    }
    return cached_attr(&self->devices[m->device_type][m->device_index + 1], t, s_device);
}

/* The shape as a tuple of ints (hashes and compares as the torch.Size the Python key holds). */
static PyObject *
shape_tuple(const lz_meta *m)
{
    PyObject *shape = PyTuple_New(m->ndim);
    for (int i = 0; shape != NULL && i < m->ndim; i++) {
        PyObject *size = PyLong_FromLongLong(m->sizes[i]);
        if (size == NULL)
            Py_CLEAR(shape);
        else
            PyTuple_SET_ITEM(shape, i, size);
    }
    return shape;
}

static inline PyObject *
miss(AttentionHit *self)
{
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like go on up */
        PyErr_Clear();   /* an attribute or a hash that raised: the Python entry reads it again and reports it */
    }
    return Py_NewRef(self->miss);
}

/* Run the plan's kernel as the generated entry does; a kernel's exception goes to RT.recover. */
static PyObject *
run_plan(AttentionHit *self, PyObject *plan, PyObject *const *a, PyObject *scale, PyObject *window)
{
    PyObject *q = a[0], *k = a[1], *v = a[2], *mask = a[3], *is_causal = a[4], *dropout_p = a[5];
    PyObject *out = NULL;
    PyObject *direct = PyObject_GetAttr(plan, s_direct);
    if (direct == NULL)
        return NULL;
    if (direct != Py_None && scale == Py_None) {
        PyObject *args[3] = {q, k, v};
        out = PyObject_Vectorcall(direct, args, 3, NULL);
    }
    else {
        PyObject *fn = PyObject_GetAttr(plan, s_fn);
        if (fn != NULL) {
            PyObject *args[8] = {q, k, v, mask, is_causal, dropout_p, scale, window};
            out = PyObject_Vectorcall(fn, args, 8, NULL);
            Py_DECREF(fn);
        }
    }
    Py_DECREF(direct);
    if (out != NULL || !PyErr_ExceptionMatches(PyExc_Exception))
        return out;
    /* except Exception as exc: out = RT.recover(plan, (q, k, v, attn_mask, is_causal, dropout_p, scale, window), 0, exc) */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject *call_args = PyTuple_Pack(8, q, k, v, mask, is_causal, dropout_p, scale, window);
    PyObject *recover = call_args ? PyObject_GetAttr(self->runtime, s_recover) : NULL;
    if (recover != NULL) {
        PyObject *zero = PyLong_FromLong(0);
        PyObject *rargs[4] = {plan, call_args, zero, exc};
        out = zero ? PyObject_Vectorcall(recover, rargs, 4, NULL) : NULL;
        Py_XDECREF(zero);
        Py_DECREF(recover);
    }
    Py_XDECREF(call_args);
    if (out == NULL) { /* what recover raised happened while handling exc, as in Python */
        PyObject *t2, *e2, *tb2;
        PyErr_Fetch(&t2, &e2, &tb2);
        PyErr_NormalizeException(&t2, &e2, &tb2);
        if (e2 != NULL && e2 != exc) {
            Py_INCREF(exc);
            PyException_SetContext(e2, exc); /* steals the reference */
        }
        PyErr_Restore(t2, e2, tb2);
    }
    Py_DECREF(exc);
    return out;
}

/* The contract's family guard on read shapes: attn_mask is None and ks == v.shape and qb == kb and qd == kd and
 * not qh % kh and qb and qsq and qd and ksk (the caller has checked q and k are 4-D and kh is not 0). */
static inline int
family_guard(const lz_meta *qm, const lz_meta *km, const lz_meta *vm)
{
    const int64_t *qs = qm->sizes, *ks = km->sizes, *vs = vm->sizes;
    int same_kv = vm->ndim == 4 && ks[0] == vs[0] && ks[1] == vs[1] && ks[2] == vs[2] && ks[3] == vs[3];
    return same_kv && qs[0] == ks[0] && qs[3] == ks[3] && qs[1] % ks[1] == 0 && qs[0] && qs[2] && qs[3] && ks[2];
}

/* q, k and v read from the C++ tensors, 4-D q and k (0: a tensor subclass, another layout or rank, a symbolic
 * size, kh == 0: the Python code reads those, and its reads raise or dispatch to __torch_function__). */
static int
read_qkv(AttentionHit *self, PyObject *q, PyObject *k, PyObject *v, lz_meta *qm, lz_meta *km, lz_meta *vm)
{
    return read_meta(self, q, qm) && read_meta(self, k, km) && read_meta(self, v, vm) && qm->ndim == 4 &&
           km->ndim == 4 && km->sizes[1] != 0 && qm->scalar_type >= 0 && qm->scalar_type < LZ_SCALAR_TYPES;
}

/* The plan ``plans`` holds for this call, as the contract's lookup finds it (new reference), or NULL: none, or
 * a call the compiled path leaves to Python (an error may be set). */
static PyObject *
find_plan(AttentionHit *self, PyObject *plans, PyObject *op, PyObject *q, PyObject *k, PyObject *v, PyObject *mask,
          PyObject *is_causal, PyObject *dropout_p, PyObject *window)
{
    lz_meta qm, km, vm;
    if (!(PyDict_CheckExact(plans) || Py_IS_TYPE(plans, ordered_dict)) || !read_qkv(self, q, k, v, &qm, &km, &vm))
        return NULL;
    PyObject *mask_key = NULL, *family = NULL, *key = NULL, *plan = NULL;
    PyObject *dtype = cached_attr(&self->dtypes[qm.scalar_type], q, s_dtype);
    PyObject *dev = dtype ? device_key(self, q, &qm) : NULL;
    if (dev == NULL)
        return NULL;
    if (mask == Py_None) {
        mask_key = Py_NewRef(Py_None);
    }
    else { /* (attn_mask.dtype, attn_mask.device) */
        PyObject *mdtype = PyObject_GetAttr(mask, s_dtype);
        PyObject *mdev = mdtype ? PyObject_GetAttr(mask, s_device) : NULL;
        mask_key = mdev ? PyTuple_Pack(2, mdtype, mdev) : NULL;
        Py_XDECREF(mdtype);
        Py_XDECREF(mdev);
        if (mask_key == NULL)
            return NULL;
    }
    family = PyTuple_Pack(7, op, dtype, dev, is_causal, dropout_p, window, mask_key);
    Py_DECREF(mask_key);
    if (family == NULL)
        return NULL;
    if (mask == Py_None && family_guard(&qm, &km, &vm))
        plan = PyDict_GetItemWithError(plans, family);
    if (plan == NULL && !PyErr_Occurred()) { /* the exact key: (family, q.shape, k.shape, v.shape, mask shape) */
        PyObject *qt = shape_tuple(&qm), *kt = qt ? shape_tuple(&km) : NULL, *vt = kt ? shape_tuple(&vm) : NULL;
        PyObject *mt = vt && mask != Py_None ? PyObject_GetAttr(mask, s_shape) : Py_NewRef(Py_None);
        key = vt && mt ? PyTuple_Pack(5, family, qt, kt, vt, mt) : NULL;
        Py_XDECREF(qt);
        Py_XDECREF(kt);
        Py_XDECREF(vt);
        Py_XDECREF(mt);
        plan = key ? PyDict_GetItemWithError(plans, key) : NULL;
    }
    Py_XINCREF(plan); /* borrowed from the dict: another thread may replace the entry while the kernel runs */
    Py_DECREF(family);
    Py_XDECREF(key);
    return plan;
}

/* attention(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, sinks, alibi_slopes,
 *           operation) -> the output, or MISS */
static PyObject *
serve(AttentionHit *self, PyObject *const *a)
{
    PyObject *q = a[0], *k = a[1], *v = a[2], *mask = a[3], *is_causal = a[4], *dropout_p = a[5], *scale = a[6];
    PyObject *layout = a[7], *window = a[8];
    /* What this path serves. The contract's guard holds by construction (a bool is_causal, an int or no
     * window, a finite scale); no variant, no operation name, the BHSD layout. */
    if (a[12] != Py_None || a[9] != Py_None || a[10] != Py_None || a[11] != Py_None || !PyBool_Check(is_causal))
        return Py_NewRef(self->miss);
    if (window != Py_None && !PyLong_CheckExact(window))
        return Py_NewRef(self->miss);
    if (scale != Py_None &&
        !(PyLong_CheckExact(scale) || (PyFloat_CheckExact(scale) && isfinite(PyFloat_AS_DOUBLE(scale)))))
        return Py_NewRef(self->miss);
    if (!PyFloat_CheckExact(dropout_p) && !PyLong_CheckExact(dropout_p))
        return Py_NewRef(self->miss);
    if (layout != s_bhsd && !(PyUnicode_CheckExact(layout) && PyUnicode_Compare(layout, s_bhsd) == 0))
        return miss(self);

    PyObject *scopes = PyObject_GetAttr(self->live, s_scopes);
    int scoped = scopes ? PyObject_IsTrue(scopes) : -1;
    Py_XDECREF(scopes);
    if (scoped != 0) /* a live policy scope (or an error): the Python entry finds the scope's plans */
        return miss(self);

    int served = 0;
    PyObject *out = NULL, *plan = NULL;
    PyObject *holder = PyObject_GetAttr(self->runtime, s_plans);
    PyObject *plans = holder ? PyObject_GetAttr(holder, s_data) : NULL;
    Py_XDECREF(holder);
    if (plans == NULL || (plan = find_plan(self, plans, is_causal == Py_True ? self->op_causal : self->op_full, q, k, v, mask,
                                          is_causal, dropout_p, window)) == NULL)
        goto cleanup;
    PyObject *gate = PyObject_GetAttr(plan, s_gate);
    PyObject *blocked = gate ? PyObject_GetAttr(gate, s_blocked) : NULL;
    int is_blocked = blocked ? PyObject_IsTrue(blocked) : -1;
    Py_XDECREF(gate);
    Py_XDECREF(blocked);
    if (is_blocked != 0) /* the slow runner (fallback, timing, verify mode): the Python entry calls plan.run */
        goto cleanup;
    /* plan.stats.calls += 1 */
    PyObject *stats = PyObject_GetAttr(plan, s_stats);
    PyObject *calls = stats ? PyObject_GetAttr(stats, s_calls) : NULL;
    PyObject *more = calls ? PyNumber_InPlaceAdd(calls, one) : NULL;
    int counted = more ? PyObject_SetAttr(stats, s_calls, more) : -1;
    Py_XDECREF(stats);
    Py_XDECREF(calls);
    Py_XDECREF(more);
    if (counted < 0)
        goto cleanup;
    served = 1;
    out = run_plan(self, plan, a, scale, window); /* the kernel's output, or what recover raised */

cleanup:
    Py_XDECREF(plans);
    Py_XDECREF(plan);
    return served ? out : miss(self);
}

static PyObject *
hit_vectorcall(PyObject *callable, PyObject *const *a, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 13 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "layerzero._accel.AttentionHit takes the 13 arguments of lz.attention");
        return NULL;
    }
    return serve((AttentionHit *)callable, a);
}

/* lz.attention's parameters after q, k, v (all keyword-only), in the order serve() reads them */
static PyObject *kw_names[10];
static const char *kw_text[10] = {"attn_mask", "is_causal", "dropout_p", "scale", "layout", "window", "softcap",
                                  "sinks", "alibi_slopes", "operation"};
static PyObject *zero_float;

/* The public lz.attention: its arguments bound as Python binds them, served here or by the Python entry. */
static PyObject *
entry_fastcall(PyObject *callable_self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    AttentionHit *self = (AttentionHit *)callable_self;
    PyObject *a[13] = {NULL, NULL, NULL, Py_None, Py_False, zero_float, Py_None, s_bhsd, Py_None, Py_None,
                       Py_None, Py_None, Py_None};
    int bound = nargs == 3;
    if (bound) {
        a[0] = args[0];
        a[1] = args[1];
        a[2] = args[2];
        Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
        for (Py_ssize_t i = 0; i < nkw && bound; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            int slot = -1;
            for (int j = 0; j < 10; j++)
                if (name == kw_names[j]) {
                    slot = j;
                    break;
                }
            for (int j = 0; j < 10 && slot < 0; j++)
                if (PyUnicode_Compare(name, kw_names[j]) == 0)
                    slot = j;
            bound = slot >= 0;
            if (bound)
                a[3 + slot] = args[nargs + i];
        }
        if (PyErr_Occurred())
            return NULL;
    }
    if (bound) { /* anything else (q, k, v by name, a wrong argument) is bound and reported by Python */
        PyObject *out = serve(self, a);
        if (out != self->miss)
            return out;
        Py_DECREF(out);
    }
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "layerzero._accel: the entry has no Python fallback");
        return NULL;
    }
    return PyObject_Vectorcall(self->fallback, args, nargs, kwnames);
}

/* AttentionHit.entry(fallback, doc, module) -> the public function (a builtin that calls fallback on a miss) */
static PyObject *
hit_entry(AttentionHit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "entry(fallback, doc, module)");
        return NULL;
    }
    if (self->fallback != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "entry() was already made for this AttentionHit");
        return NULL;
    }
    const char *doc = PyUnicode_AsUTF8(args[1]);
    if (doc == NULL)
        return NULL;
    self->fallback = Py_NewRef(args[0]);
    self->doc = Py_NewRef(args[1]);
    self->def.ml_name = "attention";
    self->def.ml_meth = (PyCFunction)(void (*)(void))entry_fastcall;
    self->def.ml_flags = METH_FASTCALL | METH_KEYWORDS;
    self->def.ml_doc = doc;
    self->module = Py_NewRef(args[2]);
    self->entry_fn = PyCFunction_NewEx(&self->def, (PyObject *)self, args[2]);
    return Py_XNewRef(self->entry_fn);
}

/* A pickle of lz.attention (a method of this object) names it: layerzero.accel.restore(module) finds this
 * object again as ``module.attention.__self__``, and pickle's getattr(that, "attention") the function. */
static PyObject *
hit_reduce(AttentionHit *self, PyObject *unused)
{
    if (self->module == NULL) {
        PyErr_SetString(PyExc_TypeError, "an AttentionHit without an entry cannot be pickled");
        return NULL;
    }
    PyObject *accel = PyImport_ImportModule("layerzero.accel");
    PyObject *restore = accel ? PyObject_GetAttrString(accel, "restore") : NULL;
    Py_XDECREF(accel);
    return restore ? Py_BuildValue("(N(O))", restore, self->module) : NULL;
}

static PyObject *
hit_get_attention(AttentionHit *self, void *closure)
{
    if (self->entry_fn == NULL) {
        PyErr_SetString(PyExc_AttributeError, "attention: entry() has not been made");
        return NULL;
    }
    return Py_NewRef(self->entry_fn);
}

static PyGetSetDef hit_getset[] = {
    {"attention", (getter)hit_get_attention, NULL, "the public function entry() made", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* find(plans, operation, q, k, v, is_causal, dropout_p, window) -> the plan the contract's lookup finds in
 * ``plans`` for this maskless call (gate not looked at), or None: none cached, or q, k, v are not plain tensors
 * (the caller then takes its Python path). */
static PyObject *
hit_find(AttentionHit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyUnicode_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "find(plans, operation, q, k, v, is_causal, dropout_p, window)");
        return NULL;
    }
    PyObject *plan = find_plan(self, args[0], args[1], args[2], args[3], args[4], Py_None, args[5], args[6], args[7]);
    if (plan != NULL)
        return plan;
    PyObject *none = miss(self); /* clears what a read raised (the slow path reads it again) */
    if (none == NULL)
        return NULL;
    Py_DECREF(none);
    Py_RETURN_NONE;
}

/* admits(q, k, v) -> the contract's shape guard for a call without a mask (False: it does not hold, or q, k, v
 * are not plain tensors; the caller then takes the validating path). */
static PyObject *
hit_admits(AttentionHit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "admits(q, k, v)");
        return NULL;
    }
    lz_meta qm, km, vm;
    return PyBool_FromLong(read_qkv(self, args[0], args[1], args[2], &qm, &km, &vm) && family_guard(&qm, &km, &vm));
}

static PyMethodDef hit_methods[] = {
    {"__reduce__", (PyCFunction)hit_reduce, METH_NOARGS, NULL},
    {"find", (PyCFunction)(void (*)(void))hit_find, METH_FASTCALL,
     "find(plans, operation, q, k, v, is_causal, dropout_p, window)\n--\n\nThe plan the attention contract's "
     "lookup finds in ``plans`` for this maskless call, or None."},
    {"admits", (PyCFunction)(void (*)(void))hit_admits, METH_FASTCALL,
     "admits(q, k, v)\n--\n\nThe attention contract's shape guard for a maskless call (False also for "
     "tensors only Python reads)."},
    {"entry", (PyCFunction)(void (*)(void))hit_entry, METH_FASTCALL,
     "entry(fallback, doc, module)\n--\n\nThe public lz.attention: a builtin function that serves the cached hit "
     "and calls ``fallback`` (the Python entry) with the same arguments for every other call."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
hit_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"runtime", "live", "op_full", "op_causal", "miss", "tensor_type", NULL};
    PyObject *runtime, *live, *op_full, *op_causal, *miss_obj, *tensor_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOUUOO!:AttentionHit", names, &runtime, &live, &op_full,
                                     &op_causal, &miss_obj, &PyType_Type, &tensor_type))
        return NULL;
    AttentionHit *self = (AttentionHit *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = hit_vectorcall;
    self->runtime = Py_NewRef(runtime);
    self->live = Py_NewRef(live);
    self->op_full = Py_NewRef(op_full);
    self->op_causal = Py_NewRef(op_causal);
    self->miss = Py_NewRef(miss_obj);
    self->tensor_type = (PyTypeObject *)Py_NewRef(tensor_type);
    return (PyObject *)self;
}

static int
hit_traverse(AttentionHit *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runtime);
    Py_VISIT(self->live);
    Py_VISIT(self->miss);
    Py_VISIT(self->fallback);
    Py_VISIT(self->entry_fn);
    return 0;
}

static int
hit_clear(AttentionHit *self)
{
    Py_CLEAR(self->runtime);
    Py_CLEAR(self->live);
    Py_CLEAR(self->op_full);
    Py_CLEAR(self->op_causal);
    Py_CLEAR(self->miss);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->doc);
    Py_CLEAR(self->entry_fn);
    Py_CLEAR(self->module);
    Py_CLEAR(self->tensor_type);
    for (int i = 0; i < LZ_SCALAR_TYPES; i++)
        Py_CLEAR(self->dtypes[i]);
    for (int i = 0; i < LZ_DEVICE_TYPES; i++)
        for (int j = 0; j < LZ_DEVICE_INDEXES; j++)
            Py_CLEAR(self->devices[i][j]);
    return 0;
}

static void
hit_dealloc(AttentionHit *self)
{
    PyObject_GC_UnTrack(self);
    hit_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AttentionHitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerzero._accel.AttentionHit",
    .tp_doc = PyDoc_STR("AttentionHit(runtime, live, op_full, op_causal, miss, tensor_type)\n--\n\n"
                        "lz.attention's cached hit, compiled: called with lz.attention's 13 arguments, returns the "
                        "output or ``miss``."),
    .tp_basicsize = sizeof(AttentionHit),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hit_new,
    .tp_dealloc = (destructor)hit_dealloc,
    .tp_traverse = (traverseproc)hit_traverse,
    .tp_clear = (inquiry)hit_clear,
    .tp_vectorcall_offset = offsetof(AttentionHit, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_methods = hit_methods,
    .tp_getset = hit_getset,
};

static struct PyModuleDef hotpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "layerzero._accel",
    .m_doc = "The compiled form of lz.attention's cached hit (see _accel.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_dtype, "dtype");
    INTERN(s_is_cpu, "is_cpu");
    INTERN(s_device, "device");
    INTERN(s_shape, "shape");
    INTERN(s_plans, "plans");
    INTERN(s_data, "data");
    INTERN(s_scopes, "scopes");
    INTERN(s_gate, "gate");
    INTERN(s_blocked, "blocked");
    INTERN(s_stats, "stats");
    INTERN(s_calls, "calls");
    INTERN(s_direct, "direct");
    INTERN(s_fn, "fn");
    INTERN(s_recover, "recover");
    INTERN(s_bhsd, "BHSD");
    for (int i = 0; i < 10; i++)
        INTERN(kw_names[i], kw_text[i]);
#undef INTERN
    if ((zero_float = PyFloat_FromDouble(0.0)) == NULL)
        return NULL;
    if ((one = PyLong_FromLong(1)) == NULL || PyType_Ready(&AttentionHitType) < 0)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    ordered_dict = (PyTypeObject *)PyObject_GetAttrString(collections, "OrderedDict");
    Py_DECREF(collections);
    if (ordered_dict == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&hotpath_module);
    if (m == NULL)
        return NULL;
#ifndef LZ_TORCH_VERSION
#define LZ_TORCH_VERSION "unknown"
#endif
    if (PyModule_AddStringConstant(m, "TORCH_VERSION", LZ_TORCH_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AttentionHitType);
    if (PyModule_AddObject(m, "AttentionHit", (PyObject *)&AttentionHitType) < 0) {
        Py_DECREF(&AttentionHitType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
