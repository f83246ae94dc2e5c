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
#include <stdint.h>

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
    /* the WordPiece vocabulary (set_vocab): open-addressed table of byte strings -> id */
    char *vtext;        /* the tokens, back to back */
    uint32_t *voff;     /* token i is vtext[voff[i] .. voff[i + 1]) */
    int32_t *vslot;     /* table: token index + 1, 0 = empty */
    size_t vbits;
    long unk;
    int32_t *ids;       /* featurize scratch */
    size_t ids_cap;
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

static void vocab_clear(TierNetObject *s)
{
    PyMem_Free(s->vtext);
    PyMem_Free(s->voff);
    PyMem_Free(s->vslot);
    s->vtext = NULL;
    s->voff = NULL;
    s->vslot = NULL;
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
    PyMem_Free(s->ids);
    vocab_clear(s);
    s->ids = NULL;
    s->ids_cap = 0;
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

static inline double dot(const double *a, const double *b, Py_ssize_t n)
{
    double acc = 0.0;
    for (Py_ssize_t i = 0; i < n; i++)
        acc += a[i] * b[i];
    return acc;
}

/* The forward pass from token ids and features; the result as a tuple of K1 floats. */
static PyObject *forward(TierNetObject *s, const int32_t *ids, Py_ssize_t n, const double *feats)
{
    const Py_ssize_t G = s->G, K1 = s->K1, D = s->D, H = s->H, F = D - K1;
    double *g = s->work, *z = g + G, *h = z + D;
    for (Py_ssize_t j = 0; j < G; j++)
        g[j] = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *row = s->table + (size_t)ids[i] * (size_t)G;
        for (Py_ssize_t j = 0; j < G; j++)
            g[j] += row[j];
    }
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
    for (Py_ssize_t f = 0; f < F; f++)
        z[K1 + f] = feats[f];
    for (Py_ssize_t d = 0; d < D; d++)
        z[d] = (z[d] - s->mu[d]) * s->isd[d];
    for (Py_ssize_t u = 0; u < H; u++) {
        const double acc = dot(s->w1 + u * D, z, D) + s->b1[u];
        h[u] = acc > 0.0 ? acc : 0.0;
    }
    PyObject *out = PyTuple_New(K1);
    if (!out)
        return NULL;
    double lo = INFINITY;
    for (Py_ssize_t k = 0; k < K1; k++) {
        const double p = 1.0 / (1.0 + exp(-(dot(s->w2 + k * H, h, H) + s->b2[k])));
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

static int ids_reserve(TierNetObject *s, size_t n)
{
    if (n <= s->ids_cap)
        return 0;
    size_t cap = s->ids_cap ? s->ids_cap : 256;
    while (cap < n)
        cap *= 2;
    int32_t *p = PyMem_Realloc(s->ids, cap * sizeof(int32_t));
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    s->ids = p;
    s->ids_cap = cap;
    return 0;
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
    const Py_ssize_t F = s->D - s->K1;
    PyObject *ids = PySequence_Fast(args[0], "ids must be a sequence of ints");
    if (!ids)
        return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    PyObject **items = PySequence_Fast_ITEMS(ids);
    if (ids_reserve(s, (size_t)n) < 0) {
        Py_DECREF(ids);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long id = PyLong_AsLong(items[i]);
        if (id < 0 || id >= s->V) {
            Py_DECREF(ids);
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "token id %ld is outside the vocabulary (%zd)", id, s->V);
            return NULL;
        }
        s->ids[i] = (int32_t)id;
    }
    Py_DECREF(ids);
    PyObject *feats = PySequence_Fast(args[1], "features must be a sequence of floats");
    if (!feats)
        return NULL;
    if (PySequence_Fast_GET_SIZE(feats) != F) {
        PyErr_Format(PyExc_ValueError, "expected %zd features, got %zd", F, PySequence_Fast_GET_SIZE(feats));
        Py_DECREF(feats);
        return NULL;
    }
    double fv[64];
    double *fp = F <= 64 ? fv : PyMem_Malloc((size_t)F * sizeof(double));
    if (!fp) {
        Py_DECREF(feats);
        return PyErr_NoMemory();
    }
    PyObject **fi = PySequence_Fast_ITEMS(feats);
    for (Py_ssize_t f = 0; f < F; f++) {
        fp[f] = PyFloat_AsDouble(fi[f]);
        if (fp[f] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(feats);
            if (fp != fv)
                PyMem_Free(fp);
            return NULL;
        }
    }
    Py_DECREF(feats);
    PyObject *out = forward(s, s->ids, n, fp);
    if (fp != fv)
        PyMem_Free(fp);
    return out;
}

/* ===================================================================================== */
/* The featuriser's ASCII fast path: WordPiece ids and request features in one pass.     */
/* Specified by prefixlb/routing/classifier/tokenize.py (WordPiece.words, encode_words)   */
/* and features.py (request_features); tests require identical ids and bit-identical     */
/* features on ASCII prompts. Anything else goes to the Python path.                     */
/* ===================================================================================== */

#define MAX_WORD 100 /* tokenize.py's _MAX_WORD */

static uint64_t span_hash(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

/* set_vocab(tokens, unk_id): the WordPiece vocabulary, in order (a repeated token keeps its
 * last index, as the Python dict does). */
static PyObject *tiernet_set_vocab(TierNetObject *s, PyObject *args)
{
    PyObject *tokens;
    long unk;
    if (!PyArg_ParseTuple(args, "Ol:set_vocab", &tokens, &unk))
        return NULL;
    PyObject *seq = PySequence_Fast(tokens, "tokens must be a sequence of str");
    if (!seq)
        return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || unk < 0 || unk >= n) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "set_vocab: an empty vocabulary or an unk id outside it");
        return NULL;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        if (!PyUnicode_Check(PySequence_Fast_GET_ITEM(seq, i)) ||
            !PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &len)) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "tokens must be str");
            return NULL;
        }
        total += (size_t)len;
    }
    size_t bits = 4;
    while (((size_t)1 << bits) < 2 * (size_t)n)
        bits++;
    char *text = PyMem_Malloc(total ? total : 1);
    uint32_t *off = PyMem_Malloc(((size_t)n + 1) * sizeof(uint32_t));
    int32_t *slot = PyMem_Calloc((size_t)1 << bits, sizeof(int32_t));
    if (!text || !off || !slot || total > UINT32_MAX) {
        PyMem_Free(text);
        PyMem_Free(off);
        PyMem_Free(slot);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    size_t at = 0;
    const size_t mask = ((size_t)1 << bits) - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *t = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &len);
        off[i] = (uint32_t)at;
        memcpy(text + at, t, (size_t)len);
        size_t j = span_hash(t, (size_t)len) & mask;
        for (;;) {
            int32_t v = slot[j];
            if (v == 0) {
                slot[j] = (int32_t)i + 1;
                break;
            }
            const size_t o = off[v - 1], l = off[v] - o;
            if (l == (size_t)len && memcmp(text + o, t, l) == 0) {
                slot[j] = (int32_t)i + 1; /* a repeated token: the last index wins */
                break;
            }
            j = (j + 1) & mask;
        }
        at += (size_t)len;
        off[i + 1] = (uint32_t)at;
    }
    Py_DECREF(seq);
    vocab_clear(s);
    s->vtext = text;
    s->voff = off;
    s->vslot = slot;
    s->vbits = bits;
    s->unk = unk;
    Py_RETURN_NONE;
}

/* The id of the token whose bytes are `p` (optionally after "##"), or -1. */
static long vocab_id(const TierNetObject *s, const char *p, size_t n, int cont)
{
    char buf[MAX_WORD + 3];
    if (cont) {
        buf[0] = buf[1] = '#';
        memcpy(buf + 2, p, n);
        p = buf;
        n += 2;
    }
    const size_t mask = ((size_t)1 << s->vbits) - 1;
    size_t j = span_hash(p, n) & mask;
    for (;;) {
        int32_t v = s->vslot[j];
        if (v == 0)
            return -1;
        const size_t o = s->voff[v - 1], l = s->voff[v] - o;
        if (l == n && memcmp(s->vtext + o, p, n) == 0)
            return (long)(s->vslot[j] - 1);
        j = (j + 1) & mask;
    }
}

static inline int is_space(unsigned char c) /* str.isspace() on ASCII */
{
    return c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
}

static inline int is_alnum(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }
static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static inline int is_wordch(unsigned char c) { return is_alnum(c) || c == '_'; } /* regex \w */

static Py_ssize_t find(const char *h, Py_ssize_t hn, const char *nd)
{
    const size_t nn = strlen(nd);
    if ((size_t)hn < nn)
        return -1;
    for (Py_ssize_t i = 0; i + (Py_ssize_t)nn <= hn; i++)
        if (h[i] == nd[0] && memcmp(h + i, nd, nn) == 0)
            return i;
    return -1;
}

static Py_ssize_t rfind(const char *h, Py_ssize_t hn, const char *nd)
{
    const Py_ssize_t nn = (Py_ssize_t)strlen(nd);
    for (Py_ssize_t i = hn - nn; i >= 0; i--)
        if (h[i] == nd[0] && memcmp(h + i, nd, (size_t)nn) == 0)
            return i;
    return -1;
}

static Py_ssize_t count(const char *h, Py_ssize_t hn, const char *nd) /* str.count: non-overlapping */
{
    const Py_ssize_t nn = (Py_ssize_t)strlen(nd);
    Py_ssize_t c = 0;
    for (Py_ssize_t i = 0; i + nn <= hn;) {
        if (h[i] == nd[0] && memcmp(h + i, nd, (size_t)nn) == 0) {
            c++;
            i += nn;
        } else {
            i++;
        }
    }
    return c;
}

static Py_ssize_t rstripped(const char *p, Py_ssize_t n)
{
    while (n > 0 && is_space((unsigned char)p[n - 1]))
        n--;
    return n;
}

/* re.search(r"\b(?:not|except|least|false|incorrect)\b", t) on ASCII text */
static int negated(const char *t, Py_ssize_t n)
{
    static const char *const words[] = {"not", "except", "least", "false", "incorrect"};
    for (int w = 0; w < 5; w++) {
        const Py_ssize_t L = (Py_ssize_t)strlen(words[w]);
        for (Py_ssize_t i = 0; i + L <= n; i++) {
            if (t[i] != words[w][0] || memcmp(t + i, words[w], (size_t)L) != 0)
                continue;
            if ((i == 0 || !is_wordch((unsigned char)t[i - 1])) && (i + L == n || !is_wordch((unsigned char)t[i + L])))
                return 1;
        }
    }
    return 0;
}

typedef struct {
    const char *p;
    Py_ssize_t n;
} Span;

/* len(set(spans)) */
static Py_ssize_t distinct(const Span *sp, Py_ssize_t k, size_t *tab, size_t tab_bits)
{
    const size_t mask = ((size_t)1 << tab_bits) - 1;
    memset(tab, 0, ((size_t)1 << tab_bits) * sizeof(size_t));
    Py_ssize_t d = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        size_t j = span_hash(sp[i].p, (size_t)sp[i].n) & mask;
        for (;;) {
            size_t v = tab[j];
            if (v == 0) {
                tab[j] = (size_t)i + 1;
                d++;
                break;
            }
            const Span *o = &sp[v - 1];
            if (o->n == sp[i].n && memcmp(o->p, sp[i].p, (size_t)o->n) == 0)
                break;
            j = (j + 1) & mask;
        }
    }
    return d;
}

#define N_FEATURES 22

/* ids (into s->ids, *n_ids) and features (feats[N_FEATURES]) of an ASCII prompt P[0..n);
 * -1 with an exception set on error. */
static int featurize_ascii(TierNetObject *s, const char *P, Py_ssize_t n, Py_ssize_t text_cap,
                           Py_ssize_t *n_ids, double *feats)
{
    int rc = -1;
    char *low = PyMem_Malloc((size_t)n + 1);
    Span *words = PyMem_Malloc(((size_t)n + 1) * sizeof(Span));
    Span *nums = PyMem_Malloc(((size_t)n + 1) * sizeof(Span));
    size_t tab_bits = 4;
    while (((size_t)1 << tab_bits) < 2 * ((size_t)n + 1))
        tab_bits++;
    size_t *tab = PyMem_Malloc(((size_t)1 << tab_bits) * sizeof(size_t));
    if (!low || !words || !nums || !tab) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)P[i];
        low[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    /* WordPiece.words(prompt[:text_cap]): runs of letters/digits, or one non-space character */
    const Py_ssize_t tn = n < text_cap ? n : (text_cap > 0 ? text_cap : 0);
    Py_ssize_t nw = 0, nn = 0, math = 0, numlen = 0, numlen_max = 0;
    for (Py_ssize_t i = 0; i < tn;) {
        unsigned char c = (unsigned char)low[i];
        if (is_space(c)) {
            i++;
            continue;
        }
        Py_ssize_t j = i + 1;
        if (is_alnum(c))
            while (j < tn && is_alnum((unsigned char)low[j]))
                j++;
        words[nw].p = low + i;
        words[nw].n = j - i;
        int digits = 1;
        for (Py_ssize_t k = i; k < j; k++)
            digits &= is_digit((unsigned char)low[k]);
        if (digits) {
            nums[nn++] = words[nw];
            numlen += j - i;
            if (j - i > numlen_max)
                numlen_max = j - i;
        }
        if (j - i == 1 && c != 0 && strchr("+-*/=^$%<>", c) != NULL)
            math++;
        nw++;
        i = j;
    }
    /* encode_words: greedy longest pieces; a word with an unmatched rest is one [UNK] */
    *n_ids = 0;
    for (Py_ssize_t w = 0; w < nw; w++) {
        const char *wp = words[w].p;
        const Py_ssize_t wl = words[w].n;
        if (ids_reserve(s, (size_t)(*n_ids + wl + 1)) < 0)
            goto done;
        if (wl > MAX_WORD) {
            s->ids[(*n_ids)++] = (int32_t)s->unk;
            continue;
        }
        Py_ssize_t at = *n_ids, start = 0;
        int ok = 1;
        while (start < wl) {
            Py_ssize_t end = wl;
            long found = -1;
            while (start < end) {
                found = vocab_id(s, wp + start, (size_t)(end - start), start > 0);
                if (found >= 0)
                    break;
                end--;
            }
            if (found < 0) {
                ok = 0;
                break;
            }
            s->ids[at++] = (int32_t)found;
            start = end;
        }
        if (ok)
            *n_ids = at;
        else
            s->ids[(*n_ids)++] = (int32_t)s->unk;
    }
    /* request_features */
    static const char *const marks[4] = {"\nA. ", "\nB. ", "\nC. ", "\nD. "};
    const Py_ssize_t a = find(P, n, marks[0]);
    int mc = 0;
    if (a >= 0) {
        const Py_ssize_t r = rstripped(P, n);
        mc = r >= 7 && memcmp(P + r - 7, "Answer:", 7) == 0 && find(P + a, n - a, marks[1]) >= 0 &&
             find(P + a, n - a, marks[2]) >= 0 && find(P + a, n - a, marks[3]) >= 0;
    }
    const Py_ssize_t qn = mc ? a : n;
    const char *rest = P + qn;
    const Py_ssize_t rn = mc ? n - a : 0;
    Py_ssize_t ol[4], nol = 0, ol_sum = 0, ol_min = 0, ol_max = 0, numeric = 0;
    if (mc) {
        Py_ssize_t cuts[5];
        for (int m = 0; m < 4; m++)
            cuts[m] = find(rest, rn, marks[m]);
        cuts[4] = rfind(rest, rn, "\nAnswer:");
        for (int m = 0; m < 4; m++) {
            if (!(0 <= cuts[m] && cuts[m] < cuts[m + 1]))
                continue;
            const char *op = rest + cuts[m] + 4;
            Py_ssize_t len = cuts[m + 1] - (cuts[m] + 4);
            if (len < 0)
                len = 0;
            ol[nol++] = len;
            Py_ssize_t digits = 0, lo = 0, hi = len;
            for (Py_ssize_t k = 0; k < len; k++)
                digits += is_digit((unsigned char)op[k]);
            while (lo < hi && is_space((unsigned char)op[lo]))
                lo++;
            while (hi > lo && is_space((unsigned char)op[hi - 1]))
                hi--;
            numeric += digits > 0 && digits * 2 >= hi - lo;
        }
        for (Py_ssize_t k = 0; k < nol; k++) {
            ol_sum += ol[k];
            if (k == 0 || ol[k] < ol_min)
                ol_min = ol[k];
            if (k == 0 || ol[k] > ol_max)
                ol_max = ol[k];
        }
    }
    const char *ql = low; /* pl[:len(q)] */
    const Py_ssize_t qr = rstripped(ql, qn);
    const char last = qr > 0 ? ql[qr - 1] : '\0';
    const Py_ssize_t sentences = count(ql, qn, ". ") + count(ql, qn, "? ") + count(ql, qn, "! ") +
                                 (last == '.' || last == '?' || last == '!');
    static const char *const above[6] = {"all of the above", "none of the above", "both of the above",
                                         "all of the following", "none of the following", "both of the following"};
    int any_above = 0;
    for (int k = 0; k < 6 && !any_above; k++)
        any_above = find(low, n, above[k]) >= 0;
    Py_ssize_t q_numbers;
    if (mc) { /* len(set(re.findall(r"\d+", q))) */
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < qn;) {
            if (!is_digit((unsigned char)P[i])) {
                i++;
                continue;
            }
            Py_ssize_t j = i + 1;
            while (j < qn && is_digit((unsigned char)P[j]))
                j++;
            words[k].p = P + i; /* the word spans are no longer needed: reuse them */
            words[k].n = j - i;
            k++;
            i = j;
        }
        q_numbers = distinct(words, k, tab, tab_bits);
    }
    const Py_ssize_t distinct_nums = distinct(nums, nn, tab, tab_bits);
    if (!mc)
        q_numbers = distinct_nums;
    feats[0] = log1p((double)n);
    feats[1] = log1p((double)nw);
    feats[2] = (double)numlen / (double)(n > 1 ? n : 1);
    feats[3] = log1p((double)nn);
    feats[4] = log1p((double)numlen_max);
    feats[5] = mc ? 1.0 : 0.0;
    feats[6] = log1p((double)qn);
    feats[7] = log1p((double)rn);
    feats[8] = find(P, n, "Statement 1") >= 0 ? 1.0 : 0.0;
    feats[9] = log1p((double)math);
    feats[10] = log1p((double)count(P, n, "?"));
    feats[11] = log1p((double)count(P, n, "\n"));
    feats[12] = log1p((double)distinct_nums);
    feats[13] = nol ? log1p((double)ol_sum / (double)nol) : 0.0;
    feats[14] = nol ? log1p((double)(ol_max - ol_min)) : 0.0;
    feats[15] = (double)numeric / 4.0;
    feats[16] = negated(ql, qn) ? 1.0 : 0.0;
    feats[17] = any_above ? 1.0 : 0.0;
    feats[18] = log1p((double)sentences);
    feats[19] = memchr(P, '%', (size_t)qn) ? 1.0 : 0.0;
    feats[20] = memchr(P, '$', (size_t)qn) ? 1.0 : 0.0;
    feats[21] = log1p((double)q_numbers);
    rc = 0;
done:
    PyMem_Free(low);
    PyMem_Free(words);
    PyMem_Free(nums);
    PyMem_Free(tab);
    return rc;
}

/* Parse (prompt, text_cap); returns the ASCII bytes, or NULL (no error) when the prompt is not
 * ASCII, or NULL with an error. */
static const char *ascii_prompt(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t *n,
                                Py_ssize_t *cap)
{
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "expected (prompt: str, text_cap: int)");
        return NULL;
    }
    if (!s->vslot || !s->work) {
        PyErr_SetString(PyExc_RuntimeError, "TierNet has no vocabulary (set_vocab)");
        return NULL;
    }
    if (s->D - s->K1 != N_FEATURES) {
        PyErr_Format(PyExc_ValueError, "the network takes %zd features, the featuriser makes %d",
                     s->D - s->K1, N_FEATURES);
        return NULL;
    }
    *cap = PyLong_AsSsize_t(args[1]);
    if (*cap == -1 && PyErr_Occurred())
        return NULL;
    if (!PyUnicode_IS_ASCII(args[0]))
        return NULL;
    *n = PyUnicode_GET_LENGTH(args[0]);
    return (const char *)PyUnicode_DATA(args[0]);
}

/* Featurise the (prompt, text_cap) arguments into s->ids[0..*n_ids) and feats: 1 when done, 0
 * when the prompt is not ASCII (the Python path handles it), -1 on error. */
static int featurize_args(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t *n_ids,
                          double *feats)
{
    Py_ssize_t n, cap;
    const char *P = ascii_prompt(s, args, nargs, &n, &cap);
    if (!P)
        return PyErr_Occurred() ? -1 : 0;
    return featurize_ascii(s, P, n, cap, n_ids, feats) < 0 ? -1 : 1;
}

/* featurize(prompt, text_cap) -> (ids, features) as Featurizer computes them, and
 * probs_text(prompt, text_cap) -> probs(*featurize(prompt, text_cap)); None when the prompt is
 * not ASCII (the Python path handles it). */
static PyObject *text_call(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs, int want_probs)
{
    Py_ssize_t n_ids;
    double f[N_FEATURES];
    const int rc = featurize_args(s, args, nargs, &n_ids, f);
    if (rc <= 0) {
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (want_probs)
        return forward(s, s->ids, n_ids, f);
    PyObject *ids = PyList_New(n_ids), *feats = PyList_New(N_FEATURES);
    if (!ids || !feats)
        goto fail;
    for (Py_ssize_t i = 0; i < n_ids; i++) {
        PyObject *v = PyLong_FromLong(s->ids[i]);
        if (!v)
            goto fail;
        PyList_SET_ITEM(ids, i, v);
    }
    for (int i = 0; i < N_FEATURES; i++) {
        PyObject *v = PyFloat_FromDouble(f[i]);
        if (!v)
            goto fail;
        PyList_SET_ITEM(feats, i, v);
    }
    return Py_BuildValue("(NN)", ids, feats);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(feats);
    return NULL;
}

static PyObject *tiernet_featurize(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    return text_call(s, args, nargs, 0);
}

static PyObject *tiernet_probs_text(TierNetObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    return text_call(s, args, nargs, 1);
}

static PyMethodDef tiernet_methods[] = {
    {"probs", (PyCFunction)(void (*)(void))tiernet_probs, METH_FASTCALL,
     "probs(ids, features) -> tuple: P(a tier above k is needed), non-increasing in k."},
    {"set_vocab", (PyCFunction)tiernet_set_vocab, METH_VARARGS,
     "set_vocab(tokens, unk_id): the WordPiece vocabulary for featurize / probs_text."},
    {"featurize", (PyCFunction)(void (*)(void))tiernet_featurize, METH_FASTCALL,
     "featurize(prompt, text_cap) -> (ids, features), or None when the prompt is not ASCII."},
    {"probs_text", (PyCFunction)(void (*)(void))tiernet_probs_text, METH_FASTCALL,
     "probs_text(prompt, text_cap) -> probs of the prompt, or None when it is not ASCII."},
    {NULL, NULL, 0, NULL},
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
