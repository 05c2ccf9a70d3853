/* layerzero._accel: the compiled form of the busiest lz.* calls' cached hit (attention, rms_norm, layer_norm).
 *
 * The call contracts (layerzero/ops/attention.py, norms.py) are the definition; this file serves their common
 * case without the interpreter: plain tensors, no live policy scope, a cached plan whose gate is open. It
 * binds the arguments as Python would, builds the same keys from sizes, dtype and device read off the C++
 * tensors (_accel_meta.cpp), runs the same shape guard, looks the plan up in the same dict, counts the call
 * and calls the kernel as the generated entry does (a kernel's exception goes to RT.recover). Every other
 * call goes, arguments unchanged, to the generated Python entry, so every rejection, every first call, every
 * fallback and every scope keeps its one home.
 *
 * Built by setup.py against the installed torch (optional). layerzero.accel loads it; tests/test_accel.py
 * checks it against the Python entries.
 */
#include <stddef.h>

#include "_accel.h"

lz_names LZ;

static PyObject *
hit_vectorcall(PyObject *callable, PyObject *const *a, size_t nargsf, PyObject *kwnames)
{
    Hit *self = (Hit *)callable;
    if (self->nparams == 0 || PyVectorcall_NARGS(nargsf) != self->nparams || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Hit is called with every parameter of its entry, positionally");
        return NULL;
    }
    return lz_serve(self, a);
}

/* Bind a call's arguments to the parameters as Python would (1), or leave it to Python (0): more positional
 * arguments than positional parameters, a name that is no parameter or given twice, a required one missing. */
static int
bind(Hit *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **a)
{
    if (nargs > self->npositional)
        return 0;
    for (Py_ssize_t i = 0; i < self->nparams; i++)
        a[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        Py_ssize_t slot = -1;
        for (Py_ssize_t j = 0; j < self->nparams && slot < 0; j++)
            if (name == self->params[j])
                slot = j;
        for (Py_ssize_t j = 0; j < self->nparams && slot < 0; j++)
            if (PyUnicode_Compare(name, self->params[j]) == 0)
                slot = j;
        if (slot < 0 || a[slot] != NULL)
            return 0;
        a[slot] = args[nargs + i];
    }
    for (Py_ssize_t i = 0; i < self->nparams; i++)
        if (a[i] == NULL && (a[i] = self->defaults[i]) == NULL)
            return 0;
    return 1;
}

/* The public function: its arguments bound, served here, or handed unchanged to the Python entry. */
static PyObject *
entry_fastcall(PyObject *callable_self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Hit *self = (Hit *)callable_self;
    PyObject *a[MAX_PARAMS];
    if (bind(self, args, nargs, kwnames, a)) {
        PyObject *out = lz_serve(self, a);
        if (out != self->miss)
            return out;
        Py_DECREF(out);
    }
    return PyObject_Vectorcall(self->fallback, args, nargs, kwnames);
}

/* Hit.entry(fallback, doc, module) -> the public function: a builtin named as ``fallback``, with its parameters
 * and defaults, that calls ``fallback`` with the same arguments for every call it does not serve. */
static PyObject *
hit_entry(Hit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[2]) || !PyFunction_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "entry(fallback: function, doc: str, module: str)");
        return NULL;
    }
    if (self->fallback != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "entry() was already made for this Hit");
        return NULL;
    }
    PyObject *fn = args[0];
    PyCodeObject *code = (PyCodeObject *)PyFunction_GET_CODE(fn);
    Py_ssize_t npos = code->co_argcount, n = npos + code->co_kwonlyargcount;
    PyObject *names = PyObject_GetAttrString((PyObject *)code, "co_varnames");
    PyObject *pos_defaults = PyFunction_GET_DEFAULTS(fn), *kw_defaults = PyFunction_GET_KW_DEFAULTS(fn);
    int expected = self->kind == KIND_ATTENTION ? 14 : self->kind == KIND_RMS_NORM ? 3 : 4;
    if (names == NULL || n != expected || (code->co_flags & (CO_VARARGS | CO_VARKEYWORDS))) {
        Py_XDECREF(names);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "entry(): %R does not take this Hit's %d parameters", fn, expected);
        return NULL;
    }
    Py_ssize_t ndef = pos_defaults ? PyTuple_GET_SIZE(pos_defaults) : 0;
    self->nparams = n; /* before the loop: hit_clear frees what it took if it stops part way */
    self->npositional = npos;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i), *dflt = NULL;
        if (i < npos && i >= npos - ndef)
            dflt = PyTuple_GET_ITEM(pos_defaults, i - (npos - ndef));
        else if (i >= npos && kw_defaults != NULL)
            dflt = PyDict_GetItemWithError(kw_defaults, name);
        if (dflt == NULL && PyErr_Occurred()) {
            Py_DECREF(names);
            return NULL;
        }
        self->params[i] = Py_NewRef(name);
        self->defaults[i] = Py_XNewRef(dflt);
    }
    Py_DECREF(names);
    PyObject *name = PyObject_GetAttrString(fn, "__name__");
    const char *doc = PyUnicode_AsUTF8(args[1]), *cname = name ? PyUnicode_AsUTF8(name) : NULL;
    if (doc == NULL || cname == NULL) {
        Py_XDECREF(name);
        return NULL;
    }
    self->fallback = Py_NewRef(fn);
    self->doc = Py_NewRef(args[1]);
    self->name = name;
    self->module = Py_NewRef(args[2]);
    self->def.ml_name = cname;
    self->def.ml_meth = (PyCFunction)(void (*)(void))entry_fastcall;
    self->def.ml_flags = METH_FASTCALL | METH_KEYWORDS;
    self->def.ml_doc = doc;
    self->entry_fn = PyCFunction_NewEx(&self->def, (PyObject *)self, args[2]);
    return Py_XNewRef(self->entry_fn);
}

/* A pickle of the public function (a method of this object) names it: layerzero.accel.restore(module, name)
 * finds this object again, and pickle's getattr(that, name) the function (hit_getattro). */
static PyObject *
hit_reduce(Hit *self, PyObject *unused)
{
    if (self->entry_fn == NULL) {
        PyErr_SetString(PyExc_TypeError, "a Hit without an entry cannot be pickled");
        return NULL;
    }
    PyObject *accel = PyImport_ImportModule("layerzero.accel");
    PyObject *restore = accel ? PyObject_GetAttrString(accel, "restore") : NULL;
    Py_XDECREF(accel);
    return restore ? Py_BuildValue("(N(OO))", restore, self->module, self->name) : NULL;
}

static PyObject *
hit_getattro(Hit *self, PyObject *name)
{
    if (self->entry_fn != NULL && PyUnicode_Check(name) && PyUnicode_Compare(name, self->name) == 0)
        return Py_NewRef(self->entry_fn);
    return PyObject_GenericGetAttr((PyObject *)self, name);
}

/* find(plans, operation, q, k, v, is_causal, dropout_p, window) -> the plan the attention contract's lookup
 * finds in ``plans`` for this maskless call (gate not looked at), or None: none cached, or q, k, v are not
 * plain tensors (the caller then takes its Python path). */
static PyObject *
hit_find(Hit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->kind != KIND_ATTENTION || nargs != 8 || !PyUnicode_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "find(plans, operation, q, k, v, is_causal, dropout_p, window) (attention)");
        return NULL;
    }
    PyObject *plans = args[0];
    PyObject *plan = PyDict_CheckExact(plans) || Py_IS_TYPE(plans, LZ.ordered_dict)
                         ? lz_find_plan(self, plans, args[1], args[2], args[3], args[4], Py_None, args[5], args[6], args[7])
                         : NULL;
    if (plan != NULL)
        return plan;
    PyObject *none = lz_miss(self); /* clears what a read raised (the slow path reads it again) */
    if (none == NULL)
        return NULL;
    Py_DECREF(none);
    Py_RETURN_NONE;
}

/* admits(q, k, v) -> the attention contract's shape guard for a call without a mask (False: it does not hold,
 * or q, k, v are not plain tensors; the caller then asks the contract's Python guard). */
static PyObject *
hit_admits(Hit *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->kind != KIND_ATTENTION || nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "admits(q, k, v) (attention)");
        return NULL;
    }
    return PyBool_FromLong(lz_admits(self, args[0], args[1], args[2]));
}

static PyMethodDef hit_methods[] = {
    {"__reduce__", (PyCFunction)hit_reduce, METH_NOARGS, NULL},
    {"entry", (PyCFunction)(void (*)(void))hit_entry, METH_FASTCALL,
     "entry(fallback, doc, module)\n--\n\nThe public function: a builtin that serves the cached hit and calls "
     "``fallback`` (the Python entry) with the same arguments for every other call."},
    {"find", (PyCFunction)(void (*)(void))hit_find, METH_FASTCALL,
     "find(plans, operation, q, k, v, is_causal, dropout_p, window)\n--\n\nThe plan the attention contract's "
     "lookup finds in ``plans`` for this maskless call, or None."},
    {"admits", (PyCFunction)(void (*)(void))hit_admits, METH_FASTCALL,
     "admits(q, k, v)\n--\n\nThe attention contract's shape guard for a maskless call (False also for "
     "tensors only Python reads)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
hit_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"kind", "runtime", "live", "op_a", "op_b", "miss", "tensor_type", "param_type", NULL};
    int kind;
    PyObject *runtime, *live, *op_a, *op_b, *miss_obj, *tensor_type, *param_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOUUOO!O!:Hit", names, &kind, &runtime, &live, &op_a, &op_b,
                                     &miss_obj, &PyType_Type, &tensor_type, &PyType_Type, &param_type))
        return NULL;
    if (kind < KIND_ATTENTION || kind > KIND_LAYER_NORM) {
        PyErr_Format(PyExc_ValueError, "Hit: no kind %d", kind);
        return NULL;
    }
    Hit *self = (Hit *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = hit_vectorcall;
    self->kind = kind;
    self->runtime = Py_NewRef(runtime);
    self->live = Py_NewRef(live);
    self->op_a = Py_NewRef(op_a);
    self->op_b = Py_NewRef(op_b);
    self->miss = Py_NewRef(miss_obj);
    self->tensor_type = (PyTypeObject *)Py_NewRef(tensor_type);
    self->param_type = (PyTypeObject *)Py_NewRef(param_type);
    return (PyObject *)self;
}

static int
hit_traverse(Hit *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runtime);
    Py_VISIT(self->live);
    Py_VISIT(self->miss);
    Py_VISIT(self->fallback);
    Py_VISIT(self->entry_fn);
    for (Py_ssize_t i = 0; i < self->nparams; i++)
        Py_VISIT(self->defaults[i]);
    return 0;
}

static int
hit_clear(Hit *self)
{
    Py_CLEAR(self->runtime);
    Py_CLEAR(self->live);
    Py_CLEAR(self->op_a);
    Py_CLEAR(self->op_b);
    Py_CLEAR(self->miss);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->entry_fn);
    for (Py_ssize_t i = 0; i < self->nparams; i++) {
        Py_CLEAR(self->params[i]);
        Py_CLEAR(self->defaults[i]);
    }
    return 0;
}

static void
hit_dealloc(Hit *self)
{
    PyObject_GC_UnTrack(self);
    hit_clear(self);
    Py_CLEAR(self->doc); /* after the function, whose ml_doc and ml_name point into these */
    Py_CLEAR(self->name);
    Py_CLEAR(self->module);
    Py_CLEAR(self->tensor_type);
    Py_CLEAR(self->param_type);
    for (int i = 0; i < N_SLOTS; i++)
        Py_CLEAR(self->slots[i].type);
    for (int i = 0; i < LZ_SCALAR_TYPES; i++)
        Py_CLEAR(self->dtypes[i]);
    for (int i = 0; i < LZ_DEVICE_TYPES; i++)
        for (int j = 0; j < LZ_DEVICE_INDEXES; j++)
            Py_CLEAR(self->devices[i][j]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject HitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerzero._accel.Hit",
    .tp_doc = PyDoc_STR("Hit(kind, runtime, live, op_a, op_b, miss, tensor_type, param_type)\n--\n\n"
                        "One lz.* function's cached hit, compiled (kind: ATTENTION, RMS_NORM, LAYER_NORM)."),
    .tp_basicsize = sizeof(Hit),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hit_new,
    .tp_dealloc = (destructor)hit_dealloc,
    .tp_traverse = (traverseproc)hit_traverse,
    .tp_clear = (inquiry)hit_clear,
    .tp_vectorcall_offset = offsetof(Hit, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = (getattrofunc)hit_getattro,
    .tp_methods = hit_methods,
};

PyTypeObject *
lz_hit_type(void)
{
    return &HitType;
}

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "layerzero._accel",
    .m_doc = "The compiled form of the busiest lz.* calls' cached hit (see _accel.c).",
    .m_size = -1,
};

#ifndef LZ_TORCH_VERSION
#define LZ_TORCH_VERSION "unknown"
#endif

PyMODINIT_FUNC
PyInit__accel(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(LZ.dtype, "dtype");
    INTERN(LZ.device, "device");
    INTERN(LZ.shape, "shape");
    INTERN(LZ.plans, "plans");
    INTERN(LZ.data, "data");
    INTERN(LZ.scopes, "scopes");
    INTERN(LZ.gate, "gate");
    INTERN(LZ.blocked, "blocked");
    INTERN(LZ.stats, "stats");
    INTERN(LZ.calls, "calls");
    INTERN(LZ.direct, "direct");
    INTERN(LZ.fn, "fn");
    INTERN(LZ.cnst, "const");
    INTERN(LZ.recover, "recover");
    INTERN(LZ.bhsd, "BHSD");
    INTERN(LZ.bshd, "BSHD");
    INTERN(LZ.transpose, "transpose");
#undef INTERN
    if ((LZ.one = PyLong_FromLong(1)) == NULL || (LZ.zero = PyLong_FromLong(0)) == NULL ||
        (LZ.two = PyLong_FromLong(2)) == NULL ||
        PyType_Ready(&HitType) < 0)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    LZ.ordered_dict = (PyTypeObject *)PyObject_GetAttrString(collections, "OrderedDict");
    Py_DECREF(collections);
    if (LZ.ordered_dict == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&HitType);
    if (PyModule_AddStringConstant(m, "TORCH_VERSION", LZ_TORCH_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "ATTENTION", KIND_ATTENTION) < 0 ||
        PyModule_AddIntConstant(m, "RMS_NORM", KIND_RMS_NORM) < 0 ||
        PyModule_AddIntConstant(m, "LAYER_NORM", KIND_LAYER_NORM) < 0 ||
        PyModule_AddObject(m, "Hit", (PyObject *)&HitType) < 0 || lz_method_init(m) < 0) {
        Py_DECREF(&HitType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
