/* layerzero._accel: the dispatchers' compiled method, shared by its two files (_accel_dispatch.c: the Method type
 * and its served call; _accel_lookup.c: where a served call's plan comes from). */
#ifndef LAYERZERO_ACCEL_DISPATCH_H
#define LAYERZERO_ACCEL_DISPATCH_H
#include "_accel.h"

enum { MSLOT_Q, MSLOT_K, MSLOT_V, MSLOT_CAUSAL, MSLOT_DROPOUT, MSLOT_SCALE, MSLOT_WINDOW, MSLOT_BSHD, MSLOT_DIRECT_OK,
       MSLOT_NAMES, MSLOT_TEMPLATE, MSLOT_SIZE, MSLOT_LOOKUP, MSLOT_KEYS, MSLOT_ADMITS, MSLOT_HIT, MSLOT_SHARD_VERSION,
       MSLOT_SHARD_DATA, MSLOT_CACHE_TTL, MSLOT_CACHE_DATA, MSLOT_MVCC_TTL, MSLOT_MVCC_SHARDS, MSLOT_MVCC_MASK,
       MSLOT_MVCC_VERSION, MSLOT_RT_VERSION, MSLOT_RT_PLANS, MSLOT_KERNEL_ID_OF, MSLOT_PLAN_CONTEXT, MSLOT_CMEMO, MSLOT_OP_CMEMO, MSLOT_CACHE_VERSION,
       MSLOT_D_RUNTIME, MSLOT_D_VERSION, MSLOT_D_TIMED, MSLOT_D_FAST, MSLOT_D_CACHE, MSLOT_D_MODE,
       MSLOT_KERNELS, MSLOT_OUTPUT, MSLOT_KERNEL_ID, MSLOT_OPERATION, MSLOT_FALLBACK_USED,
       MSLOT_ATTEMPTS, MSLOT_STAMPS, MSLOT_CACHED, MSLOT_MODE, N_MSLOTS };
extern PyObject *M_NAMES[N_MSLOTS]; /* the slot names, interned */
/* the dispatcher's attributes (and its runtime's, its plan cache's) the hot path reads */
extern PyObject *M_VERSION, *M_HOT, *M_HOT_CAUSAL, *M_TTL, *M_DETOUR, *M_OP_DETOUR, *M_SHARDS, *M_MASK, *M_CONTEXT;
#define MAX_OP_ARGS 12 /* the most canonical arguments an OpInputs entry may fill (linear_cross_entropy: 8) */

enum { METHOD_SELECT, METHOD_STATIC };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;                  /* METHOD_SELECT (Dispatcher.dispatch) or METHOD_STATIC (StaticDispatcher.dispatch) */
    Hit *hit;                  /* lz.attention's compiled hit: the contract's lookup and guard, and their caches */
    PyObject *fallback;        /* the Python method: serves every call this path does not */
    PyTypeObject *inputs_type; /* layerzero.dispatch.generic.AttentionInputs */
    PyTypeObject *op_inputs_type; /* layerzero.dispatch.generic.OpInputs */
    PyTypeObject *result_type; /* layerzero.dispatch.result.DispatchResult */
    PyTypeObject *plan_cache_type, *mvcc_type; /* the own caches read here: PlanCache, MVCCPlanCache */
    PyObject *not_timed;       /* result.NOT_TIMED: the stamps of an untimed dispatch */
    PyObject *options_marker;  /* what generic.kwargs_key's keys start with */
    PyObject *context_marker;  /* generic.CONTEXT_MARKER: a given context's keys are (operation, it, id, key) */
    lz_slot slots[N_MSLOTS];   /* AttentionInputs' and DispatchResult's slots, plan.kernels */
} Method;

/* One served call: what it read (owned references, but self and operation, which the caller holds). */
typedef struct {
    PyObject *self, *operation, *rt, *plan, *fast, *q, *k, *v;
    PyObject *kernel;      /* plan.direct or plan.fn */
    PyObject *options[4];  /* fast.is_causal, .dropout_p, .scale, .window */
    int bshd, timed, direct; /* direct: c->kernel is plan.direct */
    long long t0, t2;
    PyObject *ctx;         /* the given SelectionContext (borrowed), or NULL */
    Py_ssize_t ctx_at;     /* its place among the keywords, or -1 */
    /* an OpInputs entry (op): its kernel arguments, and the norm Hit and plan.const of a norm's direct form */
    int op;
    Py_ssize_t nargs;
    PyObject *args[MAX_OP_ARGS];
    PyObject *norm, *cnst;
} Call;

static inline PyObject *
fast_get(Method *m, Call *c, int which)
{
    return lz_slot_get(&m->slots[which], c->fast, M_NAMES[which]);
}

/* self.<name> of the dispatcher, for one of its slots (new reference; NULL with an error set) */
static inline PyObject *
dget(Method *m, Call *c, int which)
{
    return lz_slot_get(&m->slots[which], c->self, M_NAMES[which]);
}

/* _accel_lookup.c: the served call's plan. 1, or 0: not served (an error may be set). */
int lz_find_selected(Method *m, Call *c);                       /* attention: shared plan dict or own cache */
int lz_read_op_args(Method *m, Call *c, PyObject *inputs);      /* an OpInputs entry's kernel arguments */
int lz_find_op_plan(Method *m, Call *c);                        /* an OpInputs call's plan */
/* _accel_stamps.c: a served call's clock readings, ``(t0, t0, t2, t2, t4, t4)`` as one compact object */
PyObject *lz_stamps_new(long long t0, long long t2, long long t4);
int lz_stamps_init(PyObject *module);
#endif
