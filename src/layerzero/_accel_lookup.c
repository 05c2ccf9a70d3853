/* layerzero._accel: where a dispatcher's served call finds its plan (the compiled form of the lookups in
 * Dispatcher.dispatch, _hot_plan and _hot_op; layerzero/dispatch/dispatcher.py holds the definition): the runtime's
 * plan dict through the operation's contract lookup, or the dispatcher's own PlanCache or MVCCPlanCache under the
 * call's exact key, read as ``cache.peek(key)`` reads it, through the entry's memo of the exact-key plan it found
 * last. */
#include <string.h>

#include "_accel_dispatch.h"

/* The plan an own cache (a PlanCache or MVCCPlanCache without a TTL) holds under ``key``, as ``cache.peek(key)``
 * reads it (its LRU place left as it is; new reference), or NULL: none, or another cache (an error may be set). */
static PyObject *
own_get(Method *m, PyObject *cache, PyObject *key)
{
    int mvcc = Py_IS_TYPE(cache, m->mvcc_type);
    if (key == NULL || !(mvcc || Py_IS_TYPE(cache, m->plan_cache_type)))
        return NULL;
    int at = mvcc ? MSLOT_MVCC_TTL : MSLOT_CACHE_TTL;
    PyObject *ttl = lz_slot_get(&m->slots[at], cache, M_TTL), *data = NULL, *plan = NULL;
    if (ttl == Py_None && !mvcc) {
        data = lz_slot_get(&m->slots[MSLOT_CACHE_DATA], cache, LZ.data);
    }
    else if (ttl == Py_None) { /* shards[hash(key) & mask], if its version is the cache's */
        PyObject *shards = lz_slot_get(&m->slots[MSLOT_MVCC_SHARDS], cache, M_SHARDS);
        PyObject *mask = shards ? lz_slot_get(&m->slots[MSLOT_MVCC_MASK], cache, M_MASK) : NULL;
        PyObject *version = mask ? lz_slot_get(&m->slots[MSLOT_MVCC_VERSION], cache, M_VERSION) : NULL;
        Py_hash_t h = version ? PyObject_Hash(key) : -1;
        Py_ssize_t bits = h != -1 && PyLong_CheckExact(mask) ? PyLong_AsSsize_t(mask) : -1;
        if (bits >= 0 && PyList_CheckExact(shards) && (h & bits) < PyList_GET_SIZE(shards)) {
            PyObject *shard = PyList_GET_ITEM(shards, h & bits);
            PyObject *shard_version = lz_slot_get(&m->slots[MSLOT_SHARD_VERSION], shard, M_VERSION);
            int current = shard_version ? PyObject_RichCompareBool(shard_version, version, Py_EQ) : -1;
            Py_XDECREF(shard_version);
            if (current == 1)
                data = lz_slot_get(&m->slots[MSLOT_SHARD_DATA], shard, LZ.data);
        }
        Py_XDECREF(shards);
        Py_XDECREF(mask);
        Py_XDECREF(version);
    }
    Py_XDECREF(ttl);
    if (data != NULL && PyDict_Check(data))
        plan = Py_XNewRef(PyDict_GetItemWithError(data, key));
    Py_XDECREF(data);
    return plan;
}

/* The runtime's plan dict, as the hot path reads it: ``rt.plans.data`` when its cache has no TTL (new
 * reference; NULL: not read here). */
static PyObject *
shared_plans(Method *m, Call *c)
{
    PyObject *plans = lz_slot_get(&m->slots[MSLOT_RT_PLANS], c->rt, LZ.plans);
    PyObject *ttl = plans ? lz_slot_get(&m->slots[MSLOT_CACHE_TTL], plans, M_TTL) : NULL;
    PyObject *data = ttl == Py_None ? lz_slot_get(&m->slots[MSLOT_CACHE_DATA], plans, LZ.data) : NULL;
    Py_XDECREF(plans);
    Py_XDECREF(ttl);
    if (data != NULL && !(PyDict_CheckExact(data) || Py_IS_TYPE(data, LZ.ordered_dict)))
        Py_CLEAR(data);
    return data;
}

/* A given context's key for the call's exact ``key`` (stolen): ``(operation, CONTEXT_MARKER, id(context), key)``
 * as Dispatcher._dispatch stores it; ``key`` itself without a context (new reference; NULL with an error set). */
static PyObject *
context_key(Method *m, Call *c, PyObject *key)
{
    if (key == NULL || c->ctx == NULL)
        return key;
    PyObject *id = PyLong_FromVoidPtr(c->ctx);
    PyObject *out = id ? PyTuple_Pack(4, c->operation, m->context_marker, id, key) : NULL;
    Py_XDECREF(id);
    Py_DECREF(key);
    return out;
}

/* The plan ``key`` names in this dispatcher's own cache (``peek``) or the runtime's plan dict, kept only when it
 * was made for the given context (``plan.context is context``); 1, or 0: none. ``key`` is stolen. */
static int
exact_plan(Method *m, Call *c, PyObject *cache, PyObject *key)
{
    key = context_key(m, c, key);
    PyObject *data = key != NULL && cache == Py_None ? shared_plans(m, c) : NULL;
    c->plan = cache != Py_None ? own_get(m, cache, key) : data ? Py_XNewRef(PyDict_GetItemWithError(data, key)) : NULL;
    Py_XDECREF(data);
    Py_XDECREF(key);
    if (c->plan != NULL && c->ctx != NULL) {
        PyObject *made_for = lz_slot_get(&m->slots[MSLOT_PLAN_CONTEXT], c->plan, M_CONTEXT);
        if (made_for != c->ctx)
            Py_CLEAR(c->plan);
        Py_XDECREF(made_for);
    }
    return c->plan != NULL;
}

/* One remembered exact-key plan, ``(store, version, context, operation, signature, plan)``: whether it stands for
 * this call's cache read. */
static int
memo_stands(Call *c, PyObject *entry, PyObject *store, PyObject *version, const int64_t *sig, Py_ssize_t n)
{
    return PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 6 && PyTuple_GET_ITEM(entry, 0) == store &&
           PyTuple_GET_ITEM(entry, 2) == (c->ctx ? c->ctx : Py_None) && PyTuple_GET_ITEM(entry, 3) == c->operation &&
           PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 4)) &&
           PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 4)) == n * (Py_ssize_t)sizeof(int64_t) &&
           memcmp(PyBytes_AS_STRING(PyTuple_GET_ITEM(entry, 4)), sig, n * sizeof(int64_t)) == 0 &&
           PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 1), version, Py_EQ) == 1;
}

/* The entry's memo (``fast.cmemo``) of the exact-key plans it found last: a tuple of up to MEMO_WAYS entries
 * ``(store, version, context, operation, signature, plan)``, the latest first (two: a server alternating prefill
 * and decode shapes, or two contexts, on one entry keeps both). An entry stands for the cache read while the store
 * (this dispatcher's own cache, or the runtime's) is the same object at the same version (every invalidation moves
 * it; a config change replaces it), has no TTL, and the call has the same context, operation and key signature
 * (what the exact key carries besides the entry's constants). A plan evicted meanwhile still serves (it is this
 * key's plan for that version); a kernel's exception drops the memo (``_hot_detour`` for attention, the op detour
 * in _accel_dispatch.c). 1: c->plan set from it; 0: not. */
#define MEMO_WAYS 2
static int
memo_plan(Method *m, Call *c, int slot, PyObject *store, PyObject *version, const int64_t *sig, Py_ssize_t n)
{
    PyObject *memo = fast_get(m, c, slot);
    int hit = 0;
    for (Py_ssize_t i = 0; memo != NULL && PyTuple_CheckExact(memo) && i < PyTuple_GET_SIZE(memo) && !hit; i++) {
        PyObject *entry = PyTuple_GET_ITEM(memo, i);
        if ((hit = memo_stands(c, entry, store, version, sig, n)))
            c->plan = Py_NewRef(PyTuple_GET_ITEM(entry, 5));
    }
    Py_XDECREF(memo);
    return hit;
}

/* The store an exact-key plan comes from (this dispatcher's own cache, or the runtime's) and its version, when
 * the memo may stand for it (a PlanCache or MVCCPlanCache without a TTL); 0 otherwise (new references). */
static int
memo_store(Method *m, Call *c, PyObject *cache, PyObject **store, PyObject **version)
{
    int own = cache != Py_None, mvcc = own && Py_IS_TYPE(cache, m->mvcc_type);
    *store = own ? Py_NewRef(cache) : lz_slot_get(&m->slots[MSLOT_RT_PLANS], c->rt, LZ.plans);
    int known = *store && (mvcc || Py_IS_TYPE(*store, m->plan_cache_type));
    PyObject *ttl = known ? lz_slot_get(&m->slots[mvcc ? MSLOT_MVCC_TTL : MSLOT_CACHE_TTL], *store, M_TTL) : NULL;
    *version = ttl == Py_None ? lz_slot_get(&m->slots[mvcc ? MSLOT_MVCC_VERSION : MSLOT_CACHE_VERSION], *store,
                                            M_VERSION) : NULL;
    Py_XDECREF(ttl);
    return *version != NULL;
}

/* Remember c->plan first in the entry's memo (``slot``) for this store, version, context, operation and
 * signature; the latest earlier entries stay behind it, up to MEMO_WAYS. */
static void
remember(Method *m, Call *c, int slot, PyObject *store, PyObject *version, const int64_t *sig, Py_ssize_t n)
{
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)sig, n * (Py_ssize_t)sizeof(int64_t));
    PyObject *entry = bytes ? PyTuple_Pack(6, store, version, c->ctx ? c->ctx : Py_None, c->operation, bytes,
                                           c->plan) : NULL;
    PyObject *old = entry ? fast_get(m, c, slot) : NULL;
    if (old == NULL)
        PyErr_Clear();
    Py_ssize_t kept = old != NULL && PyTuple_CheckExact(old) ? PyTuple_GET_SIZE(old) : 0;
    kept = kept < MEMO_WAYS - 1 ? kept : MEMO_WAYS - 1;
    PyObject *memo = entry ? PyTuple_New(1 + kept) : NULL;
    if (memo != NULL) {
        PyTuple_SET_ITEM(memo, 0, Py_NewRef(entry));
        for (Py_ssize_t i = 0; i < kept; i++)
            PyTuple_SET_ITEM(memo, 1 + i, Py_NewRef(PyTuple_GET_ITEM(old, i)));
    }
    if (memo == NULL || lz_slot_set(&m->slots[slot], c->fast, M_NAMES[slot], memo) < 0)
        PyErr_Clear(); /* no memo: the next call reads the cache */
    Py_XDECREF(bytes);
    Py_XDECREF(entry);
    Py_XDECREF(old);
    Py_XDECREF(memo);
}

/* The exact-key plan of an attention call (an own cache, or a given context), through the entry's memo: the key
 * is built only when the memo does not stand. */
static void
exact_attention_plan(Method *m, Call *c, PyObject *cache, PyObject *causal, PyObject *dropout, PyObject *window)
{
    int64_t sig[LZ_ATTENTION_SIG];
    PyObject *store = NULL, *version = NULL;
    int usable = lz_attention_sig(m->hit, c->q, c->k, c->v, sig) && memo_store(m, c, cache, &store, &version);
    if (usable && memo_plan(m, c, MSLOT_CMEMO, store, version, sig, LZ_ATTENTION_SIG)) {
        /* remembered */
    }
    else if (!PyErr_Occurred() &&
             exact_plan(m, c, cache,
                        lz_attention_key(m->hit, c->operation, c->q, c->k, c->v, causal, dropout, window)) &&
             usable) {
        remember(m, c, MSLOT_CMEMO, store, version, sig, LZ_ATTENTION_SIG);
    }
    Py_XDECREF(store);
    Py_XDECREF(version);
}

/* The same for a norm (an OpInputs entry with a norm's compiled hit). */
static void
exact_norm_plan(Method *m, Call *c, PyObject *cache, Hit *hit)
{
    int64_t sig[LZ_NORM_SIG];
    PyObject *store = NULL, *version = NULL;
    int usable = lz_norm_sig(hit, c->args, sig) && memo_store(m, c, cache, &store, &version);
    if (usable && memo_plan(m, c, MSLOT_OP_CMEMO, store, version, sig, LZ_NORM_SIG)) {
        /* remembered */
    }
    else if (!PyErr_Occurred() && exact_plan(m, c, cache, lz_norm_key(hit, c->args)) && usable) {
        remember(m, c, MSLOT_OP_CMEMO, store, version, sig, LZ_NORM_SIG);
    }
    Py_XDECREF(store);
    Py_XDECREF(version);
}

/* Selection: the plan the contract's lookup finds in the runtime's plan dict (the dispatcher shares it: no cache
 * of its own, no TTL, no open policy scope), or the dispatcher's own cache holds under the call's exact key (the
 * shape guard holding). 1, or 0: the Python method looks it up. */
int
lz_find_selected(Method *m, Call *c)
{
    PyObject *cache = dget(m, c, MSLOT_D_CACHE);
    PyObject *causal = NULL, *dropout = NULL, *window = NULL, *data = NULL;
    if (cache != NULL && lz_scoped(m->hit) == 0 && (causal = fast_get(m, c, MSLOT_CAUSAL)) &&
        (dropout = fast_get(m, c, MSLOT_DROPOUT)) && (window = fast_get(m, c, MSLOT_WINDOW))) {
        if (cache != Py_None || c->ctx != NULL)
            exact_attention_plan(m, c, cache, causal, dropout, window);
        else if ((data = shared_plans(m, c)) != NULL) {
            c->plan = lz_find_plan(m->hit, data, c->operation, c->q, c->k, c->v, Py_None, causal, dropout, window);
        }
    }
    Py_XDECREF(cache);
    Py_XDECREF(data);
    Py_XDECREF(causal);
    Py_XDECREF(dropout);
    Py_XDECREF(window);
    return c->plan != NULL;
}

/* An OpInputs entry's kernel arguments, ``fast.fill(inputs)``: ``inputs`` has exactly ``fast.size`` names, each
 * entry name present and not None. 1, or 0: not served. */
int
lz_read_op_args(Method *m, Call *c, PyObject *inputs)
{
    PyObject *size = fast_get(m, c, MSLOT_SIZE);
    PyObject *names = size ? fast_get(m, c, MSLOT_NAMES) : NULL;
    PyObject *template = names ? fast_get(m, c, MSLOT_TEMPLATE) : NULL;
    int ok = template && PyLong_CheckExact(size) && PyDict_GET_SIZE(inputs) == PyLong_AsSsize_t(size) &&
             PyTuple_CheckExact(names) && PyTuple_CheckExact(template) &&
             PyTuple_GET_SIZE(names) == PyTuple_GET_SIZE(template) && PyTuple_GET_SIZE(names) <= MAX_OP_ARGS;
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(names); i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i), *value = PyTuple_GET_ITEM(template, i);
        if (name != Py_None && ((value = PyDict_GetItemWithError(inputs, name)) == NULL || value == Py_None))
            ok = 0;
        else
            c->args[c->nargs++] = Py_NewRef(value);
    }
    Py_XDECREF(size);
    Py_XDECREF(names);
    Py_XDECREF(template);
    return ok;
}

/* ``fn(operation, *args)`` for an entry's contract function (new reference; NULL with an error set). */
static PyObject *
contract_call(Method *m, Call *c, int which)
{
    PyObject *fn = fast_get(m, c, which);
    PyObject *a[MAX_OP_ARGS + 1] = {c->operation};
    for (Py_ssize_t i = 0; i < c->nargs; i++)
        a[i + 1] = c->args[i];
    PyObject *out = fn ? PyObject_Vectorcall(fn, a, c->nargs + 1, NULL) : NULL;
    Py_XDECREF(fn);
    return out;
}

/* An OpInputs call's plan, as ``Dispatcher._hot_op`` finds it: the contract's lookup in the shared plan dict (a
 * norm's compiled lookup where the entry has one), or the own cache under the contract's exact key when its guards
 * hold. 1, or 0: not served. */
int
lz_find_op_plan(Method *m, Call *c)
{
    PyObject *cache = dget(m, c, MSLOT_D_CACHE), *data = NULL;
    if (cache == NULL || lz_scoped(m->hit) != 0) {
        Py_XDECREF(cache);
        return 0;
    }
    PyObject *hit = fast_get(m, c, MSLOT_HIT); /* a norm's compiled hit, or None */
    int norm = hit != NULL && PyObject_TypeCheck(hit, lz_hit_type()) && ((Hit *)hit)->kind != KIND_ATTENTION &&
               c->nargs == (((Hit *)hit)->kind == KIND_LAYER_NORM ? 4 : 3);
    if (norm)
        c->norm = Py_NewRef(hit);
    if (hit != NULL && (cache != Py_None || c->ctx != NULL) && norm) { /* the exact key, through the memo */
        exact_norm_plan(m, c, cache, (Hit *)hit);
    }
    else if (hit != NULL && (cache != Py_None || c->ctx != NULL)) { /* keys(operation, *args)[1] if admits(...) */
        PyObject *ok = contract_call(m, c, MSLOT_ADMITS);
        PyObject *keys = ok == Py_True ? contract_call(m, c, MSLOT_KEYS) : NULL;
        if (keys != NULL && PyTuple_CheckExact(keys) && PyTuple_GET_SIZE(keys) == 2)
            exact_plan(m, c, cache, Py_NewRef(PyTuple_GET_ITEM(keys, 1)));
        Py_XDECREF(ok);
        Py_XDECREF(keys);
    }
    else if (hit != NULL && (data = shared_plans(m, c)) != NULL) {
        if (norm) {
            c->plan = lz_find_norm_plan((Hit *)hit, data, c->args);
        }
        else { /* lookup(plans, operation, *args)[0] */
            PyObject *a[MAX_OP_ARGS + 2] = {data, c->operation};
            for (Py_ssize_t i = 0; i < c->nargs; i++)
                a[i + 2] = c->args[i];
            PyObject *lookup = fast_get(m, c, MSLOT_LOOKUP);
            PyObject *found = lookup ? PyObject_Vectorcall(lookup, a, c->nargs + 2, NULL) : NULL;
            if (found != NULL && PyTuple_CheckExact(found) && PyTuple_GET_SIZE(found) == 3 &&
                PyTuple_GET_ITEM(found, 0) != Py_None)
                c->plan = Py_NewRef(PyTuple_GET_ITEM(found, 0));
            Py_XDECREF(lookup);
            Py_XDECREF(found);
        }
    }
    Py_XDECREF(hit);
    Py_DECREF(cache);
    Py_XDECREF(data);
    return c->plan != NULL;
}

