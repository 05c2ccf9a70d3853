/* layerzero._accel: the dispatchers' cached hits, compiled (Dispatcher.dispatch and StaticDispatcher.dispatch;
 * layerzero/dispatch/dispatcher.py and static.py hold the definition).
 *
 * A Method is the compiled form of one of those methods; each dispatcher that can use it has it bound as its
 * ``dispatch`` attribute (Dispatcher._bind_compiled; the classes keep the Python methods, which torch.compile
 * traces, and a MethodType passes the dispatcher as its first argument). The calls it serves are the Python hot
 * path's: ``dispatch(operation, inputs, **options)`` (options keyed as the Python method keys them,
 * generic.kwargs_key; static's ``is_causal=`` alone by its own table) under the names the dispatcher learned for
 * the operation (an AttentionInputs entry: three plain tensors; an OpInputs entry: an operation with a call
 * contract, its arguments filled by name), the runtime unchanged since the dispatcher last synced, no open policy
 * scope and a plan found as the Python lines find it (_accel_lookup.c: the shared plan dict through the contract's
 * lookup, or the dispatcher's own cache), or (static) the contract's shape guard holding; the plan's gate open. It
 * reads the same attributes, counts the call, calls the kernel as the Python lines do, hands a kernel's exception
 * to the dispatcher's ``_hot_detour`` / ``_hot_op_detour`` and fills the DispatchResult's slots with the same
 * values and clock readings. Every other call goes, arguments unchanged, to the Python method.
 */
#include <stddef.h>

#include "_accel_dispatch.h"

static const char *const SLOT_NAMES[N_MSLOTS] = {
    "q_name", "k_name", "v_name", "is_causal", "dropout_p", "scale", "window", "bshd", "direct_ok", "names",
    "template", "size", "lookup", "keys", "admits", "hit", "version", "data", "ttl", "data", "ttl", "shards", "mask", "version", "version", "plans", "kernel_id", "context", "cmemo", "cmemo", "version", "runtime", "_version", "_timed", "_fast", "_cache", "_mode_value", "kernels", "output", "kernel_id",
    "operation", "fallback_used", "attempts", "stamps", "cached", "mode"};
PyObject *M_NAMES[N_MSLOTS];
PyObject *M_VERSION, *M_HOT, *M_HOT_CAUSAL, *M_TTL, *M_DETOUR, *M_OP_DETOUR, *M_SHARDS, *M_MASK, *M_CONTEXT;

/* time.perf_counter_ns() */
static inline long long
now_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return (long long)t;
#else
    return (long long)_PyTime_GetPerfCounter();
#endif
}

static void
call_clear(Call *c)
{
    Py_CLEAR(c->rt);
    Py_CLEAR(c->plan);
    Py_CLEAR(c->fast);
    Py_CLEAR(c->q);
    Py_CLEAR(c->k);
    Py_CLEAR(c->v);
    Py_CLEAR(c->kernel);
    for (int i = 0; i < 4; i++)
        Py_CLEAR(c->options[i]);
    for (Py_ssize_t i = 0; i < c->nargs; i++)
        Py_CLEAR(c->args[i]);
    Py_CLEAR(c->norm);
    Py_CLEAR(c->cnst);
}

/* ``rt.version == self._version`` (else the Python method syncs first); c->rt, c->timed. 1, or 0: not served. */
static int
read_synced(Method *m, Call *c)
{
    c->rt = dget(m, c, MSLOT_D_RUNTIME);
    PyObject *version = c->rt ? lz_slot_get(&m->slots[MSLOT_RT_VERSION], c->rt, M_VERSION) : NULL;
    PyObject *synced = version ? dget(m, c, MSLOT_D_VERSION) : NULL;
    PyObject *timed = synced ? dget(m, c, MSLOT_D_TIMED) : NULL;
    int same = timed ? PyObject_RichCompareBool(version, synced, Py_EQ) : 0;
    c->timed = same > 0 ? PyObject_IsTrue(timed) : -1;
    Py_XDECREF(version);
    Py_XDECREF(synced);
    Py_XDECREF(timed);
    return same > 0 && c->timed >= 0;
}

/* ``kwargs_key(operation, kwargs)`` (layerzero.dispatch.generic) of the call's keywords: (marker, operation,
 * then name, type and value of each); static moves ``is_causal`` last, as its Python method does. */
static PyObject *
options_key(Method *m, Call *c, PyObject *const *values, PyObject *kwnames)
{
    Py_ssize_t n = PyTuple_GET_SIZE(kwnames), at = 2, causal = -1;
    PyObject *key = PyTuple_New(2 + 3 * (n - (c->ctx_at >= 0)));
    if (key == NULL)
        return NULL;
    PyTuple_SET_ITEM(key, 0, Py_NewRef(m->options_marker));
    PyTuple_SET_ITEM(key, 1, Py_NewRef(c->operation));
    for (Py_ssize_t i = 0; i <= n; i++) {
        Py_ssize_t j = i < n ? i : causal;
        if (j < 0)
            break;
        if (j == c->ctx_at) /* context= is no option */
            continue;
        PyObject *name = PyTuple_GET_ITEM(kwnames, j);
        if (i < n && m->kind == METHOD_STATIC && PyUnicode_Compare(name, M_NAMES[MSLOT_CAUSAL]) == 0) {
            causal = i;
            continue;
        }
        PyTuple_SET_ITEM(key, at++, Py_NewRef(name));
        PyTuple_SET_ITEM(key, at++, Py_NewRef((PyObject *)Py_TYPE(values[j])));
        PyTuple_SET_ITEM(key, at++, Py_NewRef(values[j]));
    }
    return key;
}

/* c->fast (static: and c->plan) of the call's entry, as the Python method finds it: ``self._fast[key]``
 * (selection), ``self._hot[key]`` or ``self._hot_causal[operation, is_causal]`` (static), the key being the
 * operation, or options_key with keywords. 1, or 0: none. */
static int
find_entry(Method *m, Call *c, PyObject *const *values, PyObject *kwnames)
{
    int by_causal = m->kind == METHOD_STATIC && kwnames != NULL && PyTuple_GET_SIZE(kwnames) == 1 &&
                    PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), M_NAMES[MSLOT_CAUSAL]) == 0;
    if (by_causal && !PyBool_Check(values[0]))
        return 0;
    PyObject *table = m->kind == METHOD_SELECT ? dget(m, c, MSLOT_D_FAST)
                      : PyObject_GetAttr(c->self, by_causal ? M_HOT_CAUSAL : M_HOT);
    PyObject *key = by_causal ? PyTuple_Pack(2, c->operation, values[0])
                    : kwnames && PyTuple_GET_SIZE(kwnames) > (c->ctx_at >= 0) ? options_key(m, c, values, kwnames)
                                                                               : Py_NewRef(c->operation);
    PyObject *hot = table && key && PyDict_CheckExact(table) ? PyDict_GetItemWithError(table, key) : NULL;
    if (hot != NULL && m->kind == METHOD_SELECT && (Py_IS_TYPE(hot, m->inputs_type) || Py_IS_TYPE(hot, m->op_inputs_type))) {
        c->fast = Py_NewRef(hot);
        c->op = Py_IS_TYPE(hot, m->op_inputs_type);
    }
    else if (hot != NULL && m->kind == METHOD_STATIC && PyTuple_CheckExact(hot) && PyTuple_GET_SIZE(hot) == 2 &&
             Py_IS_TYPE(PyTuple_GET_ITEM(hot, 1), m->inputs_type)) { /* (plan, fast) */
        c->plan = Py_NewRef(PyTuple_GET_ITEM(hot, 0));
        c->fast = Py_NewRef(PyTuple_GET_ITEM(hot, 1));
    }
    Py_XDECREF(table);
    Py_XDECREF(key);
    return c->fast != NULL;
}

/* c->q, c->k, c->v = inputs[fast.q_name], ... (BHSD views for a BSHD entry). 1, or 0: not served. */
static int
read_tensors(Method *m, Call *c, PyObject *inputs)
{
    PyObject **dst[3] = {&c->q, &c->k, &c->v};
    for (int i = 0; i < 3; i++) {
        PyObject *name = fast_get(m, c, MSLOT_Q + i);
        PyObject *t = name ? PyDict_GetItemWithError(inputs, name) : NULL; /* borrowed */
        Py_XDECREF(name);
        if (t == NULL)
            return 0;
        *dst[i] = Py_NewRef(t);
    }
    PyObject *bshd = fast_get(m, c, MSLOT_BSHD);
    c->bshd = bshd == Py_True;
    Py_XDECREF(bshd);
    for (int i = 0; bshd != NULL && c->bshd && i < 3; i++) { /* as BHSD views, as the full path maps them */
        Py_SETREF(*dst[i], lz_transpose12(*dst[i]));
        if (*dst[i] == NULL)
            return 0;
    }
    return bshd != NULL;
}

/* c->kernel and c->options: ``plan.direct`` where selection may call it (``fast.direct_ok`` and a direct form:
 * ``plan.direct(q, k, v)``), else ``plan.fn`` (``plan.fn(q, k, v, None, is_causal, dropout_p, scale, window)``).
 * 1, or 0: not served. */
static int
read_kernel(Method *m, Call *c)
{
    if (c->op) { /* a norm's direct form, as lz.rms_norm calls it, else ``plan.fn(*args)`` as _hot_op does */
        PyObject *direct = c->norm ? lz_slot_get(&m->hit->slots[SLOT_DIRECT], c->plan, LZ.direct) : Py_NewRef(Py_None);
        if (direct != NULL && direct != Py_None) {
            c->cnst = lz_slot_get(&m->hit->slots[SLOT_CONST], c->plan, LZ.cnst);
            c->kernel = direct;
            c->direct = 1;
            return c->cnst != NULL;
        }
        Py_XDECREF(direct);
        c->kernel = direct ? lz_slot_get(&m->hit->slots[SLOT_FN], c->plan, LZ.fn) : NULL;
        return c->kernel != NULL;
    }
    for (int i = 0; i < 4; i++)
        if ((c->options[i] = fast_get(m, c, MSLOT_CAUSAL + i)) == NULL)
            return 0;
    if (m->kind == METHOD_SELECT) {
        PyObject *ok = fast_get(m, c, MSLOT_DIRECT_OK);
        if (ok == NULL)
            return 0;
        PyObject *direct = ok == Py_True ? lz_slot_get(&m->hit->slots[SLOT_DIRECT], c->plan, LZ.direct)
                                         : Py_NewRef(Py_None);
        Py_DECREF(ok);
        if (direct == NULL)
            return 0;
        if (direct != Py_None) {
            c->kernel = direct;
            c->direct = 1;
            return 1;
        }
        Py_DECREF(direct);
    }
    c->kernel = lz_slot_get(&m->hit->slots[SLOT_FN], c->plan, LZ.fn);
    return c->kernel != NULL;
}

/* The kernel's output (new reference; NULL with its exception set). */
static PyObject *
run_kernel(Call *c)
{
    if (c->op && c->direct) { /* direct(x, const, weight, [bias,] eps) */
        PyObject *a[5] = {c->args[0], c->cnst, c->args[1], c->args[2], NULL};
        a[c->nargs] = c->args[c->nargs - 1];
        return PyObject_Vectorcall(c->kernel, a, c->nargs + 1, NULL);
    }
    if (c->op)
        return PyObject_Vectorcall(c->kernel, c->args, c->nargs, NULL);
    PyObject *a[8] = {c->q, c->k, c->v, Py_None, c->options[0], c->options[1], c->options[2], c->options[3]};
    return PyObject_Vectorcall(c->kernel, a, c->direct ? 3 : 8, NULL);
}

/* ``except Exception as exc: return self._hot_detour(plan, fast, q, k, v, exc, operation, t0, t2)`` */
static PyObject *
detour(Method *m, Call *c)
{
    PyObject *exc = lz_fetch_exception(), *out = NULL;
    PyObject *t0 = PyLong_FromLongLong(c->t0), *t2 = t0 ? PyLong_FromLongLong(c->t2) : NULL;
    if (c->op && lz_slot_set(&m->slots[MSLOT_OP_CMEMO], c->fast, M_NAMES[MSLOT_OP_CMEMO], Py_None) < 0)
        PyErr_Clear(); /* the entry's exact-key memo goes: the next call reads the cache again */
    PyObject *args = t2 && c->op ? PyTuple_New(c->nargs) : NULL; /* _hot_op_detour(plan, args, exc, operation, t0, t2) */
    for (Py_ssize_t i = 0; args != NULL && i < c->nargs; i++)
        PyTuple_SET_ITEM(args, i, Py_NewRef(c->args[i]));
    if (args != NULL) {
        PyObject *a[7] = {c->self, c->plan, args, exc, c->operation, t0, t2};
        out = PyObject_VectorcallMethod(M_OP_DETOUR, a, 7, NULL);
    }
    else if (t2 != NULL && !c->op) {
        PyObject *a[10] = {c->self, c->plan, c->fast, c->q, c->k, c->v, exc, c->operation, t0, t2};
        out = PyObject_VectorcallMethod(M_DETOUR, a, 10, NULL);
    }
    Py_XDECREF(args);
    if (out == NULL)
        lz_chain(exc);
    Py_XDECREF(t0);
    Py_XDECREF(t2);
    Py_DECREF(exc);
    return out;
}

/* ``(t0, t0, t2, t2, t4, t4)`` (a Stamps: _accel_stamps.c), or NOT_TIMED (new reference): the hot path's key and
 * cache read are its lookup */
static PyObject *
stamps(Method *m, Call *c)
{
    return c->timed ? lz_stamps_new(c->t0, c->t2, now_ns()) : Py_NewRef(m->not_timed);
}

/* The DispatchResult of a served call (new reference; NULL with an error set), ``out`` taken. */
static PyObject *
make_result(Method *m, Call *c, PyObject *out)
{
    if (c->bshd) /* back to the caller's layout */
        Py_SETREF(out, lz_transpose12(out));
    PyObject *kernels = out ? lz_slot_get(&m->slots[MSLOT_KERNELS], c->plan, M_NAMES[MSLOT_KERNELS]) : NULL;
    PyObject *first = kernels ? PySequence_GetItem(kernels, 0) : NULL;
    PyObject *kernel_id = first ? lz_slot_get(&m->slots[MSLOT_KERNEL_ID_OF], first, M_NAMES[MSLOT_KERNEL_ID]) : NULL;
    PyObject *mode = kernel_id ? dget(m, c, MSLOT_D_MODE) : NULL;
    PyObject *times = mode ? stamps(m, c) : NULL;
    PyObject *r = times ? m->result_type->tp_alloc(m->result_type, 0) : NULL;
    PyObject *values[] = {out, kernel_id, c->operation, Py_False, LZ.one, times, Py_True, mode};
    for (int i = 0; r != NULL && i < N_MSLOTS - MSLOT_OUTPUT; i++)
        if (lz_slot_set(&m->slots[MSLOT_OUTPUT + i], r, M_NAMES[MSLOT_OUTPUT + i], values[i]) < 0)
            Py_CLEAR(r);
    Py_XDECREF(out);
    Py_XDECREF(kernels);
    Py_XDECREF(first);
    Py_XDECREF(kernel_id);
    Py_XDECREF(mode);
    Py_XDECREF(times);
    return r;
}

/* The call's DispatchResult (*served: NULL with an error set means raise), or *served 0: the Python method
 * serves it (an error a read raised is still set). */
static PyObject *
serve(Method *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int *served)
{
    PyObject *out = NULL, *r = NULL;
    *served = 0;
    if (nargs < 3 || nargs > 4 || !PyUnicode_CheckExact(args[1]) || !PyDict_CheckExact(args[2]))
        return NULL;
    Call c = {.self = args[0], .operation = args[1], .ctx = nargs == 4 ? args[3] : Py_None, .ctx_at = -1};
    for (Py_ssize_t i = 0; kwnames != NULL && i < PyTuple_GET_SIZE(kwnames); i++) { /* context=... */
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (name == M_CONTEXT || PyUnicode_Compare(name, M_CONTEXT) == 0)
            c.ctx_at = i;
    }
    if (c.ctx_at >= 0 && nargs == 4) /* given twice: Python's TypeError */
        return NULL;
    if (c.ctx_at >= 0)
        c.ctx = args[nargs + c.ctx_at];
    c.ctx = c.ctx == Py_None ? NULL : c.ctx;
    if (c.ctx != NULL && m->kind != METHOD_SELECT)
        return NULL;
    if (!read_synced(m, &c))
        goto done;
    c.t0 = c.timed ? now_ns() : 0;
    if (!find_entry(m, &c, args + nargs, kwnames))
        goto done;
    if (c.op ? !lz_read_op_args(m, &c, args[2]) || !lz_find_op_plan(m, &c)
             : PyDict_GET_SIZE(args[2]) != 3 || !read_tensors(m, &c, args[2]) ||
                   (m->kind == METHOD_SELECT ? !lz_find_selected(m, &c) : !lz_admits(m->hit, c.q, c.k, c.v)))
        goto done;
    c.t2 = c.timed ? now_ns() : 0;
    if (!read_kernel(m, &c) || lz_open_and_count(m->hit, c.plan) != 1) /* 0: the gate is blocked */
        goto done;
    *served = 1;
    out = run_kernel(&c);
    if (out != NULL)
        r = make_result(m, &c, out);
    else if (PyErr_ExceptionMatches(PyExc_Exception))
        r = detour(m, &c);
done:
    call_clear(&c);
    return r;
}

static PyObject *
method_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Method *m = (Method *)callable;
    int served;
    PyObject *r = serve(m, args, PyVectorcall_NARGS(nargsf), kwnames, &served);
    if (served)
        return r;
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like go on up */
        PyErr_Clear();   /* a read that raised: the Python method reads it again and reports it */
    }
    return PyObject_Vectorcall(m->fallback, args, nargsf, kwnames);
}

/* __doc__, __name__, __qualname__, __module__, __wrapped__, ...: the Python method's */
static PyObject *
method_getattro(Method *m, PyObject *name)
{
    PyObject *found = PyObject_GenericGetAttr((PyObject *)m, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return found;
    PyErr_Clear();
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "__wrapped__") == 0)
        return Py_NewRef(m->fallback);
    return PyObject_GetAttr(m->fallback, name);
}

static PyObject *
method_doc(Method *m, void *closure)
{
    return PyObject_GetAttrString(m->fallback, "__doc__");
}

static PyGetSetDef method_getset[] = {
    {"__doc__", (getter)method_doc, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *
method_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"kind", "hit", "fallback", "inputs_type", "op_inputs_type", "result_type", "not_timed",
                            "options_marker", "context_marker", "plan_cache_type", "mvcc_type", NULL};
    int kind;
    PyObject *hit, *fallback, *inputs_type, *op_inputs_type, *result_type, *not_timed, *marker, *cmarker, *plan_cache;
    PyObject *mvcc;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOO!O!O!OOOO!O!:Method", names, &kind, &hit, &fallback,
                                     &PyType_Type, &inputs_type, &PyType_Type, &op_inputs_type, &PyType_Type,
                                     &result_type, &not_timed, &marker, &cmarker, &PyType_Type, &plan_cache,
                                     &PyType_Type, &mvcc))
        return NULL;
    if ((kind != METHOD_SELECT && kind != METHOD_STATIC) || !PyCallable_Check(fallback) ||
        !PyObject_TypeCheck(hit, lz_hit_type()) || ((Hit *)hit)->kind != KIND_ATTENTION) {
        PyErr_SetString(PyExc_TypeError, "Method(kind: SELECT or STATIC, hit: the attention Hit, fallback, ...)");
        return NULL;
    }
    Method *m = (Method *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->vectorcall = method_vectorcall;
    m->kind = kind;
    m->hit = (Hit *)Py_NewRef(hit);
    m->fallback = Py_NewRef(fallback);
    m->inputs_type = (PyTypeObject *)Py_NewRef(inputs_type);
    m->op_inputs_type = (PyTypeObject *)Py_NewRef(op_inputs_type);
    m->result_type = (PyTypeObject *)Py_NewRef(result_type);
    m->plan_cache_type = (PyTypeObject *)Py_NewRef(plan_cache);
    m->mvcc_type = (PyTypeObject *)Py_NewRef(mvcc);
    m->not_timed = Py_NewRef(not_timed);
    m->options_marker = Py_NewRef(marker);
    m->context_marker = Py_NewRef(cmarker);
    return (PyObject *)m;
}

static int
method_traverse(Method *m, visitproc visit, void *arg)
{
    Py_VISIT(m->hit);
    Py_VISIT(m->fallback);
    Py_VISIT(m->inputs_type);
    Py_VISIT(m->op_inputs_type);
    Py_VISIT(m->result_type);
    Py_VISIT(m->plan_cache_type);
    Py_VISIT(m->mvcc_type);
    Py_VISIT(m->not_timed);
    Py_VISIT(m->options_marker);
    Py_VISIT(m->context_marker);
    for (int i = 0; i < N_MSLOTS; i++)
        Py_VISIT(m->slots[i].type);
    return 0;
}

static int
method_clear(Method *m)
{
    Py_CLEAR(m->hit);
    Py_CLEAR(m->fallback);
    Py_CLEAR(m->inputs_type);
    Py_CLEAR(m->op_inputs_type);
    Py_CLEAR(m->result_type);
    Py_CLEAR(m->plan_cache_type);
    Py_CLEAR(m->mvcc_type);
    Py_CLEAR(m->not_timed);
    Py_CLEAR(m->options_marker);
    Py_CLEAR(m->context_marker);
    for (int i = 0; i < N_MSLOTS; i++)
        Py_CLEAR(m->slots[i].type);
    return 0;
}

static void
method_dealloc(Method *m)
{
    PyObject_GC_UnTrack(m);
    method_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyTypeObject MethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerzero._accel.Method",
    .tp_doc = PyDoc_STR("Method(kind, hit, fallback, inputs_type, op_inputs_type, result_type, not_timed, "
                        "options_marker, context_marker, plan_cache_type, mvcc_type)\n--\n\n"
                        "A dispatcher's dispatch method with its cached hits compiled (kind: SELECT, STATIC)."),
    .tp_basicsize = sizeof(Method),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = method_new,
    .tp_dealloc = (destructor)method_dealloc,
    .tp_traverse = (traverseproc)method_traverse,
    .tp_clear = (inquiry)method_clear,
    .tp_vectorcall_offset = offsetof(Method, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = (getattrofunc)method_getattro,
    .tp_getset = method_getset,
};

int
lz_method_init(PyObject *module)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    for (int i = 0; i < N_MSLOTS; i++)
        INTERN(M_NAMES[i], SLOT_NAMES[i]);
    INTERN(M_VERSION, "version");
    INTERN(M_HOT, "_hot");
    INTERN(M_HOT_CAUSAL, "_hot_causal");
    INTERN(M_TTL, "ttl");
    INTERN(M_DETOUR, "_hot_detour");
    INTERN(M_OP_DETOUR, "_hot_op_detour");
    INTERN(M_SHARDS, "shards");
    INTERN(M_MASK, "mask");
    INTERN(M_CONTEXT, "context");
#undef INTERN
    if (PyType_Ready(&MethodType) < 0 || lz_stamps_init(module) < 0)
        return -1;
    Py_INCREF(&MethodType);
    if (PyModule_AddIntConstant(module, "SELECT", METHOD_SELECT) < 0 ||
        PyModule_AddIntConstant(module, "STATIC", METHOD_STATIC) < 0 ||
        PyModule_AddObject(module, "Method", (PyObject *)&MethodType) < 0) {
        Py_DECREF(&MethodType);
        return -1;
    }
    return 0;
}
