/* prefixlb.index._native: the block-hash chain and the prefix index in C.
 *
 * The behaviour is specified by prefixlb/index/_reference.py (read it first); the property
 * tests require both to give identical matches, evictions, LRU order and counters.
 *
 * Layout (all indices are uint32; NIL = UINT32_MAX):
 *   Entry  (24 B)  one (block hash, replica) pair: the replica's LRU links, the next holder of
 *                  the block (holder lists are singly linked: one or two entries in practice),
 *                  the hash. One array grown by an eighth at a time, with a free list, so
 *                  memory is bounded by the live entries (plus the growth slack); indices stay
 *                  valid when it moves, and no Entry pointer is held across an allocation.
 *   Bucket (64 B)  the block table, keyed by block hash -> head of its holder list: buckets
 *                  of 7 lanes, one cache line each, at load <= 1/2. Each lane keeps a 32-bit
 *                  tag of the mixed hash; a probe compares the 7 tags at once and reads an
 *                  entry only on a tag match; the tag alone gives the home bucket, so deletion
 *                  and resize never touch entries. A block lives in the first bucket from its
 *                  home with a free lane; a per-bucket count of the blocks that passed it ends
 *                  probes and lets deletion just clear the lane (slots never move). A slot id is
 *                  bucket << 3 | lane.
 *   Replica        LRU list head/tail, count, capacity, eviction counter, the external id,
 *                  and per-match scratch (generation, depth, the matched run's ends).
 *
 * Memory, not arithmetic, is the cost on large indexes, so the hot paths prefetch what they are
 * about to need, and the request path does its table work where the CPU is otherwise idle:
 * lookup() hashes the prompt (a serial XXH64 chain, latency-bound) and runs the match walk
 * MATCH_LAG blocks behind it; insert() keeps a cursor EVICT_AHEAD victims ahead of the LRU head
 * and prefetches their buckets. Measured alternatives are recorded in benchmarks/README.md.
 *
 * match() walks the chain from block 0 and, at block k, advances exactly the replicas that held
 * blocks 0..k-1 and hold k (holder-list walk with a generation mark): O(sum of holders over the
 * matched blocks), independent of how many replicas the index knows. It then refreshes each
 * replica's matched blocks tail first, as the reference does; when they already form one run of
 * the replica's LRU list in chain order (as the previous refresh or insert left them), that is
 * one O(1) move of the run. insert() of the chain just matched (the request path) reuses the
 * match instead of probing the table for the blocks it found.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xxh64.h"

#define NIL UINT32_MAX
#define GROW_MIN 4096u /* entries added to the pool at least per growth */
#define MAX_ENTRIES (UINT32_MAX - 2u) /* below NIL and NIL - 1 (the eviction cursor's "ran out") */
#define LANES 7u              /* blocks per bucket (one cache line) */
#define MIN_BUCKETS 32u
#define MAX_BUCKETS (1u << 28) /* a slot id is bucket << 3 | lane */
#define MIX64 0x9E3779B97F4A7C15ULL
#define MAX_REPLICA_ID 0xFFFFFFFFULL
#ifndef MATCH_LAG
#define MATCH_LAG 16
#endif
#ifndef MATCH_AHEAD
#define MATCH_AHEAD 8
#endif
#ifndef INSERT_AHEAD
#define INSERT_AHEAD 12
#endif
#ifndef EVICT_AHEAD
#define EVICT_AHEAD 12
#endif

#if defined(__GNUC__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define PREFETCH(p) __builtin_prefetch(p)
#define LOWEST_BIT(m) ((uint32_t)__builtin_ctz(m)) /* index of m's lowest set bit; m != 0 */
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define PREFETCH(p) ((void)0)
static inline uint32_t LOWEST_BIT(uint32_t m)
{
    uint32_t i = 0;
    while (!(m & 1u)) {
        m >>= 1;
        i++;
    }
    return i;
}
#endif

/* ===================================================================================== */
/* Chain: an immutable array of uint64 block hashes (sequence + buffer protocol)          */
/* ===================================================================================== */

typedef struct {
    PyObject_VAR_HEAD
    uint64_t h[1];
} ChainObject;

static PyTypeObject ChainType;

#define CHAIN_LEN(o) Py_SIZE(o)

static ChainObject *chain_alloc(Py_ssize_t n)
{
    ChainObject *c = PyObject_NewVar(ChainObject, &ChainType, n);
    return c;
}

static PyObject *chain_tolist(ChainObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n = CHAIN_LEN(self);
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->h[i]);
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static Py_ssize_t chain_length(ChainObject *self) { return CHAIN_LEN(self); }

static PyObject *chain_item(ChainObject *self, Py_ssize_t i)
{
    if (i < 0 || i >= CHAIN_LEN(self)) {
        PyErr_SetString(PyExc_IndexError, "Chain index out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(self->h[i]);
}

static PyObject *chain_subscript(ChainObject *self, PyObject *key)
{
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0)
            i += CHAIN_LEN(self);
        return chain_item(self, i);
    }
    if (PySlice_Check(key)) {
        Py_ssize_t start, stop, step;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0)
            return NULL;
        Py_ssize_t n = PySlice_AdjustIndices(CHAIN_LEN(self), &start, &stop, step);
        ChainObject *out = chain_alloc(n);
        if (!out)
            return NULL;
        for (Py_ssize_t i = 0, j = start; i < n; i++, j += step)
            out->h[i] = self->h[j];
        return (PyObject *)out;
    }
    PyErr_Format(PyExc_TypeError, "Chain indices must be integers or slices, not %.200s",
                 Py_TYPE(key)->tp_name);
    return NULL;
}

static int chain_getbuffer(ChainObject *self, Py_buffer *view, int flags)
{
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "Chain is read-only");
        view->obj = NULL;
        return -1;
    }
    view->obj = Py_NewRef((PyObject *)self);
    view->buf = self->h;
    view->len = CHAIN_LEN(self) * (Py_ssize_t)sizeof(uint64_t);
    view->readonly = 1;
    view->itemsize = sizeof(uint64_t);
    view->format = (flags & PyBUF_FORMAT) ? "Q" : NULL;
    view->ndim = 1;
    view->shape = (flags & PyBUF_ND) ? &((PyVarObject *)self)->ob_size : NULL;
    view->strides = (flags & PyBUF_STRIDES) ? &view->itemsize : NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    return 0;
}

static PyObject *chain_richcompare(ChainObject *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    if (Py_IS_TYPE(other, &ChainType)) {
        ChainObject *o = (ChainObject *)other;
        int eq = CHAIN_LEN(self) == CHAIN_LEN(o) &&
                 memcmp(self->h, o->h, (size_t)CHAIN_LEN(self) * sizeof(uint64_t)) == 0;
        if (op == Py_NE)
            eq = !eq;
        return PyBool_FromLong(eq);
    }
    if (!PyList_Check(other) && !PyTuple_Check(other))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *mine = chain_tolist(self, NULL);
    if (!mine)
        return NULL;
    PyObject *theirs = PyList_Check(other) ? Py_NewRef(other) : PySequence_List(other);
    if (!theirs) {
        Py_DECREF(mine);
        return NULL;
    }
    PyObject *res = PyObject_RichCompare(mine, theirs, op);
    Py_DECREF(mine);
    Py_DECREF(theirs);
    return res;
}

static PyObject *chain_repr(ChainObject *self)
{
    PyObject *list = chain_tolist(self, NULL);
    if (!list)
        return NULL;
    PyObject *res = PyUnicode_FromFormat("Chain(%R)", list);
    Py_DECREF(list);
    return res;
}

/* Parse a sequence of unsigned 64-bit ints into a freshly malloc'ed array. */
static int parse_u64_sequence(PyObject *obj, uint64_t **out, Py_ssize_t *n_out);

static PyObject *chain_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *iterable = NULL;
    static char *kwlist[] = {"hashes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:Chain", kwlist, &iterable))
        return NULL;
    if (!iterable)
        return (PyObject *)chain_alloc(0);
    uint64_t *vals = NULL;
    Py_ssize_t n = 0;
    if (parse_u64_sequence(iterable, &vals, &n) < 0)
        return NULL;
    ChainObject *c = chain_alloc(n);
    if (c && n)
        memcpy(c->h, vals, (size_t)n * sizeof(uint64_t));
    PyMem_Free(vals);
    return (PyObject *)c;
}

static PyObject *chain_reduce(ChainObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = chain_tolist(self, NULL);
    if (!list)
        return NULL;
    return Py_BuildValue("(O(N))", (PyObject *)Py_TYPE(self), list);
}

static PyMethodDef chain_methods[] = {
    {"tolist", (PyCFunction)chain_tolist, METH_NOARGS, "The hashes as a list of ints."},
    {"__reduce__", (PyCFunction)chain_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods chain_as_sequence = {
    .sq_length = (lenfunc)chain_length,
    .sq_item = (ssizeargfunc)chain_item,
};

static PyMappingMethods chain_as_mapping = {
    .mp_length = (lenfunc)chain_length,
    .mp_subscript = (binaryfunc)chain_subscript,
};

static PyBufferProcs chain_as_buffer = {
    .bf_getbuffer = (getbufferproc)chain_getbuffer,
    .bf_releasebuffer = NULL,
};

static PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prefixlb.index._native.Chain",
    .tp_basicsize = offsetof(ChainObject, h),
    .tp_itemsize = sizeof(uint64_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Chain(hashes=())\n--\n\nAn immutable array of unsigned 64-bit block hashes "
              "(sequence and buffer protocol, format 'Q').",
    .tp_new = chain_new,
    .tp_repr = (reprfunc)chain_repr,
    .tp_richcompare = (richcmpfunc)chain_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_methods = chain_methods,
    .tp_as_sequence = &chain_as_sequence,
    .tp_as_mapping = &chain_as_mapping,
    .tp_as_buffer = &chain_as_buffer,
};

/* ===================================================================================== */
/* Argument parsing shared by the functions and methods                                  */
/* ===================================================================================== */

static int bad_hash_value(PyObject *item)
{
    PyErr_Format(PyExc_ValueError, "block hashes must be unsigned 64-bit integers, got %R", item);
    return -1;
}

static int parse_u64_sequence(PyObject *obj, uint64_t **out, Py_ssize_t *n_out)
{
    PyObject *seq = PySequence_Fast(obj, "block hashes must be an iterable of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint64_t *vals = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (!vals) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = items[i];
        if (PyBool_Check(it) || !PyLong_Check(it)) {
            bad_hash_value(it);
            goto fail;
        }
        unsigned long long v = PyLong_AsUnsignedLongLong(it);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            bad_hash_value(it);
            goto fail;
        }
        vals[i] = (uint64_t)v;
    }
    Py_DECREF(seq);
    *out = vals;
    *n_out = n;
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(vals);
    return -1;
}

/* A view of block hashes given as a Chain, a uint64 buffer (array('Q')) or any iterable. */
typedef struct {
    const uint64_t *h;
    Py_ssize_t n;
    uint64_t *owned;
    Py_buffer view;
    int has_view;
} HashArg;

static int is_u64_format(const char *fmt)
{
    if (!fmt)
        return 0;
    if (*fmt == '@' || *fmt == '=' || *fmt == '<')
        fmt++;
    return (fmt[0] == 'Q' || fmt[0] == 'L') && fmt[1] == '\0';
}

static int hasharg_get(PyObject *obj, HashArg *a)
{
    memset(a, 0, sizeof *a);
    if (Py_IS_TYPE(obj, &ChainType)) {
        a->h = ((ChainObject *)obj)->h;
        a->n = CHAIN_LEN(obj);
        return 0;
    }
    if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj)) {
        if (PyObject_GetBuffer(obj, &a->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
            if (a->view.itemsize == 8 && a->view.ndim == 1 && is_u64_format(a->view.format)) {
                a->has_view = 1;
                a->h = (const uint64_t *)a->view.buf;
                a->n = a->view.len / 8;
                return 0;
            }
            PyBuffer_Release(&a->view);
        } else {
            PyErr_Clear();
        }
    }
    if (parse_u64_sequence(obj, &a->owned, &a->n) < 0)
        return -1;
    a->h = a->owned;
    return 0;
}

static void hasharg_release(HashArg *a)
{
    if (a->has_view)
        PyBuffer_Release(&a->view);
    PyMem_Free(a->owned);
    a->owned = NULL;
    a->has_view = 0;
}

static int parse_hash_args(PyObject *bs_obj, PyObject *seed_obj, Py_ssize_t *bs, uint64_t *seed)
{
    *bs = 64;
    *seed = 0;
    if (bs_obj) {
        if (!PyLong_Check(bs_obj)) {
            PyErr_Format(PyExc_ValueError, "block_size must be a positive integer, got %R", bs_obj);
            return -1;
        }
        Py_ssize_t v = PyLong_AsSsize_t(bs_obj);
        if ((v == -1 && PyErr_Occurred()) || v < 1) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "block_size must be a positive integer, got %R", bs_obj);
            return -1;
        }
        *bs = v;
    }
    if (seed_obj) {
        unsigned long long v = 0;
        if (PyLong_Check(seed_obj))
            v = PyLong_AsUnsignedLongLong(seed_obj);
        if (!PyLong_Check(seed_obj) || (v == (unsigned long long)-1 && PyErr_Occurred())) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "seed must be an unsigned 64-bit integer, got %R", seed_obj);
            return -1;
        }
        *seed = (uint64_t)v;
    }
    return 0;
}

static int parse_replica_id(PyObject *obj, uint32_t *out)
{
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "replica id must be an int, got %.200s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > MAX_REPLICA_ID) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "replica id must be in [0, 2**32), got %R", obj);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int parse_capacity(PyObject *obj, uint32_t *out)
{
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "capacity_blocks must be an int");
        return -1;
    }
    long long v = PyLong_AsLongLong(obj);
    if ((v == -1 && PyErr_Occurred()) || v < 1 || (unsigned long long)v > 0xFFFFFFFFULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "capacity_blocks must be in [1, 2**32), got %R", obj);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* ===================================================================================== */
/* The index                                                                             */
/* ===================================================================================== */

typedef struct {
    uint64_t hash;
    uint32_t lru_prev, lru_next;   /* within the replica's LRU list (free list uses lru_next) */
    uint32_t hold_next;            /* within the block's holder list (singly linked: short) */
    uint32_t rep;                  /* internal replica slot; NIL while the entry is free */
} Entry;

/* A bucket of the block table: one cache line, LANES blocks. */
typedef struct {
    uint32_t tag[LANES];  /* the block's tag (never 0); 0 = empty lane */
    uint32_t ovf;         /* blocks living past this bucket whose home is this bucket or before */
    uint32_t head[LANES]; /* the block's first holder entry */
    uint32_t spare;
} Bucket;
_Static_assert(sizeof(Bucket) == 64, "a bucket is one cache line");

typedef struct {
    PyObject *id;      /* exact int; NULL when this slot is free */
    uint32_t lru_head; /* least recently used */
    uint32_t lru_tail; /* most recently used */
    uint32_t count;
    uint32_t capacity;
    uint64_t evictions;
    uint32_t gen;   /* match scratch: generation of `depth` */
    uint32_t depth; /* match scratch: leading blocks held */
    uint32_t run_head, run_tail; /* match scratch: entries of blocks depth-1 and 0 */
    uint32_t run_ok;             /* match scratch: they form one run of the LRU list */
    uint32_t next_free;
} Replica;

typedef struct {
    uint32_t e, rep;
} Matched;

typedef struct IndexObject_ {
    PyObject_HEAD
    /* entry pool */
    Entry *entries;
    uint32_t entries_cap;
    uint32_t n_handed; /* entries ever handed out (the rest of the pool is untouched) */
    uint32_t free_head;
    uint64_t n_entries;
    /* block table */
    Bucket *bk;   /* 64-byte aligned, inside bk_mem */
    void *bk_mem;
    uint32_t nb;  /* buckets */
    uint64_t n_used;
    /* replicas */
    Replica *reps;
    uint32_t n_reps, reps_cap, free_rep;
    PyObject *idmap; /* dict: external id (int) -> internal slot (int), in first-seen order */
    uint32_t default_capacity;
    uint64_t evictions;
    uint32_t gen;
    /* match scratch: entries matched, in walk order, each with its replica slot */
    Matched *scratch;
    size_t scratch_cap;
    /* the last match's chain and how much of scratch it filled: insert(r, that chain) takes
     * r's matched entries from scratch instead of finding them again (validated per entry) */
    PyObject *memo_chain;
    size_t memo_ns;
    uint32_t memo_gen;
    uint32_t *run; /* insert scratch: r's matched entries, block order */
    size_t run_cap;
} IndexObject;

static inline Entry *E(IndexObject *ix, uint32_t i) { return &ix->entries[i]; }

/* A block's tag: the high half of its mixed hash, 0 reserved for an empty lane. The tag alone
 * gives the home bucket (multiply-shift onto any bucket count), so resize and deletion never
 * read an entry, and blocks sharing a bucket differ in their low tag bits, the probe's filter. */
static inline uint32_t tag_of(uint64_t h)
{
    const uint32_t t = (uint32_t)((h * MIX64) >> 32);
    return t ? t : 1u;
}
static inline uint32_t home_of(uint32_t tag, uint32_t nb) { return (uint32_t)(((uint64_t)tag * nb) >> 32); }
static inline uint32_t next_bucket(uint32_t b, uint32_t nb) { return b + 1u == nb ? 0u : b + 1u; }
static inline uint32_t *slot_head(IndexObject *ix, uint32_t s) { return &ix->bk[s >> 3].head[s & 7u]; }

/* Bit l set for each lane l of the bucket whose tag is t (t = 0: the empty lanes). */
static inline uint32_t lanes_eq(const Bucket *b, uint32_t t)
{
#if defined(__SSE2__)
    const __m128i x = _mm_set1_epi32((int)t);
    const __m128i lo = _mm_cmpeq_epi32(_mm_load_si128((const __m128i *)b->tag), x);
    const __m128i hi = _mm_cmpeq_epi32(_mm_load_si128((const __m128i *)(b->tag + 4)), x);
    const uint32_t m = (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(lo)) |
                       ((uint32_t)_mm_movemask_ps(_mm_castsi128_ps(hi)) << 4);
    return m & ((1u << LANES) - 1u);
#else
    uint32_t m = 0;
    for (uint32_t l = 0; l < LANES; l++)
        m |= (uint32_t)(b->tag[l] == t) << l;
    return m;
#endif
}

/* ---- entry pool ---------------------------------------------------------------------- */

static uint32_t entry_alloc(IndexObject *ix)
{
    if (ix->free_head != NIL) {
        uint32_t i = ix->free_head;
        ix->free_head = E(ix, i)->lru_next;
        return i;
    }
    if (UNLIKELY(ix->n_handed >= MAX_ENTRIES)) {
        PyErr_SetString(PyExc_MemoryError, "prefix index entry limit reached");
        return NIL;
    }
    if (ix->n_handed == ix->entries_cap) {
        /* grow by an eighth (at least GROW_MIN): bounded slack, amortised copying; glibc moves
         * large blocks with mremap, so growth does not copy there at all. No Entry pointer is
         * held across entry_alloc. */
        uint64_t cap = (uint64_t)ix->entries_cap + (ix->entries_cap / 8 > GROW_MIN ? ix->entries_cap / 8 : GROW_MIN);
        if (cap > MAX_ENTRIES)
            cap = MAX_ENTRIES;
        Entry *ne = PyMem_Realloc(ix->entries, (size_t)cap * sizeof(Entry));
        if (!ne) {
            PyErr_NoMemory();
            return NIL;
        }
        ix->entries = ne;
        ix->entries_cap = (uint32_t)cap;
    }
    return ix->n_handed++;
}

static inline void entry_free(IndexObject *ix, uint32_t i)
{
    E(ix, i)->rep = NIL; /* a free entry is nobody's: see insert_impl's memo check */
    E(ix, i)->lru_next = ix->free_head;
    ix->free_head = i;
}

/* ---- block table --------------------------------------------------------------------- */
/* Buckets of LANES blocks, one cache line each. A block lives in the first bucket from its home
 * that had an empty lane when it arrived; each full bucket it passed counts it in `ovf`, so a
 * probe stops at the first bucket with ovf == 0 and deletion just clears the lane (and takes the
 * block off the counts of the buckets it passed): slots never move until a resize. A probe is
 * nearly always one line, its lanes compared at once: no probe-length branches to mispredict. */

static Bucket *buckets_alloc(uint32_t nb, void **mem)
{
    void *m = PyMem_Calloc((size_t)nb * sizeof(Bucket) + 63u, 1);
    if (!m) {
        PyErr_NoMemory();
        return NULL;
    }
    *mem = m;
    return (Bucket *)(((uintptr_t)m + 63u) & ~(uintptr_t)63u);
}

/* Put a block in the first bucket from its home with an empty lane (the table has one);
 * returns its slot. */
static uint32_t bucket_put(Bucket *bk, uint32_t nb, uint32_t tag, uint32_t head)
{
    uint32_t b = home_of(tag, nb);
    for (;;) {
        const uint32_t free = lanes_eq(&bk[b], 0);
        if (LIKELY(free)) {
            const uint32_t l = LOWEST_BIT(free);
            bk[b].tag[l] = tag;
            bk[b].head[l] = head;
            return b << 3 | l;
        }
        bk[b].ovf++;
        b = next_bucket(b, nb);
    }
}

static int table_resize(IndexObject *ix, uint32_t nb)
{
    void *mem;
    Bucket *nbk = buckets_alloc(nb, &mem);
    if (!nbk)
        return -1;
    for (uint32_t b = 0; b < ix->nb; b++)
        for (uint32_t l = 0; l < LANES; l++)
            if (ix->bk[b].tag[l])
                bucket_put(nbk, nb, ix->bk[b].tag[l], ix->bk[b].head[l]);
    PyMem_Free(ix->bk_mem);
    ix->bk = nbk;
    ix->bk_mem = mem;
    ix->nb = nb;
    return 0;
}

/* The table keeps its load at or under 1/2 (a bucket then holds 3.5 blocks on average, and
 * about one block in a hundred lives past its home bucket); it grows by half, to a load of 1/3,
 * so its size stays within 1.5x of what that needs. A block that overflowed stays where it is
 * until it leaves, so under churn the displaced share drifts up from a fresh table's: at a load
 * of 3/5 that drift showed in bench_index's steady-state time, at 1/2 it stayed within the
 * noise. */
static inline int table_full(const IndexObject *ix) { return (ix->n_used + 1) * 2 > (uint64_t)LANES * ix->nb; }

/* Add block h (absent from the table) with entry e as its only holder. */
static int slot_place(IndexObject *ix, uint32_t tag, uint32_t e)
{
    if (UNLIKELY(table_full(ix))) {
        if (ix->nb >= MAX_BUCKETS) {
            PyErr_SetString(PyExc_MemoryError, "prefix index block table is full");
            return -1;
        }
        const uint32_t nb = ix->nb > MAX_BUCKETS / 3u * 2u ? MAX_BUCKETS : ix->nb + ix->nb / 2u;
        if (table_resize(ix, nb) < 0)
            return -1;
    }
    bucket_put(ix->bk, ix->nb, tag, e);
    ix->n_used++;
    return 0;
}

/* The slot holding block h (its tag given), or NIL. */
static inline uint32_t slot_probe(IndexObject *ix, uint64_t h, uint32_t tag)
{
    const uint32_t nb = ix->nb;
    uint32_t b = home_of(tag, nb);
    for (;;) {
        const Bucket *B = &ix->bk[b];
        for (uint32_t m = lanes_eq(B, tag); m; m &= m - 1u) {
            const uint32_t l = LOWEST_BIT(m);
            if (LIKELY(E(ix, B->head[l])->hash == h))
                return b << 3 | l;
        }
        if (LIKELY(!B->ovf))
            return NIL;
        b = next_bucket(b, nb);
    }
}

static inline uint32_t slot_find(IndexObject *ix, uint64_t h) { return slot_probe(ix, h, tag_of(h)); }

/* Empty slot s: clear its lane and take the block off the counts of the buckets it passed. */
static void slot_delete(IndexObject *ix, uint32_t s)
{
    const uint32_t b = s >> 3, l = s & 7u;
    for (uint32_t x = home_of(ix->bk[b].tag[l], ix->nb); x != b; x = next_bucket(x, ix->nb))
        ix->bk[x].ovf--;
    ix->bk[b].tag[l] = 0;
    ix->bk[b].head[l] = 0;
    ix->n_used--;
}

static void table_maybe_shrink(IndexObject *ix)
{
    /* under a load of 1/8: back to a load of about 1/3 */
    if (ix->nb <= MIN_BUCKETS || ix->n_used * 8 >= (uint64_t)LANES * ix->nb)
        return;
    uint64_t nb = ix->n_used * 3 / LANES + 1;
    if (nb < MIN_BUCKETS)
        nb = MIN_BUCKETS;
    if (table_resize(ix, (uint32_t)nb) < 0)
        PyErr_Clear(); /* keeping the larger table is always correct */
}

/* ---- holder lists -------------------------------------------------------------------- */

static inline void hold_push(IndexObject *ix, uint32_t slot, uint32_t e)
{
    uint32_t *head = slot_head(ix, slot);
    E(ix, e)->hold_next = *head;
    *head = e;
}

/* Take entry e out of its block's holder list (and the block out of the table with its last
 * holder). */
static void hold_unlink(IndexObject *ix, uint32_t e)
{
    Entry *en = E(ix, e);
    const uint32_t slot = slot_find(ix, en->hash);
    uint32_t *head = slot_head(ix, slot);
    if (*head == e) {
        if (en->hold_next == NIL)
            slot_delete(ix, slot);
        else
            *head = en->hold_next;
        return;
    }
    Entry *p = E(ix, *head);
    while (p->hold_next != e)
        p = E(ix, p->hold_next);
    p->hold_next = en->hold_next;
}

static inline uint32_t hold_find(IndexObject *ix, uint32_t slot, uint32_t rep)
{
    for (uint32_t e = *slot_head(ix, slot); e != NIL; e = E(ix, e)->hold_next)
        if (E(ix, e)->rep == rep)
            return e;
    return NIL;
}

/* ---- LRU lists ----------------------------------------------------------------------- */

static inline void lru_unlink(IndexObject *ix, Replica *r, uint32_t e)
{
    Entry *en = E(ix, e);
    if (en->lru_prev != NIL)
        E(ix, en->lru_prev)->lru_next = en->lru_next;
    else
        r->lru_head = en->lru_next;
    if (en->lru_next != NIL)
        E(ix, en->lru_next)->lru_prev = en->lru_prev;
    else
        r->lru_tail = en->lru_prev;
}

static inline void lru_append(IndexObject *ix, Replica *r, uint32_t e)
{
    Entry *en = E(ix, e);
    en->lru_prev = r->lru_tail;
    en->lru_next = NIL;
    if (r->lru_tail != NIL)
        E(ix, r->lru_tail)->lru_next = e;
    else
        r->lru_head = e;
    r->lru_tail = e;
}

static inline void lru_touch(IndexObject *ix, Replica *r, uint32_t e)
{
    if (r->lru_tail == e)
        return;
    lru_unlink(ix, r, e);
    lru_append(ix, r, e);
}

/* The last match's marks are what insert() of that chain may take from it (the request path:
 * lookup, then insert): valid while the match is the index's last change. A match or an insert
 * starts by forgetting them, and so does every entry leaving the index. */
static inline void memo_forget(IndexObject *ix)
{
    Py_CLEAR(ix->memo_chain);
    ix->memo_ns = 0;
}

/* Drop entry e of replica slot `rep` from every structure. */
static void entry_drop(IndexObject *ix, uint32_t rep, uint32_t e)
{
    Replica *r = &ix->reps[rep];
    memo_forget(ix);
    lru_unlink(ix, r, e);
    hold_unlink(ix, e);
    entry_free(ix, e);
    r->count--;
    ix->n_entries--;
}

/* Take replica slot `rep`'s LRU head out of its lists (and the table), counted as an eviction;
 * returns the entry, not yet freed: insert reuses it for the block it adds. The caller has
 * forgotten the memo. */
static uint32_t evict_head(IndexObject *ix, uint32_t rep)
{
    Replica *r = &ix->reps[rep];
    const uint32_t e = r->lru_head;
    lru_unlink(ix, r, e);
    hold_unlink(ix, e);
    r->count--;
    ix->n_entries--;
    r->evictions++;
    ix->evictions++;
    return e;
}

static void evict_one(IndexObject *ix, uint32_t rep)
{
    memo_forget(ix);
    entry_free(ix, evict_head(ix, rep));
}

/* Move the run first..last (linked first -> ... -> last) to the MRU end. */
static void lru_move_run(IndexObject *ix, Replica *r, uint32_t first, uint32_t last)
{
    if (r->lru_tail == last)
        return;
    Entry *f = E(ix, first), *l = E(ix, last);
    if (f->lru_prev != NIL)
        E(ix, f->lru_prev)->lru_next = l->lru_next;
    else
        r->lru_head = l->lru_next;
    E(ix, l->lru_next)->lru_prev = f->lru_prev;
    f->lru_prev = r->lru_tail;
    E(ix, r->lru_tail)->lru_next = first;
    l->lru_next = NIL;
    r->lru_tail = last;
}

/* ---- replicas ------------------------------------------------------------------------ */

/* Internal slot of an already-validated external id, or NIL if unknown (no error set). */
static uint32_t rep_lookup(IndexObject *ix, PyObject *id)
{
    PyObject *v = PyDict_GetItemWithError(ix->idmap, id);
    if (!v)
        return NIL;
    return (uint32_t)PyLong_AsUnsignedLong(v);
}

static uint32_t rep_get_or_create(IndexObject *ix, PyObject *id_obj)
{
    uint32_t id;
    if (parse_replica_id(id_obj, &id) < 0)
        return NIL;
    PyObject *key = PyLong_FromUnsignedLong(id);
    if (!key)
        return NIL;
    uint32_t slot = rep_lookup(ix, key);
    if (slot != NIL || PyErr_Occurred()) {
        Py_DECREF(key);
        return slot;
    }
    if (ix->free_rep != NIL) {
        slot = ix->free_rep;
        ix->free_rep = ix->reps[slot].next_free;
    } else {
        if (ix->n_reps == ix->reps_cap) {
            uint32_t cap = ix->reps_cap ? ix->reps_cap * 2 : 16;
            Replica *nr = PyMem_Realloc(ix->reps, (size_t)cap * sizeof(Replica));
            if (!nr) {
                Py_DECREF(key);
                PyErr_NoMemory();
                return NIL;
            }
            ix->reps = nr;
            ix->reps_cap = cap;
        }
        slot = ix->n_reps++;
    }
    PyObject *slot_obj = PyLong_FromUnsignedLong(slot);
    if (!slot_obj || PyDict_SetItem(ix->idmap, key, slot_obj) < 0) {
        Py_XDECREF(slot_obj);
        Py_DECREF(key);
        ix->reps[slot].id = NULL;
        ix->reps[slot].next_free = ix->free_rep;
        ix->free_rep = slot;
        return NIL;
    }
    Py_DECREF(slot_obj);
    Replica *r = &ix->reps[slot];
    r->id = key; /* owns the reference */
    r->lru_head = r->lru_tail = NIL;
    r->count = 0;
    r->capacity = ix->default_capacity;
    r->evictions = 0;
    r->gen = 0;
    r->depth = 0;
    r->next_free = NIL;
    return slot;
}

/* Validated lookup for methods that do not create: NIL + no error when unknown. */
static int rep_find(IndexObject *ix, PyObject *id_obj, uint32_t *slot)
{
    uint32_t id;
    if (parse_replica_id(id_obj, &id) < 0)
        return -1;
    PyObject *key = PyLong_FromUnsignedLong(id);
    if (!key)
        return -1;
    *slot = rep_lookup(ix, key);
    Py_DECREF(key);
    return PyErr_Occurred() ? -1 : 0;
}

static uint32_t rep_clear(IndexObject *ix, uint32_t rep)
{
    Replica *r = &ix->reps[rep];
    uint32_t n = 0;
    while (r->lru_head != NIL) {
        entry_drop(ix, rep, r->lru_head);
        n++;
    }
    return n;
}

/* ---- core operations ----------------------------------------------------------------- */

static int scratch_push(IndexObject *ix, size_t *ns, uint32_t e, uint32_t rep)
{
    if (UNLIKELY(*ns == ix->scratch_cap)) {
        size_t cap = ix->scratch_cap ? ix->scratch_cap * 2 : 256;
        Matched *s = PyMem_Realloc(ix->scratch, cap * sizeof(Matched));
        if (!s) {
            PyErr_NoMemory();
            return -1;
        }
        ix->scratch = s;
        ix->scratch_cap = cap;
    }
    ix->scratch[*ns].e = e;
    ix->scratch[*ns].rep = rep;
    (*ns)++;
    return 0;
}

/* Prefetch block h's home slot (where a probe for h starts). */
static void prefetch_home(IndexObject *ix, uint64_t h)
{
    PREFETCH(&ix->bk[home_of(tag_of(h), ix->nb)]);
}

/* The home slots were prefetched while the chain was hashed; the block's first holder entry
 * (whose hash confirms the slot, and whose replica the match needs) is the next miss: start
 * it MATCH_AHEAD blocks early when the home slot's tag says the block is probably there. */
static inline void prefetch_holder(IndexObject *ix, uint64_t h)
{
    const uint32_t tag = tag_of(h);
    const Bucket *B = &ix->bk[home_of(tag, ix->nb)];
    const uint32_t m = lanes_eq(B, tag);
    if (m)
        PREFETCH(E(ix, B->head[LOWEST_BIT(m)]));
}


/* match() as a walk one block at a time, so lookup() can interleave it with hashing. */
typedef struct {
    uint32_t gen;
    size_t ns; /* scratch entries so far */
    size_t n0; /* of which the holders of block 0 (one per replica in the result) */
} MatchWalk;

static void match_begin(IndexObject *ix, MatchWalk *w)
{
    memo_forget(ix);
    if (++ix->gen == 0) { /* wrapped: forget every stale mark */
        for (uint32_t i = 0; i < ix->n_reps; i++)
            ix->reps[i].gen = 0;
        ix->gen = 1;
    }
    w->gen = ix->gen;
    w->ns = w->n0 = 0;
}

/* Block k of the walk (k = 0, 1, ... in order): 1 to go on, 0 when the match has ended, -1 on
 * error. At block k it advances exactly the replicas that held blocks 0..k-1 and hold k. */
static inline int match_step(IndexObject *ix, MatchWalk *w, uint64_t hk, Py_ssize_t k)
{
    const uint32_t slot = slot_find(ix, hk);
    if (slot == NIL)
        return 0;
    const uint32_t gen = w->gen;
    if (k == 0) {
        for (uint32_t e = *slot_head(ix, slot); e != NIL; e = E(ix, e)->hold_next) {
            const uint32_t rep = E(ix, e)->rep;
            Replica *r = &ix->reps[rep];
            r->gen = gen;
            r->depth = 1;
            r->run_head = r->run_tail = e;
            r->run_ok = 1;
            if (scratch_push(ix, &w->ns, e, rep) < 0)
                return -1;
        }
        w->n0 = w->ns;
        return 1;
    }
    uint32_t alive = 0;
    for (uint32_t e = *slot_head(ix, slot); e != NIL; e = E(ix, e)->hold_next) {
        const uint32_t rep = E(ix, e)->rep;
        Replica *r = &ix->reps[rep];
        if (r->gen == gen && r->depth == (uint32_t)k) {
            r->depth = (uint32_t)k + 1;
            r->run_ok &= E(ix, e)->lru_next == r->run_head;
            r->run_head = e;
            alive++;
            if (scratch_push(ix, &w->ns, e, rep) < 0)
                return -1;
        }
    }
    return alive != 0;
}

/* The result {replica id: depth}, then the refresh; remembers `chain` for insert(). */
static PyObject *match_finish(IndexObject *ix, MatchWalk *w, PyObject *chain)
{
    PyObject *res = PyDict_New();
    if (!res)
        return NULL;
    for (size_t j = 0; j < w->n0; j++) {
        Replica *r = &ix->reps[ix->scratch[j].rep];
        PyObject *d = PyLong_FromUnsignedLong(r->depth);
        if (!d || PyDict_SetItem(res, r->id, d) < 0) {
            Py_XDECREF(d);
            Py_DECREF(res);
            return NULL;
        }
        Py_DECREF(d);
    }
    /* refresh each replica's matched blocks tail first. Where they already form one run of its
     * LRU list in chain order (block k's entry followed by block k-1's, as the last refresh or
     * insert left them), that is moving the run to the MRU end; otherwise touch them one by
     * one, in reverse walk order. */
    int broken = 0;
    for (size_t j = 0; j < w->n0; j++) {
        Replica *r = &ix->reps[ix->scratch[j].rep];
        if (r->run_ok)
            lru_move_run(ix, r, r->run_head, r->run_tail);
        else
            broken = 1;
    }
    if (broken)
        for (size_t j = w->ns; j-- > 0;) {
            Replica *r = &ix->reps[ix->scratch[j].rep];
            if (!r->run_ok)
                lru_touch(ix, r, ix->scratch[j].e);
        }
    if (chain) {
        ix->memo_chain = Py_NewRef(chain);
        ix->memo_ns = w->ns;
        ix->memo_gen = w->gen;
    }
    return res;
}

static PyObject *match_impl(IndexObject *ix, const uint64_t *h, Py_ssize_t n, PyObject *chain)
{
    MatchWalk w;
    match_begin(ix, &w);
    if (ix->n_used)
        for (Py_ssize_t k = 0; k < n; k++) {
            if (k + MATCH_AHEAD < n)
                prefetch_holder(ix, h[k + MATCH_AHEAD]);
            const int go = match_step(ix, &w, h[k], k);
            if (go < 0)
                return NULL;
            if (!go)
                break;
        }
    return match_finish(ix, &w, chain);
}

/* Hash the full blocks of `data` into a new Chain; with an index (lookup()), match them in the
 * same pass. The XXH64 chain is serial (each block seeds the next) and leaves most of the core
 * idle, so the walk runs MATCH_LAG blocks behind the hashing, in its shadow: block k's home
 * bucket is prefetched when its hash is known, its first holder entry MATCH_LAG - MATCH_AHEAD
 * blocks later, and it is matched MATCH_LAG blocks later. Once the match has ended nothing more
 * is prefetched: the rest of the chain's buckets matter only to insert(), which fetches its
 * own ahead of use (prefetched here, a long prompt's would leave the cache before it ran). */
static ChainObject *hash_chain(IndexObject *ix, PyObject *data, PyObject *bs_obj, PyObject *seed_obj, MatchWalk *w,
                               int *go)
{
    Py_ssize_t bs;
    uint64_t h;
    if (parse_hash_args(bs_obj, seed_obj, &bs, &h) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const Py_ssize_t n = view.len / bs;
    ChainObject *c = chain_alloc(n);
    if (!c) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int g = 0;
    if (ix) {
        match_begin(ix, w);
        g = ix->n_used != 0;
    }
    const unsigned char *p = view.buf;
    uint64_t *ch = c->h;
    for (Py_ssize_t i = 0; i < n; i++, p += bs) {
        h = bs == 64 ? plb_xxh64_64(p, h) : plb_xxh64(p, (size_t)bs, h);
        ch[i] = h;
        if (g <= 0)
            continue; /* no index, or the match has ended: insert() prefetches its own buckets */
        prefetch_home(ix, h);
        if (i >= MATCH_LAG) {
            const Py_ssize_t k = i - MATCH_LAG;
            prefetch_holder(ix, ch[k + MATCH_AHEAD]);
            g = match_step(ix, w, ch[k], k);
        }
    }
    PyBuffer_Release(&view);
    for (Py_ssize_t k = n > MATCH_LAG ? n - MATCH_LAG : 0; g > 0 && k < n; k++) { /* the last MATCH_LAG */
        if (k + MATCH_AHEAD < n)
            prefetch_holder(ix, ch[k + MATCH_AHEAD]);
        g = match_step(ix, w, ch[k], k);
    }
    if (go)
        *go = g;
    return c;
}

/* Hash the full blocks of `data` into a new Chain. */
static ChainObject *chain_from_data(PyObject *data, PyObject *bs_obj, PyObject *seed_obj)
{
    return hash_chain(NULL, data, bs_obj, seed_obj, NULL, NULL);
}

static PyObject *lookup_impl(IndexObject *ix, PyObject *data, PyObject *bs_obj, PyObject *seed_obj)
{
    MatchWalk w;
    int go;
    ChainObject *c = hash_chain(ix, data, bs_obj, seed_obj, &w, &go);
    if (!c)
        return NULL;
    PyObject *m = go < 0 ? NULL : match_finish(ix, &w, (PyObject *)c);
    if (!m) {
        Py_DECREF(c);
        return NULL;
    }
    PyObject *t = PyTuple_Pack(2, (PyObject *)c, m);
    Py_DECREF(c);
    Py_DECREF(m);
    return t;
}

/* One step of insert, block k: touch it if `rep` holds it (returns 1), else evict (if full) and
 * add it (returns 0); -1 on error. */
static inline int insert_one(IndexObject *ix, uint32_t rep, const uint64_t *h, Py_ssize_t k, uint32_t *ahead)
{
    const uint64_t hk = h[k];
    Replica *r = &ix->reps[rep];
    const uint32_t tag = tag_of(hk);
    const uint32_t slot = slot_probe(ix, hk, tag);
    if (slot != NIL) {
        const uint32_t held = hold_find(ix, slot, rep);
        if (held != NIL) {
            lru_touch(ix, r, held);
            return 1;
        }
    }
    uint32_t e;
    if (r->count >= r->capacity) {
        /* the victims are the LRU head onwards: keep a cursor EVICT_AHEAD victims ahead of the
         * head and prefetch each victim's bucket as the cursor passes it */
        uint32_t v = *ahead;
        if (v == NIL) {
            v = r->lru_head;
            for (int i = 0; i < EVICT_AHEAD && v != NIL; i++) {
                const Entry *en = E(ix, v);
                PREFETCH(&ix->bk[home_of(tag_of(en->hash), ix->nb)]);
                v = en->lru_next;
            }
        } else if (v != NIL - 1u) {
            const Entry *en = E(ix, v);
            PREFETCH(&ix->bk[home_of(tag_of(en->hash), ix->nb)]);
            v = en->lru_next;
            if (v != NIL)
                PREFETCH(E(ix, v));
        }
        *ahead = v == NIL ? NIL - 1u : v;
        /* the victim's entry becomes the new block's (insert_impl has forgotten the memo). The
         * victim is not hk (rep does not hold hk), and a deletion moves no slot: `slot` stays. */
        e = evict_head(ix, rep);
    } else {
        e = entry_alloc(ix);
        if (e == NIL)
            return -1;
    }
    Entry *en = E(ix, e);
    en->hash = hk;
    en->rep = rep;
    if (slot != NIL) {
        hold_push(ix, slot, e);
    } else {
        en->hold_next = NIL;
        if (slot_place(ix, tag, e) < 0) {
            entry_free(ix, e);
            return -1;
        }
    }
    lru_append(ix, r, e);
    r->count++;
    ix->n_entries++;
    return 0;
}

/* insert(rep, h): blocks n-1 down to 0, each touched if held, else added (evicting LRU first).
 *
 * The request path calls insert with the chain it has just matched, so the leading blocks
 * `rep` holds are already known: the match left rep's entries for blocks 0..d-1 in scratch.
 * Those blocks skip the table (slot probe + holder walk); each remembered entry is used only if
 * it is still live, rep's and for h[k] (an entry for (block, replica) is unique, so then it is
 * the one a probe would find), else block k takes the generic step. When the d entries still
 * form one run of rep's LRU list in chain order (the match refreshed them so), touching them
 * tail first is the same as moving the run to the MRU end, done in O(1). */
static int insert_impl(IndexObject *ix, uint32_t rep, const uint64_t *h, Py_ssize_t n, PyObject *chain)
{
    Replica *r = &ix->reps[rep];
    const size_t memo_ns = ix->memo_ns;
    Py_ssize_t d = 0;
    int quick = 0;
    if (chain && chain == ix->memo_chain && r->gen == ix->memo_gen) {
        d = r->depth; /* the match was the last change to the index: its marks are current */
        quick = r->run_ok;
    }
    memo_forget(ix);
    const Py_ssize_t count0 = r->count;
    const uint64_t evictions0 = r->evictions;
    int touched = 0;
    uint32_t ahead = NIL; /* eviction prefetch cursor: NIL = not started, NIL - 1 = ran out */
    for (Py_ssize_t k = n - 1; k >= d; k--) {
        if (k - INSERT_AHEAD >= d)
            prefetch_home(ix, h[k - INSERT_AHEAD]);
        const int rc = insert_one(ix, rep, h, k, &ahead);
        if (rc < 0)
            return -1;
        touched |= rc;
    }
    if (d == 0)
        return 0;
    /* The match left blocks d-1..0 as one run at rep's MRU end (run_ok). Blocks n-1..d were
     * all new (nothing touched), so they were appended after the run and the evictions took
     * the LRU head: while they numbered at most count0 - d they stopped short of the run. Then
     * touching blocks d-1..0 is moving the run back to the MRU end. */
    if (quick && !touched && (Py_ssize_t)(r->evictions - evictions0) <= count0 - d) {
        lru_move_run(ix, r, r->run_head, r->run_tail);
        return 0;
    }
    /* Otherwise take rep's entries for blocks 0..d-1 from the match's scratch, each used only
     * while it is still live, rep's and for h[k] (an entry for (block, replica) is unique). */
    if (UNLIKELY(ix->run_cap < (size_t)d)) {
        uint32_t *run = PyMem_Realloc(ix->run, (size_t)d * sizeof(uint32_t));
        if (!run) {
            PyErr_NoMemory();
            return -1;
        }
        ix->run = run;
        ix->run_cap = (size_t)d;
    }
    uint32_t *run = ix->run;
    Py_ssize_t got = 0; /* the match pushed one entry of rep per block 0..d-1, in block order */
    for (size_t j = 0; j < memo_ns && got < d; j++)
        if (ix->scratch[j].rep == rep)
            run[got++] = ix->scratch[j].e;
    assert(got == d);
    int whole = 1;
    for (Py_ssize_t k = d - 1; whole && k >= 0; k--) {
        const Entry *en = E(ix, run[k]);
        if (en->rep != rep || en->hash != h[k] || (k > 0 && en->lru_next != run[k - 1]))
            whole = 0;
    }
    if (whole) {
        lru_move_run(ix, r, run[d - 1], run[0]);
        return 0;
    }
    for (Py_ssize_t k = d - 1; k >= 0; k--) {
        const Entry *en = E(ix, run[k]);
        if (en->rep == rep && en->hash == h[k])
            lru_touch(ix, r, run[k]);
        else if (insert_one(ix, rep, h, k, &ahead) < 0)
            return -1;
    }
    return 0;
}

/* ---- Python methods ------------------------------------------------------------------ */

static PyTypeObject IndexType;

static int index_init(IndexObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity_blocks", NULL};
    PyObject *cap_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:PrefixIndexC", kwlist, &cap_obj))
        return -1;
    uint32_t cap;
    if (parse_capacity(cap_obj, &cap) < 0)
        return -1;
    if (self->idmap) {
        PyErr_SetString(PyExc_RuntimeError, "PrefixIndexC is already initialised");
        return -1;
    }
    self->idmap = PyDict_New();
    if (!self->idmap)
        return -1;
    self->bk = buckets_alloc(MIN_BUCKETS, &self->bk_mem);
    if (!self->bk)
        return -1;
    self->nb = MIN_BUCKETS;
    self->free_head = NIL;
    self->free_rep = NIL;
    self->default_capacity = cap;
    return 0;
}

static void index_dealloc(IndexObject *self)
{
    for (uint32_t i = 0; i < self->n_reps; i++)
        Py_XDECREF(self->reps[i].id);
    PyMem_Free(self->entries);
    PyMem_Free(self->bk_mem);
    PyMem_Free(self->reps);
    PyMem_Free(self->scratch);
    PyMem_Free(self->run);
    Py_XDECREF(self->memo_chain);
    Py_XDECREF(self->idmap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define CHECK_INIT(self, ret)                                                     \
    do {                                                                          \
        if (UNLIKELY(!(self)->idmap)) {                                           \
            PyErr_SetString(PyExc_RuntimeError, "PrefixIndexC was not initialised"); \
            return ret;                                                           \
        }                                                                         \
    } while (0)

static PyObject *index_match(IndexObject *self, PyObject *hashes)
{
    CHECK_INIT(self, NULL);
    HashArg a;
    if (hasharg_get(hashes, &a) < 0)
        return NULL;
    PyObject *res = match_impl(self, a.h, a.n, Py_IS_TYPE(hashes, &ChainType) ? hashes : NULL);
    hasharg_release(&a);
    return res;
}

static PyObject *index_lookup(IndexObject *self, PyObject *args, PyObject *kwds)
{
    CHECK_INIT(self, NULL);
    static char *kwlist[] = {"data", "block_size", "seed", NULL};
    PyObject *data, *bs = NULL, *seed = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:lookup", kwlist, &data, &bs, &seed))
        return NULL;
    return lookup_impl(self, data, bs, seed);
}

static PyObject *index_insert(IndexObject *self, PyObject *args)
{
    CHECK_INIT(self, NULL);
    PyObject *rep_obj, *hashes;
    if (!PyArg_ParseTuple(args, "OO:insert", &rep_obj, &hashes))
        return NULL;
    HashArg a;
    if (hasharg_get(hashes, &a) < 0)
        return NULL;
    uint32_t rep = rep_get_or_create(self, rep_obj);
    int rc = rep == NIL ? -1 : insert_impl(self, rep, a.h, a.n, Py_IS_TYPE(hashes, &ChainType) ? hashes : NULL);
    hasharg_release(&a);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *index_remove_blocks(IndexObject *self, PyObject *args)
{
    CHECK_INIT(self, NULL);
    PyObject *rep_obj, *hashes;
    if (!PyArg_ParseTuple(args, "OO:remove_blocks", &rep_obj, &hashes))
        return NULL;
    uint32_t rep;
    if (rep_find(self, rep_obj, &rep) < 0)
        return NULL;
    if (rep == NIL)
        return PyLong_FromLong(0);
    HashArg a;
    if (hasharg_get(hashes, &a) < 0)
        return NULL;
    uint32_t removed = 0;
    for (Py_ssize_t k = 0; k < a.n; k++) {
        uint32_t slot = slot_find(self, a.h[k]);
        if (slot == NIL)
            continue;
        uint32_t e = hold_find(self, slot, rep);
        if (e == NIL)
            continue;
        entry_drop(self, rep, e);
        removed++;
    }
    hasharg_release(&a);
    return PyLong_FromUnsignedLong(removed);
}

static PyObject *index_clear_replica(IndexObject *self, PyObject *rep_obj)
{
    CHECK_INIT(self, NULL);
    uint32_t rep;
    if (rep_find(self, rep_obj, &rep) < 0)
        return NULL;
    if (rep == NIL)
        return PyLong_FromLong(0);
    uint32_t n = rep_clear(self, rep);
    table_maybe_shrink(self);
    return PyLong_FromUnsignedLong(n);
}

static PyObject *index_remove_replica(IndexObject *self, PyObject *rep_obj)
{
    CHECK_INIT(self, NULL);
    uint32_t rep;
    if (rep_find(self, rep_obj, &rep) < 0)
        return NULL;
    if (rep == NIL)
        return PyLong_FromLong(0);
    uint32_t n = rep_clear(self, rep);
    Replica *r = &self->reps[rep];
    if (PyDict_DelItem(self->idmap, r->id) < 0)
        return NULL;
    Py_CLEAR(r->id);
    r->next_free = self->free_rep;
    self->free_rep = rep;
    table_maybe_shrink(self);
    return PyLong_FromUnsignedLong(n);
}

static PyObject *index_set_capacity(IndexObject *self, PyObject *args)
{
    CHECK_INIT(self, NULL);
    PyObject *rep_obj, *cap_obj;
    if (!PyArg_ParseTuple(args, "OO:set_capacity", &rep_obj, &cap_obj))
        return NULL;
    uint32_t cap;
    if (parse_capacity(cap_obj, &cap) < 0)
        return NULL;
    uint32_t rep = rep_get_or_create(self, rep_obj);
    if (rep == NIL)
        return NULL;
    self->reps[rep].capacity = cap;
    while (self->reps[rep].count > cap)
        evict_one(self, rep);
    Py_RETURN_NONE;
}

static PyObject *index_blocks(IndexObject *self, PyObject *rep_obj)
{
    CHECK_INIT(self, NULL);
    uint32_t rep;
    if (rep_find(self, rep_obj, &rep) < 0)
        return NULL;
    if (rep == NIL)
        return PyList_New(0);
    Replica *r = &self->reps[rep];
    PyObject *list = PyList_New(r->count);
    if (!list)
        return NULL;
    Py_ssize_t i = 0;
    for (uint32_t e = r->lru_head; e != NIL; e = E(self, e)->lru_next, i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(E(self, e)->hash);
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static PyObject *index_replicas(IndexObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    return PyDict_Keys(self->idmap);
}

static PyObject *index_capacity(IndexObject *self, PyObject *rep_obj)
{
    CHECK_INIT(self, NULL);
    uint32_t rep;
    if (rep_find(self, rep_obj, &rep) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(rep == NIL ? self->default_capacity : self->reps[rep].capacity);
}

static size_t index_bytes(IndexObject *self)
{
    return sizeof(IndexObject) + (size_t)self->entries_cap * sizeof(Entry) + (size_t)self->nb * sizeof(Bucket) + 63u +
           (size_t)self->reps_cap * sizeof(Replica) + self->scratch_cap * sizeof(Matched) + self->run_cap * sizeof(uint32_t);
}

static PyObject *index_stats(IndexObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    PyObject *per = PyDict_New();
    if (!per)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *val;
    while (PyDict_Next(self->idmap, &pos, &key, &val)) {
        Replica *r = &self->reps[PyLong_AsUnsignedLong(val)];
        PyObject *d = Py_BuildValue("{sIsIsK}", "blocks", r->count, "capacity", r->capacity,
                                    "evictions", (unsigned long long)r->evictions);
        if (!d || PyDict_SetItem(per, key, d) < 0) {
            Py_XDECREF(d);
            Py_DECREF(per);
            return NULL;
        }
        Py_DECREF(d);
    }
    return Py_BuildValue("{sssnsKsKsKsnsIsN}", "implementation", "c", "replicas",
                         PyDict_GET_SIZE(self->idmap), "entries",
                         (unsigned long long)self->n_entries, "unique_blocks",
                         (unsigned long long)self->n_used, "evictions",
                         (unsigned long long)self->evictions, "bytes", (Py_ssize_t)index_bytes(self),
                         "capacity_blocks", self->default_capacity, "per_replica", per);
}

static Py_ssize_t index_len(IndexObject *self)
{
    return (Py_ssize_t)self->n_entries;
}

static int index_contains(IndexObject *self, PyObject *key)
{
    if (!self->idmap)
        return 0;
    return PyDict_Contains(self->idmap, key);
}

static PyObject *index_get_capacity_blocks(IndexObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->default_capacity);
}

static PyObject *index_get_native(IndexObject *self, void *Py_UNUSED(closure)) { Py_RETURN_TRUE; }

static PyMethodDef index_methods[] = {
    {"match", (PyCFunction)index_match, METH_O,
     "match(hashes) -> dict\n--\n\n{replica: leading blocks held} for replicas holding block 0; "
     "refreshes what it reports, tail first."},
    {"lookup", (PyCFunction)(void (*)(void))index_lookup, METH_VARARGS | METH_KEYWORDS,
     "lookup(data, block_size=64, seed=0) -> (Chain, dict)\n--\n\nHash data into its block "
     "chain and match it, in one call."},
    {"insert", (PyCFunction)index_insert, METH_VARARGS,
     "insert(replica, hashes)\n--\n\nRecord that replica now holds the whole chain (touched "
     "tail first, evicting its least recently used blocks beyond its capacity)."},
    {"remove_blocks", (PyCFunction)index_remove_blocks, METH_VARARGS,
     "remove_blocks(replica, hashes) -> int\n--\n\nForget the given blocks for replica."},
    {"clear_replica", (PyCFunction)index_clear_replica, METH_O,
     "clear_replica(replica) -> int\n--\n\nForget every block of replica, keeping it known."},
    {"remove_replica", (PyCFunction)index_remove_replica, METH_O,
     "remove_replica(replica) -> int\n--\n\nForget replica entirely."},
    {"set_capacity", (PyCFunction)index_set_capacity, METH_VARARGS,
     "set_capacity(replica, capacity_blocks)\n--\n\nBound replica, evicting beyond it."},
    {"blocks", (PyCFunction)index_blocks, METH_O,
     "blocks(replica) -> list\n--\n\nThe hashes replica holds, least recently used first."},
    {"replicas", (PyCFunction)index_replicas, METH_NOARGS,
     "replicas() -> list\n--\n\nKnown replica ids in first-seen order."},
    {"capacity", (PyCFunction)index_capacity, METH_O,
     "capacity(replica) -> int\n--\n\nThe replica's capacity in blocks."},
    {"stats", (PyCFunction)index_stats, METH_NOARGS,
     "stats() -> dict\n--\n\nBlocks per replica, evictions and bytes in use."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef index_getset[] = {
    {"capacity_blocks", (getter)index_get_capacity_blocks, NULL, "default capacity", NULL},
    {"native", (getter)index_get_native, NULL, "True: this is the C implementation", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods index_as_sequence = {
    .sq_length = (lenfunc)index_len,
    .sq_contains = (objobjproc)index_contains,
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prefixlb.index._native.PrefixIndexC",
    .tp_basicsize = sizeof(IndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PrefixIndexC(capacity_blocks)\n--\n\nPer-replica LRU sets of block hashes, "
              "matched by leading blocks (C implementation of prefixlb.index.PrefixIndexPy).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)index_init,
    .tp_dealloc = (destructor)index_dealloc,
    .tp_methods = index_methods,
    .tp_getset = index_getset,
    .tp_as_sequence = &index_as_sequence,
};

/* ===================================================================================== */
/* The cost model's scoring loop (prefixlb.routing.scoring is its Python twin)            */
/* ===================================================================================== */

/* Per-replica slab layout (doubles), written by ReplicaState._sync(). */
enum { F_BACKLOG = 1, F_BACKLOG_T, F_RATIO, F_CONTEXT, F_SCRAPED_AT, F_WAITING, F_RUNNING, F_KV,
       F_AVG_UNC, F_AVG_PROMPT, F_INFLIGHT, F_KV_ALLOC, F_KV_CAP, F_COUNT };

static int get_double(PyObject *o, double *out)
{
    *out = PyFloat_AsDouble(o);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* score(slab, candidates, matches, P, tpb, now, fixed, inv, kappa, mean_ratio, step_tokens,
 *       staleness, pressure_weight, tie, u[, out_tokens, duration, congestion]) -> (replica_id, cost, ttft, cached) */
static PyObject *mod_score(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 15 && nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "score() takes 15 or 18 arguments");
        return NULL;
    }
    double v[15] = {0};
    for (int i = 0; i < nargs - 3; i++)
        if (get_double(args[3 + i], &v[i]) < 0)
            return NULL;
    const double P = v[0], tpb = v[1], now = v[2], fixed = v[3], inv = v[4], kappa = v[5], mean_ratio = v[6],
                 step = v[7], stale = v[8], pw = v[9], tie = v[10], u = v[11], out_tokens = v[12], duration = v[13],
                 congestion = v[14];
    Py_buffer sb, cb;
    if (PyObject_GetBuffer(args[0], &sb, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (sb.itemsize != 8 || !sb.format || strcmp(sb.format, "d") != 0) {
        PyBuffer_Release(&sb);
        PyErr_SetString(PyExc_TypeError, "slab must be a buffer of doubles (array('d'))");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &cb, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&sb);
        return NULL;
    }
    PyObject *matches = args[2];
    PyObject *res = NULL;
    uint32_t *mid = NULL, *mval = NULL;
    double *cost = NULL;
    if (cb.itemsize != 4 || !cb.format || (strcmp(cb.format, "I") != 0 && strcmp(cb.format, "L") != 0 &&
                                           strcmp(cb.format, "=I") != 0)) {
        PyErr_SetString(PyExc_TypeError, "candidates must be a buffer of uint32 (array('I'))");
        goto done;
    }
    if (!PyDict_Check(matches)) {
        PyErr_SetString(PyExc_TypeError, "matches must be a dict");
        goto done;
    }
    const double *slab = sb.buf;
    const Py_ssize_t nslots = sb.len / (Py_ssize_t)(F_COUNT * sizeof(double));
    const uint32_t *cand = cb.buf;
    const Py_ssize_t nc = cb.len / 4;
    if (nc == 0) {
        PyErr_SetString(PyExc_ValueError, "no candidates");
        goto done;
    }
    /* the matched replicas (usually a handful): gather once, then search per candidate */
    Py_ssize_t nm = PyDict_GET_SIZE(matches), k = 0, pos = 0;
    PyObject *key, *val;
    mid = PyMem_Malloc((size_t)(nm ? nm : 1) * sizeof(uint32_t));
    mval = PyMem_Malloc((size_t)(nm ? nm : 1) * sizeof(uint32_t));
    cost = PyMem_Malloc((size_t)nc * sizeof(double) * 4);
    if (!mid || !mval || !cost) {
        PyErr_NoMemory();
        goto done;
    }
    while (PyDict_Next(matches, &pos, &key, &val)) {
        unsigned long a = PyLong_AsUnsignedLong(key), b = PyLong_AsUnsignedLong(val);
        if (PyErr_Occurred())
            goto done;
        mid[k] = (uint32_t)a;
        mval[k] = (uint32_t)b;
        k++;
    }
    double *ttft = cost + nc, *cached = cost + 2 * nc, *load = cost + 3 * nc;
    double best = INFINITY;
    for (Py_ssize_t i = 0; i < nc; i++) {
        uint32_t id = cand[i];
        if ((Py_ssize_t)id >= nslots) {
            PyErr_Format(PyExc_IndexError, "replica %u is outside the slab", id);
            goto done;
        }
        const double *f = slab + (size_t)id * F_COUNT;
        uint32_t m = 0;
        for (Py_ssize_t j = 0; j < k; j++)
            if (mid[j] == id) {
                m = mval[j];
                break;
            }
        double c = 0.0;
        if (m) {
            c = m * tpb;
            if (c > P - 1.0)
                c = P - 1.0;
        }
        double uncached = P - c;
        double ratio = f[F_RATIO] >= 0.0 ? f[F_RATIO] : mean_ratio;
        double invr = inv * ratio;
        double dt = now - f[F_BACKLOG_T];
        double own = dt > 0.0 ? f[F_BACKLOG] - dt / invr : f[F_BACKLOG];
        if (own < 0.0)
            own = 0.0;
        double n = f[F_INFLIGHT], ctx = f[F_CONTEXT];
        double age = now - f[F_SCRAPED_AT];
        if (age <= 8.0 * stale) {
            double w = exp(-(age > 0.0 ? age : 0.0) / stale);
            double own_wait = f[F_INFLIGHT] < own / f[F_AVG_UNC] ? f[F_INFLIGHT] : own / f[F_AVG_UNC];
            double extra_wait = f[F_WAITING] - own_wait;
            if (extra_wait > 0.0)
                own += w * extra_wait * f[F_AVG_UNC];
            double extra_seqs = f[F_RUNNING] + f[F_WAITING] - f[F_INFLIGHT];
            if (extra_seqs > 0.0) {
                n += w * extra_seqs;
                ctx += w * extra_seqs * f[F_AVG_PROMPT];
            }
        }
        double work = own + uncached;
        double steps = work > 0.0 ? ceil(work / step) : 1.0;
        double t = ratio * (fixed + inv * (work + steps * (n + kappa * ctx)));
        double alloc = f[F_KV_ALLOC], cap = f[F_KV_CAP];
        if (cap > 0.0 && alloc > 0.0) {
            double over = alloc + uncached + out_tokens - cap;
            if (over > 0.0)
                t += (over / alloc < 1.0 ? over / alloc : 1.0) * duration;
        }
        double total = t;
        if (pw != 0.0 && f[F_KV] != 0.0)
            total += pw * uncached * f[F_KV] * invr;
        if (congestion != 0.0)
            total += congestion * uncached * invr;
        cost[i] = total;
        ttft[i] = t;
        cached[i] = c;
        load[i] = t / ratio;
        if (total < best)
            best = total;
    }
    /* ties: costs within `tie` of the best; among them the longest match, then the least load
     * (the predicted TTFT with the replica's learned speed ratio divided out); then `u` picks */
    double limit = best * (1.0 + tie) + 1e-9, longest = -1.0;
    Py_ssize_t nt = 0;
    for (Py_ssize_t i = 0; i < nc; i++)
        if (cost[i] <= limit) {
            nt++;
            if (cached[i] > longest)
                longest = cached[i];
        }
    Py_ssize_t chosen = -1;
    if (nt == 1) {
        for (Py_ssize_t i = 0; i < nc && chosen < 0; i++)
            if (cost[i] <= limit)
                chosen = i;
    } else {
        double least = INFINITY;
        for (Py_ssize_t i = 0; i < nc; i++)
            if (cost[i] <= limit && cached[i] == longest && load[i] < least)
                least = load[i];
        Py_ssize_t nl = 0;
        for (Py_ssize_t i = 0; i < nc; i++)
            if (cost[i] <= limit && cached[i] == longest && load[i] == least)
                nl++;
        Py_ssize_t pick = nl > 1 ? (Py_ssize_t)(u * (double)nl) : 0;
        if (pick >= nl)
            pick = nl - 1;
        for (Py_ssize_t i = 0; i < nc; i++)
            if (cost[i] <= limit && cached[i] == longest && load[i] == least && pick-- == 0) {
                chosen = i;
                break;
            }
    }
    res = Py_BuildValue("(Iddd)", cand[chosen], cost[chosen], ttft[chosen], cached[chosen]);
done:
    PyMem_Free(mid);
    PyMem_Free(mval);
    PyMem_Free(cost);
    PyBuffer_Release(&cb);
    PyBuffer_Release(&sb);
    return res;
}

/* ===================================================================================== */
/* Module functions                                                                      */
/* ===================================================================================== */

static PyObject *mod_block_hashes(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "block_size", "seed", NULL};
    PyObject *data, *bs = NULL, *seed = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:block_hashes", kwlist, &data, &bs, &seed))
        return NULL;
    ChainObject *c = chain_from_data(data, bs, seed);
    if (!c)
        return NULL;
    PyObject *list = chain_tolist(c, NULL);
    Py_DECREF(c);
    return list;
}

static PyObject *mod_chain(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "block_size", "seed", NULL};
    PyObject *data, *bs = NULL, *seed = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:chain", kwlist, &data, &bs, &seed))
        return NULL;
    return (PyObject *)chain_from_data(data, bs, seed);
}

static PyObject *mod_xxh64(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "seed", NULL};
    Py_buffer view;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|K:xxh64", kwlist, &view, &seed))
        return NULL;
    uint64_t h = plb_xxh64(view.buf, (size_t)view.len, (uint64_t)seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef module_methods[] = {
    {"block_hashes", (PyCFunction)(void (*)(void))mod_block_hashes, METH_VARARGS | METH_KEYWORDS,
     "block_hashes(data, block_size=64, seed=0) -> list[int]\n--\n\nChained XXH64 of each full "
     "block: h[i] = XXH64(block_i, seed=h[i-1]), h[-1] = seed."},
    {"chain", (PyCFunction)(void (*)(void))mod_chain, METH_VARARGS | METH_KEYWORDS,
     "chain(data, block_size=64, seed=0) -> Chain\n--\n\nThe same chain as a compact Chain."},
    {"score", (PyCFunction)(void (*)(void))mod_score, METH_FASTCALL,
     "score(slab, candidates, matches, P, tpb, now, fixed, inv, kappa, mean_ratio, step_tokens, staleness, "
     "pressure_weight, tie, u[, out_tokens, duration, congestion]) -> (replica, cost, ttft, cached)\n--\n\nThe cache_aware cost model over every "
     "candidate (prefixlb.routing.scoring.score_py is the reference)."},
    {"xxh64", (PyCFunction)(void (*)(void))mod_xxh64, METH_VARARGS | METH_KEYWORDS,
     "xxh64(data, seed=0) -> int\n--\n\nOne-shot XXH64 (exposed for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "prefixlb.index._native",
    .m_doc = "C implementation of prefixlb's block-hash chain and prefix index.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&ChainType) < 0 || PyType_Ready(&IndexType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Chain", (PyObject *)&ChainType) < 0 ||
        PyModule_AddObjectRef(m, "PrefixIndexC", (PyObject *)&IndexType) < 0 ||
        PyModule_AddIntConstant(m, "ENTRY_BYTES", (long)sizeof(Entry)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
