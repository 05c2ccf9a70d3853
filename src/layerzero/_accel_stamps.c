/* layerzero._accel.Stamps: the clock readings of a dispatch the compiled method served, compact.
 *
 * ``DispatchResult.stamps`` holds six readings ``(t0, ..., t5)``; on the cached hot path they are
 * ``(t0, t0, t2, t2, t4, t4)``, three clock reads. A tuple of them costs four allocations (three ints and the
 * tuple, which the garbage collector tracks) and as many frees, on every timed call; a Stamps holds the three
 * readings as C integers in one small untracked object, and reads as the tuple: len 6, indexing (negative and
 * slices too), iteration, ``==`` / ``hash`` / ``repr`` as the tuple's, and it pickles and copies as the tuple.
 * Its ints are made only when read (DispatchTiming reads them once, when ``result.timing`` is read). */
#include "_accel_dispatch.h"

typedef struct {
    PyObject_HEAD
    long long t[3]; /* t0 (entered), t2 (plan found), t4 (kernel returned) */
} Stamps;

static PyTypeObject StampsType;

PyObject *
lz_stamps_new(long long t0, long long t2, long long t4)
{
    Stamps *s = PyObject_New(Stamps, &StampsType);
    if (s != NULL) {
        s->t[0] = t0;
        s->t[1] = t2;
        s->t[2] = t4;
    }
    return (PyObject *)s;
}

/* The six readings as a plain tuple (new reference). */
static PyObject *
as_tuple(Stamps *s)
{
    PyObject *a = PyLong_FromLongLong(s->t[0]), *b = a ? PyLong_FromLongLong(s->t[1]) : NULL;
    PyObject *c = b ? PyLong_FromLongLong(s->t[2]) : NULL;
    PyObject *out = c ? PyTuple_Pack(6, a, a, b, b, c, c) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    return out;
}

static Py_ssize_t
stamps_length(Stamps *s)
{
    return 6;
}

static PyObject *
stamps_item(Stamps *s, Py_ssize_t i)
{
    if (i < 0 || i >= 6) {
        PyErr_SetString(PyExc_IndexError, "tuple index out of range");
        return NULL;
    }
    return PyLong_FromLongLong(s->t[i / 2]);
}

static PyObject *
stamps_subscript(Stamps *s, PyObject *index)
{
    if (PyIndex_Check(index)) {
        Py_ssize_t i = PyNumber_AsSsize_t(index, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        return stamps_item(s, i < 0 ? i + 6 : i);
    }
    PyObject *t = as_tuple(s), *out = t ? PyObject_GetItem(t, index) : NULL; /* a slice: the tuple's */
    Py_XDECREF(t);
    return out;
}

/* The tuple's answer, for the operations that read the whole sequence. */
static PyObject *
stamps_richcompare(PyObject *a, PyObject *b, int op)
{
    PyObject *ta = Py_IS_TYPE(a, &StampsType) ? as_tuple((Stamps *)a) : Py_NewRef(a);
    PyObject *tb = ta && Py_IS_TYPE(b, &StampsType) ? as_tuple((Stamps *)b) : Py_XNewRef(b);
    PyObject *out = ta && tb ? PyObject_RichCompare(ta, tb, op) : NULL;
    Py_XDECREF(ta);
    Py_XDECREF(tb);
    return out;
}

static Py_hash_t
stamps_hash(Stamps *s)
{
    PyObject *t = as_tuple(s);
    Py_hash_t h = t ? PyObject_Hash(t) : -1;
    Py_XDECREF(t);
    return h;
}

static PyObject *
stamps_repr(Stamps *s)
{
    PyObject *t = as_tuple(s), *out = t ? PyObject_Repr(t) : NULL;
    Py_XDECREF(t);
    return out;
}

/* pickle and copy make the plain tuple: ``(tuple, ((t0, ..., t5),))`` */
static PyObject *
stamps_reduce(Stamps *s, PyObject *unused)
{
    PyObject *t = as_tuple(s);
    return t ? Py_BuildValue("(O(N))", (PyObject *)&PyTuple_Type, t) : NULL;
}

static PySequenceMethods stamps_as_sequence = {
    .sq_length = (lenfunc)stamps_length,
    .sq_item = (ssizeargfunc)stamps_item,
};

static PyMappingMethods stamps_as_mapping = {
    .mp_length = (lenfunc)stamps_length,
    .mp_subscript = (binaryfunc)stamps_subscript,
};

static PyMethodDef stamps_methods[] = {
    {"__reduce__", (PyCFunction)stamps_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StampsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerzero._accel.Stamps",
    .tp_doc = PyDoc_STR("The six clock readings (t0, t0, t2, t2, t4, t4) of a dispatch the compiled hot path served; "
                        "reads, compares, hashes and pickles as that tuple."),
    .tp_basicsize = sizeof(Stamps),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_as_sequence = &stamps_as_sequence,
    .tp_as_mapping = &stamps_as_mapping,
    .tp_richcompare = stamps_richcompare,
    .tp_hash = (hashfunc)stamps_hash,
    .tp_repr = (reprfunc)stamps_repr,
    .tp_methods = stamps_methods,
};

int
lz_stamps_init(PyObject *module)
{
    if (PyType_Ready(&StampsType) < 0)
        return -1;
    Py_INCREF(&StampsType);
    if (PyModule_AddObject(module, "Stamps", (PyObject *)&StampsType) < 0) {
        Py_DECREF(&StampsType);
        return -1;
    }
    return 0;
}
