/* prefixlb.routing.classifier._tiernet: the tier classifier's forward pass in C.
 *
 * The behaviour is specified by TierClassifier._probs_reference in
 * prefixlb/routing/classifier/model.py (numpy); tests require both to agree to float rounding.
 * numpy pays a microsecond or more per array operation and the forward pass is ~25 of them, so
 * on a short prompt the reference costs ~20 us; this costs ~1 us plus ~G flops per token.
 *
 *   g   = group_bias + mean over tokens of group_table[id]          (G)
 *   P   = softmax(g)
 *   z   = ((P @ rates) ++ features - feat_mean) * inv_std           (D = K1 + F)
 *   h   = relu(w1 @ z + b1)                                         (H)
 *   p   = running min of sigmoid(w2 @ h + b2)                       (K1 = tiers - 1)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    Py_ssize_t V, G, K1, D, H;
    float *table;  /* V x G */
    double *gbias; /* G */
    double *rates; /* G x K1 */
    double *mu;    /* D */
    double *isd;   /* D: 1 / feat_std */
    double *w1;    /* H x D */
    double *b1;    /* H */
    double *w2;    /* K1 x H */
    double *b2;    /* K1 */
    double *work;  /* G + D + H */
} TierNetObject;

/* Copy a C-contiguous buffer of `ndim` dimensions (format f or d) into a new array of `want`
 * ('f' or 'd'); its shape goes to shape[]. */
static void *take(PyObject *obj, const char *name, int ndim, char want, Py_ssize_t *shape)
{
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    void *out = NULL;
    const char *fmt = v.format ? v.format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@')
        fmt++;
    char have = fmt[1] == '\0' ? fmt[0] : '?';
    if (v.ndim != ndim || (have != 'f' && have != 'd')) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-d float32/float64 array", name, ndim);
        goto done;
    }
    Py_ssize_t n = 1;
    for (int i = 0; i < ndim; i++) {
        shape[i] = v.shape[i];
        n *= v.shape[i];
    }
    out = PyMem_Malloc((size_t)(n ? n : 1) * (want == 'f' ? sizeof(float) : sizeof(double)));
    if (!out) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double x = have == 'f' ? (double)((const float *)v.buf)[i] : ((const double *)v.buf)[i];
        if (want == 'f')
            ((float *)out)[i] = (float)x;
        else
            ((double *)out)[i] = x;
    }
done:
    PyBuffer_Release(&v);
    return out;
}

static void tiernet_free_arrays(TierNetObject *s)
{
    PyMem_Free(s->table);
    PyMem_Free(s->gbias);
    PyMem_Free(s->rates);
    PyMem_Free(s->mu);
    PyMem_Free(s->isd);
    PyMem_Free(s->w1);
    PyMem_Free(s->b1);
    PyMem_Free(s->w2);
    PyMem_Free(s->b2);
    PyMem_Free(s->work);
    s->table = NULL;
    s->gbias = s->rates = s->mu = s->isd = s->w1 = s->b1 = s->w2 = s->b2 = s->work = NULL;
}

static int tiernet_init(TierNetObject *s, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"group_table", "group_bias", "rates", "feat_mean", "feat_std",
                         "w1", "b1", "w2", "b2", NULL};
    PyObject *o[9];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOO:TierNet", kw, &o[0], &o[1], &o[2], &o[3],
                                     &o[4], &o[5], &o[6], &o[7], &o[8]))
        return -1;
    tiernet_free_arrays(s);
    Py_ssize_t t[2], gb[1], r[2], mu[1], sd[1], w1[2], b1[1], w2[2], b2[1];
    s->table = take(o[0], "group_table", 2, 'f', t);
    s->gbias = s->table ? take(o[1], "group_bias", 1, 'd', gb) : NULL;
    s->rates = s->gbias ? take(o[2], "rates", 2, 'd', r) : NULL;
    s->mu = s->rates ? take(o[3], "feat_mean", 1, 'd', mu) : NULL;
    s->isd = s->mu ? take(o[4], "feat_std", 1, 'd', sd) : NULL;
    s->w1 = s->isd ? take(o[5], "w1", 2, 'd', w1) : NULL;
    s->b1 = s->w1 ? take(o[6], "b1", 1, 'd', b1) : NULL;
    s->w2 = s->b1 ? take(o[7], "w2", 2, 'd', w2) : NULL;
    s->b2 = s->w2 ? take(o[8], "b2", 1, 'd', b2) : NULL;
    if (!s->b2)
        goto fail;
    s->V = t[0];
    s->G = t[1];
    s->K1 = r[1];
    s->D = mu[0];
    s->H = w1[0];
    if (s->G < 1 || gb[0] != s->G || r[0] != s->G || s->K1 < 1 || sd[0] != s->D || s->D < s->K1 ||
        w1[1] != s->D || b1[0] != s->H || w2[0] != s->K1 || w2[1] != s->H || b2[0] != s->K1) {
        PyErr_SetString(PyExc_ValueError, "TierNet: the arrays' shapes do not fit together");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < s->D; i++) {
        if (!(s->isd[i] != 0.0)) {
            PyErr_SetString(PyExc_ValueError, "feat_std: must not be zero");
            goto fail;
        }
        s->isd[i] = 1.0 / s->isd[i];
    }
    s->work = PyMem_Malloc((size_t)(s->G + s->D + s->H) * sizeof(double));
    if (!s->work) {
        PyErr_NoMemory();
        goto fail;
    }
    return 0;
fail:
    tiernet_free_arrays(s);
    return -1;
}

static void tiernet_dealloc(TierNetObject *s)
{
    tiernet_free_arrays(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* probs(ids, features) -> tuple of K1 floats: p[k] = P(a tier above k is needed). */
static PyObject *tiernet_probs(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (!s->work) {
        PyErr_SetString(PyExc_RuntimeError, "TierNet was not initialised");
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "probs(ids, features) takes 2 arguments");
        return NULL;
    }
    const Py_ssize_t G = s->G, K1 = s->K1, D = s->D, H = s->H, F = D - K1;
    double *g = s->work, *z = g + G, *h = z + D;
    PyObject *ids = PySequence_Fast(args[0], "ids must be a sequence of ints");
    if (!ids)
        return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    PyObject **items = PySequence_Fast_ITEMS(ids);
    for (Py_ssize_t j = 0; j < G; j++)
        g[j] = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        long id = PyLong_AsLong(items[i]);
        if (id < 0 || id >= s->V) {
            Py_DECREF(ids);
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "token id %ld is outside the vocabulary (%zd)", id, s->V);
            return NULL;
        }
        const float *row = s->table + (size_t)id * (size_t)G;
        for (Py_ssize_t j = 0; j < G; j++)
            g[j] += row[j];
    }
    Py_DECREF(ids);
    const double inv_n = n ? 1.0 / (double)n : 0.0;
    double m = -INFINITY;
    for (Py_ssize_t j = 0; j < G; j++) {
        g[j] = g[j] * inv_n + s->gbias[j];
        if (g[j] > m)
            m = g[j];
    }
    double tot = 0.0;
    for (Py_ssize_t j = 0; j < G; j++) {
        g[j] = exp(g[j] - m);
        tot += g[j];
    }
    for (Py_ssize_t k = 0; k < K1; k++) {
        double acc = 0.0;
        for (Py_ssize_t j = 0; j < G; j++)
            acc += g[j] * s->rates[j * K1 + k];
        z[k] = acc / tot;
    }
    PyObject *feats = PySequence_Fast(args[1], "features must be a sequence of floats");
    if (!feats)
        return NULL;
    if (PySequence_Fast_GET_SIZE(feats) != F) {
        PyErr_Format(PyExc_ValueError, "expected %zd features, got %zd", F, PySequence_Fast_GET_SIZE(feats));
        Py_DECREF(feats);
        return NULL;
    }
    PyObject **fi = PySequence_Fast_ITEMS(feats);
    for (Py_ssize_t f = 0; f < F; f++) {
        double x = PyFloat_AsDouble(fi[f]);
        if (x == -1.0 && PyErr_Occurred()) {
            Py_DECREF(feats);
            return NULL;
        }
        z[K1 + f] = x;
    }
    Py_DECREF(feats);
    for (Py_ssize_t d = 0; d < D; d++)
        z[d] = (z[d] - s->mu[d]) * s->isd[d];
    for (Py_ssize_t u = 0; u < H; u++) {
        const double *w = s->w1 + u * D;
        double acc = 0.0;
        for (Py_ssize_t d = 0; d < D; d++)
            acc += w[d] * z[d];
        acc += s->b1[u];
        h[u] = acc > 0.0 ? acc : 0.0;
    }
    PyObject *out = PyTuple_New(K1);
    if (!out)
        return NULL;
    double lo = INFINITY;
    for (Py_ssize_t k = 0; k < K1; k++) {
        const double *w = s->w2 + k * H;
        double acc = 0.0;
        for (Py_ssize_t u = 0; u < H; u++)
            acc += w[u] * h[u];
        acc += s->b2[k];
        double p = 1.0 / (1.0 + exp(-acc));
        if (p < lo)
            lo = p;
        PyObject *v = PyFloat_FromDouble(lo);
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, k, v);
    }
    return out;
}

static PyObject *tiernet_get_shape(TierNetObject *s, void *closure)
{
    return Py_BuildValue("{snsnsnsnsn}", "vocab", s->V, "groups", s->G, "outputs", s->K1, "inputs", s->D,
                         "hidden", s->H);
}

static PyMethodDef tiernet_methods[] = {
    {"probs", (PyCFunction)(void (*)(void))tiernet_probs, METH_FASTCALL,
     "probs(ids, features) -> tuple: P(a tier above k is needed), non-increasing in k."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tiernet_getset[] = {
    {"shape", (getter)tiernet_get_shape, NULL, "sizes of the network", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TierNetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prefixlb.routing.classifier._tiernet.TierNet",
    .tp_basicsize = sizeof(TierNetObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The tier classifier's forward pass (see prefixlb/routing/classifier/model.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tiernet_init,
    .tp_dealloc = (destructor)tiernet_dealloc,
    .tp_methods = tiernet_methods,
    .tp_getset = tiernet_getset,
};

static struct PyModuleDef tiernet_module = {
    PyModuleDef_HEAD_INIT, "prefixlb.routing.classifier._tiernet",
    "The tier classifier's forward pass in C.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tiernet(void)
{
    if (PyType_Ready(&TierNetType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&tiernet_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "TierNet", (PyObject *)&TierNetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
