/* Masking of DataRow runs in compiled code: the accelerated twin of dbguard.masking.rows._mask_rows_py.
 *
 * mask_rows(data, pos, end, max_len, steps, error) -> (out, after, rows)
 *
 * Rewrites the complete DataRow messages that follow each other in data[pos:end], starting at pos
 * (which must be a 'D'), and stops at the first message that is not a DataRow, is incomplete, or has
 * a length outside [4, max_len] (the relay judges that one). ``out`` replaces data[pos:after]
 * (None when there was nothing to rewrite) and ``rows`` counts the DataRows consumed.
 *
 * ``steps`` is a tuple of (field index, kind, a, b, first, last), sorted by index, one per masked
 * field. Kinds (see strategies.row_step):
 *   0 CONST    the value is replaced by ``a`` (bytes, or None for SQL NULL)
 *   1 EMAIL    ``a`` + the bytes after the last '@', or ``b`` when there is no '@'
 *   2 PARTIAL  ASCII values: keep ``first`` and ``last`` bytes, fill the middle with byte ``b``
 *              (all of it when first + last >= length); other values: the callable ``a``
 *   3 CALL     the callable ``a`` (bytes -> bytes or None)
 * NULL fields stay NULL. A DataRow whose fields do not fit its length, that has fewer fields than
 * a masked index, or a field length below -1 raises ``error`` (an exception class): nothing of it
 * is passed.
 * Every read is bounds-checked against the message's own end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { K_CONST = 0, K_EMAIL = 1, K_PARTIAL = 2, K_CALL = 3 };

typedef struct {
    Py_ssize_t index;
    int kind;
    PyObject *a;  /* borrowed from the steps tuple */
    PyObject *b;
    Py_ssize_t first, last;
    int fill;
} Step;

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (more > PY_SSIZE_T_MAX - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = o->len + more;
    if (need <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < need)
        cap = cap > PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    char *nb = PyMem_Realloc(o->buf, (size_t)cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = nb;
    o->cap = cap;
    return 0;
}

static int out_put(Out *o, const void *src, Py_ssize_t n) {
    if (n <= 0)
        return 0;
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->buf + o->len, src, (size_t)n);
    o->len += n;
    return 0;
}

static inline void put_be32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline int32_t get_be32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static int out_len(Out *o, Py_ssize_t n) {
    if (n > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "masked value too large");
        return -1;
    }
    if (out_reserve(o, 4) < 0)
        return -1;
    put_be32(o->buf + o->len, (uint32_t)n);
    o->len += 4;
    return 0;
}

/* A masked value from Python (bytes or None) as a field: length and bytes, or NULL. */
static int out_value(Out *o, PyObject *v) {
    if (v == Py_None) {
        if (out_reserve(o, 4) < 0)
            return -1;
        put_be32(o->buf + o->len, 0xFFFFFFFFu);
        o->len += 4;
        return 0;
    }
    if (!PyBytes_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "a masker returned something other than bytes or None");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(v);
    if (out_len(o, n) < 0)
        return -1;
    return out_put(o, PyBytes_AS_STRING(v), n);
}

static int out_call(Out *o, PyObject *fn, const unsigned char *value, Py_ssize_t n) {
    PyObject *arg = PyBytes_FromStringAndSize((const char *)value, n);
    if (arg == NULL)
        return -1;
    PyObject *res = PyObject_CallOneArg(fn, arg);
    Py_DECREF(arg);
    if (res == NULL)
        return -1;
    int rc = out_value(o, res);
    Py_DECREF(res);
    return rc;
}

static int apply(Out *o, const Step *s, const unsigned char *value, Py_ssize_t n) {
    switch (s->kind) {
    case K_CONST:
        return out_value(o, s->a);
    case K_EMAIL: {
        const unsigned char *at = NULL;
        for (Py_ssize_t i = n; i > 0; i--) {
            if (value[i - 1] == '@') {
                at = value + i - 1;
                break;
            }
        }
        if (at == NULL)
            return out_value(o, s->b);
        Py_ssize_t plen = PyBytes_GET_SIZE(s->a);
        Py_ssize_t tail = n - (at + 1 - value);
        if (out_len(o, plen + tail) < 0 || out_put(o, PyBytes_AS_STRING(s->a), plen) < 0)
            return -1;
        return out_put(o, at + 1, tail);
    }
    case K_PARTIAL: {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (value[i] & 0x80)
                return out_call(o, s->a, value, n);
        }
        if (out_len(o, n) < 0 || out_reserve(o, n) < 0)
            return -1;
        char *dst = o->buf + o->len;
        if (s->first + s->last >= n) {
            memset(dst, s->fill, (size_t)n);
        } else {
            memcpy(dst, value, (size_t)s->first);
            memset(dst + s->first, s->fill, (size_t)(n - s->first - s->last));
            memcpy(dst + n - s->last, value + n - s->last, (size_t)s->last);
        }
        o->len += n;
        return 0;
    }
    default:
        return out_call(o, s->a, value, n);
    }
}

static int parse_steps(PyObject *steps, Step *out, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *t = PyTuple_GET_ITEM(steps, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 6) {
            PyErr_SetString(PyExc_TypeError, "a step is a 6-tuple");
            return -1;
        }
        Step *s = &out[i];
        s->index = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 0));
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
        s->a = PyTuple_GET_ITEM(t, 2);
        s->b = PyTuple_GET_ITEM(t, 3);
        s->first = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 4));
        s->last = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 5));
        if (PyErr_Occurred())
            return -1;
        s->kind = (int)kind;
        s->fill = 0;
        if (s->index < 0 || s->index > 32767 || (i > 0 && s->index <= out[i - 1].index)) {
            PyErr_SetString(PyExc_ValueError, "step indexes must increase within 0..32767");
            return -1;
        }
        switch (kind) {
        case K_CONST:
            if (s->a != Py_None && !PyBytes_Check(s->a))
                goto bad;
            break;
        case K_EMAIL:
            if (!PyBytes_Check(s->a) || !(PyBytes_Check(s->b) || s->b == Py_None))
                goto bad;
            break;
        case K_PARTIAL:
            if (!PyCallable_Check(s->a) || !PyLong_Check(s->b) || s->first < 0 || s->last < 0 ||
                s->first > (1 << 30) || s->last > (1 << 30))
                goto bad;
            s->fill = (int)PyLong_AsLong(s->b);
            if (s->fill < 0 || s->fill > 127)
                goto bad;
            break;
        case K_CALL:
            if (!PyCallable_Check(s->a))
                goto bad;
            break;
        default:
            goto bad;
        }
    }
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, "invalid masking step");
    return -1;
}

static PyObject *malformed(PyObject *error, const char *what) {
    PyErr_SetString(error, what);
    return NULL;
}

static PyObject *mask_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[4]) || !PyExceptionClass_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "mask_rows(data: bytes, pos: int, end: int, max_len: int, steps: tuple, error: type)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_len = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (pos < 0 || end < pos || end > size) {
        PyErr_SetString(PyExc_ValueError, "bad range");
        return NULL;
    }
    PyObject *steps_t = args[4];
    PyObject *error = args[5];
    Py_ssize_t nsteps = PyTuple_GET_SIZE(steps_t);
    Step stack_steps[16];
    Step *steps = stack_steps;
    if (nsteps > 16) {
        steps = PyMem_Malloc(sizeof(Step) * (size_t)nsteps);
        if (steps == NULL)
            return PyErr_NoMemory();
    }
    Out o = {NULL, 0, 0};
    Py_ssize_t rows = 0;
    PyObject *result = NULL;
    if (parse_steps(steps_t, steps, nsteps) < 0)
        goto done;
    Py_ssize_t need = nsteps ? steps[nsteps - 1].index + 1 : 0;

    while (end - pos >= 5 && data[pos] == 'D') {
        int32_t mlen = get_be32(data + pos + 1);
        if (mlen < 4 || (Py_ssize_t)mlen > max_len || (Py_ssize_t)mlen > end - pos - 1)
            break; /* the relay raises for the lengths, or waits for the rest */
        Py_ssize_t mend = pos + 1 + (Py_ssize_t)mlen;
        rows++;
        if (nsteps == 0) {
            pos = mend;
            continue;
        }
        if (mend - pos < 7) {
            malformed(error, "malformed DataRow");
            goto done;
        }
        Py_ssize_t nfields = (Py_ssize_t)(int16_t)(((unsigned)data[pos + 5] << 8) | data[pos + 6]);
        if (nfields < need) {
            malformed(error, "malformed DataRow");
            goto done;
        }
        Py_ssize_t row_out = o.len;
        if (out_put(&o, data + pos, 7) < 0) /* type, length (patched below), field count */
            goto done;
        Py_ssize_t p = pos + 7, copied = p, fi = 0;
        for (Py_ssize_t k = 0; k < nsteps; k++) {
            const Step *s = &steps[k];
            int32_t flen;
            for (;;) {
                if (mend - p < 4) {
                    malformed(error, "malformed DataRow");
                    goto done;
                }
                flen = get_be32(data + p);
                if (flen < -1 || (flen > 0 && (Py_ssize_t)flen > mend - p - 4)) {
                    malformed(error, "malformed DataRow");
                    goto done;
                }
                if (fi == s->index)
                    break;
                p += 4 + (flen > 0 ? flen : 0);
                fi++;
            }
            if (flen >= 0) {
                if (out_put(&o, data + copied, p - copied) < 0)
                    goto done;
                if (apply(&o, s, data + p + 4, flen) < 0)
                    goto done;
                p += 4 + flen;
                copied = p;
            } else {
                p += 4;
            }
            fi++;
        }
        if (out_put(&o, data + copied, mend - copied) < 0)
            goto done;
        Py_ssize_t new_len = o.len - row_out - 1;
        if (new_len > INT32_MAX) {
            malformed(error, "masked DataRow too large");
            goto done;
        }
        put_be32(o.buf + row_out + 1, (uint32_t)new_len);
        pos = mend;
    }
    if (nsteps == 0 || rows == 0) {
        result = Py_BuildValue("(Onn)", Py_None, pos, rows);
    } else {
        PyObject *bytes = PyBytes_FromStringAndSize(o.buf, o.len);
        if (bytes != NULL) {
            result = Py_BuildValue("(Nnn)", bytes, pos, rows);
        }
    }
done:
    PyMem_Free(o.buf);
    if (steps != stack_steps)
        PyMem_Free(steps);
    return result;
}

static PyMethodDef methods[] = {
    {"mask_rows", (PyCFunction)(void (*)(void))mask_rows, METH_FASTCALL,
     "mask_rows(data, pos, end, max_len, steps, error) -> (out | None, after, rows)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowmask", "DataRow masking in compiled code.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__rowmask(void) { return PyModule_Create(&module); }
