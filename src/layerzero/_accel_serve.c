/* layerzero._accel's cached hits: attention (lz.attention, and the dispatchers' lookup and shape guard) and
 * the norms (lz.rms_norm, lz.layer_norm). Each mirrors its call contract's generated Python entry (see
 * _accel.c); whatever it does not serve it answers with self->miss. */
#include <math.h>
#include <string.h>

#include "_accel.h"
#include <structmember.h>

/* Learn where ``name`` lives on obj's type: the offset of a __slots__ member, or -1. */
static void
learn_slot(lz_slot *slot, PyTypeObject *tp, PyObject *name)
{
    Py_XSETREF(slot->type, (PyTypeObject *)Py_NewRef(tp));
    slot->offset = -1;
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed; assigns the type a version tag where it can */
    slot->version = tp->tp_version_tag;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) && slot->version != 0) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY))
            slot->offset = member->offset;
    }
}

static inline PyObject **
slot_address(lz_slot *slot, PyObject *obj, PyObject *name)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp != slot->type || tp->tp_version_tag != slot->version || slot->version == 0)
        learn_slot(slot, tp, name);
    return slot->offset >= 0 ? (PyObject **)((char *)obj + slot->offset) : NULL;
}

PyObject *
lz_slot_get(lz_slot *slot, PyObject *obj, PyObject *name)
{
    PyObject **address = slot_address(slot, obj, name);
    if (address != NULL && *address != NULL)
        return Py_NewRef(*address);
    return PyObject_GetAttr(obj, name); /* not a slot, or unset: the ordinary lookup (and its AttributeError) */
}

int
lz_slot_set(lz_slot *slot, PyObject *obj, PyObject *name, PyObject *value)
{
    PyObject **address = slot_address(slot, obj, name);
    if (address == NULL)
        return PyObject_SetAttr(obj, name, value);
    Py_XSETREF(*address, Py_NewRef(value));
    return 0;
}

#define lz_get(self, which, obj, name) lz_slot_get(&(self)->slots[which], obj, name)
#define lz_set(self, which, obj, name, value) lz_slot_set(&(self)->slots[which], obj, name, value)

/* The metadata of a plain torch.Tensor (0: another type, not a plain strided tensor, or a scalar type beyond the
 * cached ones); ``or_param``: a torch.nn.Parameter too (its torch function is off: its reads are the tensor's). */
static inline int
read_meta(Hit *self, PyObject *t, lz_meta *m, int or_param)
{
    PyTypeObject *tp = Py_TYPE(t);
    return (tp == self->tensor_type || (or_param && tp == self->param_type)) && lz_tensor_meta(t, m) &&
           m->scalar_type >= 0 && m->scalar_type < LZ_SCALAR_TYPES;
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
device_key(Hit *self, PyObject *t, const lz_meta *m)
{
    if (m->is_cpu)
        return Py_True;
    if (m->device_type < 0 || m->device_type >= LZ_DEVICE_TYPES || m->device_index < -1 ||
        m->device_index + 1 >= LZ_DEVICE_INDEXES) {
        PyErr_SetString(PyExc_ValueError, "device outside the cached range");
        return NULL;
    }
    return cached_attr(&self->devices[m->device_type][m->device_index + 1], t, LZ.device);
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

PyObject *
lz_miss(Hit *self)
{
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like go on up */
        PyErr_Clear();   /* an attribute or a hash that raised: the Python entry reads it again and reports it */
    }
    return Py_NewRef(self->miss);
}

PyObject *
lz_transpose12(PyObject *x)
{
    PyObject *args[3] = {x, LZ.one, LZ.two};
    return PyObject_VectorcallMethod(LZ.transpose, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* callable(*args) as the generated entry calls the kernel; its exception goes to the failure contract:
 * ``except Exception as exc: out = RT.recover(plan, canon, 0, exc)``, canon being the kernel arguments. */
PyObject *
lz_fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException(); /* normalized, its traceback on it */
#else
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return exc;
#endif
}

void
lz_chain(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *raised = PyErr_GetRaisedException();
    if (raised != NULL && raised != exc)
        PyException_SetContext(raised, Py_NewRef(exc)); /* steals the reference */
    PyErr_SetRaisedException(raised);
#else
    PyObject *t2, *e2, *tb2;
    PyErr_Fetch(&t2, &e2, &tb2);
    PyErr_NormalizeException(&t2, &e2, &tb2);
    if (e2 != NULL && e2 != exc)
        PyException_SetContext(e2, Py_NewRef(exc)); /* steals the reference */
    PyErr_Restore(t2, e2, tb2);
#endif
}

static PyObject *
call_kernel(Hit *self, PyObject *plan, PyObject *callable, PyObject *const *args, Py_ssize_t n,
            PyObject *const *canon, Py_ssize_t ncanon)
{
    PyObject *out = PyObject_Vectorcall(callable, args, n, NULL);
    if (out != NULL || !PyErr_ExceptionMatches(PyExc_Exception))
        return out;
    PyObject *exc = lz_fetch_exception();
    PyObject *call_args = PyTuple_New(ncanon);
    for (Py_ssize_t i = 0; call_args != NULL && i < ncanon; i++)
        PyTuple_SET_ITEM(call_args, i, Py_NewRef(canon[i]));
    PyObject *recover = call_args ? PyObject_GetAttr(self->runtime, LZ.recover) : NULL;
    if (recover != NULL) {
        PyObject *rargs[4] = {plan, call_args, LZ.zero, exc};
        out = PyObject_Vectorcall(recover, rargs, 4, NULL);
        Py_DECREF(recover);
    }
    Py_XDECREF(call_args);
    if (out == NULL) /* what recover raised happened while handling exc, as in Python */
        lz_chain(exc);
    Py_DECREF(exc);
    return out;
}

/* RT.plans.data, the dict every entry reads (new reference; NULL: not a dict this path reads, or an error). */
static PyObject *
plan_dict(Hit *self)
{
    PyObject *holder = lz_get(self, SLOT_PLANS, self->runtime, LZ.plans);
    PyObject *plans = holder ? lz_get(self, SLOT_DATA, holder, LZ.data) : NULL;
    Py_XDECREF(holder);
    if (plans != NULL && !(PyDict_CheckExact(plans) || Py_IS_TYPE(plans, LZ.ordered_dict)))
        Py_CLEAR(plans);
    return plans;
}

int
lz_scoped(Hit *self)
{
    PyObject *scopes = lz_get(self, SLOT_SCOPES, self->live, LZ.scopes);
    int open = scopes ? PyObject_IsTrue(scopes) : -1;
    Py_XDECREF(scopes);
    return open;
}

int
lz_open_and_count(Hit *self, PyObject *plan)
{
    PyObject *gate = lz_get(self, SLOT_GATE, plan, LZ.gate);
    PyObject *blocked = gate ? lz_get(self, SLOT_BLOCKED, gate, LZ.blocked) : NULL;
    int is_blocked = blocked ? PyObject_IsTrue(blocked) : -1;
    Py_XDECREF(gate);
    Py_XDECREF(blocked);
    if (is_blocked != 0)
        return is_blocked > 0 ? 0 : -1;
    PyObject *stats = lz_get(self, SLOT_STATS, plan, LZ.stats);
    PyObject *calls = stats ? lz_get(self, SLOT_CALLS, stats, LZ.calls) : NULL;
    PyObject *more = calls ? PyNumber_InPlaceAdd(calls, LZ.one) : NULL;
    int counted = more ? lz_set(self, SLOT_CALLS, stats, LZ.calls, more) : -1;
    Py_XDECREF(stats);
    Py_XDECREF(calls);
    Py_XDECREF(more);
    return counted < 0 ? -1 : 1;
}

/* The contract's family guard on read shapes: attn_mask is None and ks == v.shape and qb == kb and qd == kd and
 * not qh % kh and qb and qh and qsq and qd and ksk (the caller has checked q and k are 4-D and kh is not 0). */
static inline int
family_guard(const lz_meta *qm, const lz_meta *km, const lz_meta *vm)
{
    const int64_t *qs = qm->sizes, *ks = km->sizes, *vs = vm->sizes;
    int same_kv = vm->ndim == 4 && ks[0] == vs[0] && ks[1] == vs[1] && ks[2] == vs[2] && ks[3] == vs[3];
    return same_kv && qs[0] == ks[0] && qs[3] == ks[3] && qs[1] % ks[1] == 0 && qs[0] && qs[1] && qs[2] && qs[3] &&
           ks[2];
}

/* q, k and v read from the C++ tensors, 4-D q and k (0: a tensor subclass, another layout or rank, a symbolic
 * size, kh == 0: the Python code reads those, and its reads raise or dispatch to __torch_function__). */
static int
read_qkv(Hit *self, PyObject *q, PyObject *k, PyObject *v, lz_meta *qm, lz_meta *km, lz_meta *vm)
{
    return read_meta(self, q, qm, 0) && read_meta(self, k, km, 0) && read_meta(self, v, vm, 0) && qm->ndim == 4 &&
           km->ndim == 4 && km->sizes[1] != 0;
}

/* The family key ``(op, q.dtype, q.is_cpu or q.device, is_causal, dropout_p, window, mask key)`` (new reference;
 * NULL with an error set). */
static PyObject *
attention_family(Hit *self, PyObject *op, PyObject *q, const lz_meta *qm, PyObject *mask, PyObject *is_causal,
                 PyObject *dropout_p, PyObject *window)
{
    PyObject *dtype = cached_attr(&self->dtypes[qm->scalar_type], q, LZ.dtype);
    PyObject *dev = dtype ? device_key(self, q, qm) : NULL;
    if (dev == NULL)
        return NULL;
    PyObject *mask_key = NULL;
    if (mask == Py_None) {
        mask_key = Py_NewRef(Py_None);
    }
    else { /* (attn_mask.dtype, attn_mask.device) */
        PyObject *mdtype = PyObject_GetAttr(mask, LZ.dtype);
        PyObject *mdev = mdtype ? PyObject_GetAttr(mask, LZ.device) : NULL;
        mask_key = mdev ? PyTuple_Pack(2, mdtype, mdev) : NULL;
        Py_XDECREF(mdtype);
        Py_XDECREF(mdev);
        if (mask_key == NULL)
            return NULL;
    }
    PyObject *family = PyTuple_Pack(7, op, dtype, dev, is_causal, dropout_p, window, mask_key);
    Py_DECREF(mask_key);
    return family;
}

/* The exact key ``(family, q.shape, k.shape, v.shape, mask shape)`` (new reference; NULL with an error set). */
static PyObject *
exact_key(PyObject *family, const lz_meta *qm, const lz_meta *km, const lz_meta *vm, PyObject *mask)
{
    PyObject *qt = shape_tuple(qm), *kt = qt ? shape_tuple(km) : NULL, *vt = kt ? shape_tuple(vm) : NULL;
    PyObject *mt = vt && mask != Py_None ? PyObject_GetAttr(mask, LZ.shape) : Py_NewRef(Py_None);
    PyObject *key = vt && mt ? PyTuple_Pack(5, family, qt, kt, vt, mt) : NULL;
    Py_XDECREF(qt);
    Py_XDECREF(kt);
    Py_XDECREF(vt);
    Py_XDECREF(mt);
    return key;
}

/* As a contract's lookup reads ``plans``: the shape-free plan under ``family`` (when its guard held:
 * ``use_family``), else the plan under the exact key ``exact(family, shapes)`` builds (new reference; NULL: none,
 * an error may be set). ``family`` is stolen. */
static PyObject *
family_then_exact(PyObject *plans, PyObject *family, int use_family,
                  PyObject *(*exact)(PyObject *, const void *), const void *shapes)
{
    PyObject *key = NULL, *plan = family && use_family ? PyDict_GetItemWithError(plans, family) : NULL;
    if (family != NULL && plan == NULL && !PyErr_Occurred()) {
        key = exact(family, shapes);
        plan = key ? PyDict_GetItemWithError(plans, key) : NULL;
    }
    Py_XINCREF(plan); /* borrowed from the dict: another thread may replace the entry while the kernel runs */
    Py_XDECREF(family);
    Py_XDECREF(key);
    return plan;
}

typedef struct {
    const lz_meta *q, *k, *v;
    PyObject *mask;
} qkv_shapes;

static PyObject *
attention_exact(PyObject *family, const void *shapes)
{
    const qkv_shapes *s = shapes;
    return exact_key(family, s->q, s->k, s->v, s->mask);
}

/* The plan ``plans`` (a dict or OrderedDict) holds for this call, as the contract's lookup finds it (new
 * reference), or NULL: none, or a call the compiled path leaves to Python (an error may be set). */
PyObject *
lz_find_plan(Hit *self, PyObject *plans, PyObject *op, PyObject *q, PyObject *k, PyObject *v, PyObject *mask,
          PyObject *is_causal, PyObject *dropout_p, PyObject *window)
{
    lz_meta qm, km, vm;
    if (!read_qkv(self, q, k, v, &qm, &km, &vm))
        return NULL;
    qkv_shapes shapes = {&qm, &km, &vm, mask};
    return family_then_exact(plans, attention_family(self, op, q, &qm, mask, is_causal, dropout_p, window),
                             mask == Py_None && family_guard(&qm, &km, &vm), attention_exact, &shapes);
}

int
lz_attention_sig(Hit *self, PyObject *q, PyObject *k, PyObject *v, int64_t sig[LZ_ATTENTION_SIG])
{
    lz_meta qm, km, vm;
    if (!read_qkv(self, q, k, v, &qm, &km, &vm) || !family_guard(&qm, &km, &vm))
        return 0;
    sig[0] = qm.scalar_type, sig[1] = qm.device_type, sig[2] = qm.device_index;
    for (int i = 0; i < 4; i++)
        sig[3 + i] = qm.sizes[i], sig[7 + i] = km.sizes[i], sig[11 + i] = vm.sizes[i];
    return 1;
}

PyObject *
lz_attention_key(Hit *self, PyObject *op, PyObject *q, PyObject *k, PyObject *v, PyObject *is_causal,
                 PyObject *dropout_p, PyObject *window)
{
    lz_meta qm, km, vm;
    if (!read_qkv(self, q, k, v, &qm, &km, &vm) || !family_guard(&qm, &km, &vm))
        return NULL;
    PyObject *family = attention_family(self, op, q, &qm, Py_None, is_causal, dropout_p, window);
    PyObject *key = family ? exact_key(family, &qm, &km, &vm, Py_None) : NULL;
    Py_XDECREF(family);
    return key;
}

/* The contract's guard on ``scale``: None, or an int or float a float holds finitely, > 0 with a causal mask or a
 * window (``-FLOAT_MAX <= scale <= FLOAT_MAX and (scale > 0 or not is_causal and window is None)``). */
static int
scale_served(PyObject *scale, PyObject *is_causal, PyObject *window)
{
    double s;
    if (scale == Py_None)
        return 1;
    if (PyFloat_CheckExact(scale))
        s = PyFloat_AS_DOUBLE(scale);
    else if (PyLong_CheckExact(scale)) {
        s = PyLong_AsDouble(scale);
        if (s == -1.0 && PyErr_Occurred()) { /* 10**400: float() overflows */
            PyErr_Clear();
            return 0;
        }
    }
    else
        return 0;
    return isfinite(s) && (s > 0 || (is_causal != Py_True && window == Py_None));
}

/* lz.attention(q, k, v, attn_mask, is_causal, dropout_p, scale, layout, window, softcap, sinks, alibi_slopes,
 *              operation, enable_gqa) -> the output, or MISS */
static PyObject *
serve_attention(Hit *self, PyObject *const *a)
{
    PyObject *q = a[0], *k = a[1], *v = a[2], *mask = a[3], *is_causal = a[4], *dropout_p = a[5], *scale = a[6];
    PyObject *layout = a[7], *window = a[8];
    /* What this path serves. The contract's guard holds by construction (a bool is_causal, an int or no
     * window, a finite scale); no variant, no operation name; the BHSD layout, or BSHD as BHSD views. */
    if (a[12] != Py_None || a[9] != Py_None || a[10] != Py_None || a[11] != Py_None || !PyBool_Check(is_causal))
        return Py_NewRef(self->miss);
    if (a[13] != Py_None && a[13] != Py_True) /* enable_gqa=False: the Python entry checks the heads */
        return Py_NewRef(self->miss);
    if (window != Py_None && !PyLong_CheckExact(window))
        return Py_NewRef(self->miss);
    if (!scale_served(scale, is_causal, window))
        return Py_NewRef(self->miss);
    if (!PyFloat_CheckExact(dropout_p) && !PyLong_CheckExact(dropout_p))
        return Py_NewRef(self->miss);
    int bshd = layout != LZ.bhsd && !(PyUnicode_CheckExact(layout) && PyUnicode_Compare(layout, LZ.bhsd) == 0);
    if (bshd && !(layout == LZ.bshd || (PyUnicode_CheckExact(layout) && PyUnicode_Compare(layout, LZ.bshd) == 0)))
        return lz_miss(self);
    if (lz_scoped(self) != 0)
        return lz_miss(self);
    PyObject *out = NULL, *plan = NULL, *plans = NULL, *views[3] = {NULL, NULL, NULL};
    int runs = 0;
    if (bshd) { /* q, k, v = q.transpose(1, 2), ... as the entry's prologue; the output goes back the same way */
        for (int i = 0; i < 3; i++)
            if ((views[i] = lz_transpose12(a[i])) == NULL)
                goto done;
        q = views[0], k = views[1], v = views[2];
    }
    if ((plans = plan_dict(self)) != NULL &&
        (plan = lz_find_plan(self, plans, is_causal == Py_True ? self->op_b : self->op_a, q, k, v, mask, is_causal,
                             dropout_p, window)) != NULL)
        runs = lz_open_and_count(self, plan);
    if (runs == 1) {
        PyObject *direct = lz_get(self, SLOT_DIRECT, plan, LZ.direct);
        /* plan.direct(q, k, v) if plan.direct is not None and scale is None else plan.fn(q, k, v, attn_mask,
         * is_causal, dropout_p, scale, window) */
        PyObject *fn = direct == NULL ? NULL
                       : direct != Py_None && scale == Py_None ? Py_NewRef(direct) : lz_get(self, SLOT_FN, plan, LZ.fn);
        PyObject *canon[8] = {q, k, v, mask, is_causal, dropout_p, scale, window}; /* the kernel arguments */
        if (fn != NULL)
            out = call_kernel(self, plan, fn, canon, fn == direct ? 3 : 8, canon, 8);
        Py_XDECREF(fn);
        Py_XDECREF(direct);
        if (bshd && out != NULL)
            Py_SETREF(out, lz_transpose12(out));
    }
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(views[i]);
    Py_XDECREF(plans);
    Py_XDECREF(plan);
    return runs == 1 ? out : lz_miss(self);
}

/* The family key of lz.rms_norm's (lz.layer_norm's) call a = (x, weight, [bias,] eps): (operation, x.dtype,
 * x.is_cpu or x.device, weight dtype or None[, bias dtype or None], eps), its guard ``eps.__class__ is not bool``
 * holding (new reference), or NULL: a call the compiled path leaves to Python (an error may be set). */
static PyObject *
norm_family(Hit *self, PyObject *const *a, lz_meta *xm)
{
    int with_bias = self->kind == KIND_LAYER_NORM;
    Py_ssize_t n = with_bias ? 4 : 3;
    PyObject *x = a[0], *eps = a[n - 1];
    if (!PyFloat_CheckExact(eps) && !PyLong_CheckExact(eps))
        return NULL;
    lz_meta wm;
    PyObject *dtypes[2] = {Py_None, Py_None}; /* weight's and bias's */
    if (!read_meta(self, x, xm, 0))
        return NULL;
    for (int i = 0; i < n - 2; i++) { /* weight (and bias): a module's parameters */
        PyObject *t = a[1 + i];
        if (t == Py_None)
            continue;
        if (!read_meta(self, t, &wm, 1) ||
            (dtypes[i] = cached_attr(&self->dtypes[wm.scalar_type], t, LZ.dtype)) == NULL)
            return NULL;
    }
    PyObject *dtype = cached_attr(&self->dtypes[xm->scalar_type], x, LZ.dtype);
    PyObject *dev = dtype ? device_key(self, x, xm) : NULL;
    if (dev == NULL)
        return NULL;
    return with_bias ? PyTuple_Pack(6, self->op_a, dtype, dev, dtypes[0], dtypes[1], eps)
                     : PyTuple_Pack(5, self->op_a, dtype, dev, dtypes[0], eps);
}

/* (family, x.shape) (new reference; NULL with an error set) */
static PyObject *
norm_exact(PyObject *family, const void *xm)
{
    PyObject *shape = shape_tuple(xm);
    PyObject *key = shape ? PyTuple_Pack(2, family, shape) : NULL;
    Py_XDECREF(shape);
    return key;
}

PyObject *
lz_find_norm_plan(Hit *self, PyObject *plans, PyObject *const *a)
{
    lz_meta xm;
    PyObject *family = norm_family(self, a, &xm);
    return family_then_exact(plans, family, 1, norm_exact, &xm);
}

int
lz_norm_sig(Hit *self, PyObject *const *a, int64_t sig[LZ_NORM_SIG])
{
    int with_bias = self->kind == KIND_LAYER_NORM;
    Py_ssize_t n = with_bias ? 4 : 3;
    PyObject *eps = a[n - 1];
    lz_meta xm, wm;
    if ((!PyFloat_CheckExact(eps) && !PyLong_CheckExact(eps)) || !read_meta(self, a[0], &xm, 0))
        return 0;
    memset(sig, 0, LZ_NORM_SIG * sizeof(int64_t));
    sig[0] = xm.scalar_type, sig[1] = xm.device_type, sig[2] = xm.device_index, sig[3] = xm.ndim;
    for (int i = 0; i < xm.ndim; i++)
        sig[4 + i] = xm.sizes[i];
    for (int i = 0; i < n - 2; i++) { /* weight's (and bias's) dtype, or -1 for None */
        if (a[1 + i] == Py_None)
            sig[12 + i] = -1;
        else if (read_meta(self, a[1 + i], &wm, 1))
            sig[12 + i] = wm.scalar_type;
        else
            return 0;
    }
    if (PyFloat_CheckExact(eps)) { /* eps, by type and bits */
        double d = PyFloat_AS_DOUBLE(eps);
        sig[14] = 1;
        memcpy(&sig[15], &d, sizeof d);
    }
    else {
        int overflow = 0;
        sig[14] = 2;
        sig[15] = PyLong_AsLongLongAndOverflow(eps, &overflow);
        if (overflow || (sig[15] == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

PyObject *
lz_norm_key(Hit *self, PyObject *const *a)
{
    lz_meta xm;
    PyObject *family = norm_family(self, a, &xm);
    PyObject *key = family ? norm_exact(family, &xm) : NULL;
    Py_XDECREF(family);
    return key;
}

/* lz.rms_norm(x, weight, eps) / lz.layer_norm(x, weight, bias, eps) -> the output, or MISS. */
static PyObject *
serve_norm(Hit *self, PyObject *const *a)
{
    Py_ssize_t n = self->kind == KIND_LAYER_NORM ? 4 : 3;
    PyObject *plans = NULL, *plan = NULL, *out = NULL;
    int runs = 0;
    if (lz_scoped(self) == 0 && (plans = plan_dict(self)) != NULL && (plan = lz_find_norm_plan(self, plans, a)) != NULL)
        runs = lz_open_and_count(self, plan);
    if (runs == 1) {
        /* plan.direct(x, plan.const, weight, [bias,] eps) if plan.direct is not None else plan.fn(x, weight,
         * [bias,] eps) */
        PyObject *direct = lz_get(self, SLOT_DIRECT, plan, LZ.direct);
        if (direct != NULL && direct != Py_None) {
            PyObject *cnst = lz_get(self, SLOT_CONST, plan, LZ.cnst);
            if (cnst != NULL) {
                PyObject *args[5] = {a[0], cnst, a[1], a[2], NULL}; /* x, const, weight, [bias,] eps */
                args[n] = a[n - 1];
                out = call_kernel(self, plan, direct, args, n + 1, a, n);
                Py_DECREF(cnst);
            }
        }
        else if (direct != NULL) {
            PyObject *fn = lz_get(self, SLOT_FN, plan, LZ.fn);
            out = fn ? call_kernel(self, plan, fn, a, n, a, n) : NULL;
            Py_XDECREF(fn);
        }
        Py_XDECREF(direct);
    }
    Py_XDECREF(plans);
    Py_XDECREF(plan);
    return runs == 1 ? out : lz_miss(self);
}

PyObject *
lz_serve(Hit *self, PyObject *const *a)
{
    return self->kind == KIND_ATTENTION ? serve_attention(self, a) : serve_norm(self, a);
}

int
lz_admits(Hit *self, PyObject *q, PyObject *k, PyObject *v)
{
    lz_meta qm, km, vm;
    return read_qkv(self, q, k, v, &qm, &km, &vm) && family_guard(&qm, &km, &vm);
}
