/*
 * apl_py.c — the read path as CPython types inside the compiled module:
 * RecordCodec (one table's records: a dict to the image of apl_rec.h and
 * back) and TableReader (get, scan chunks and find of one table, at the
 * latest version or at a snapshot's, each in one call: pin, look up, copy,
 * unpin, decode). apl_py_install() puts both types into a Python module.
 *
 * Why not through cffi like the rest: a get is about a microsecond, and a
 * cffi call (~230 ns), decoding with msgpack (~400 ns) and the Python method
 * around them were most of it. A method of a C type is called by CPython
 * directly (METH_FASTCALL), encodes int and str keys itself, and builds the
 * dict in C from a layout known per table. The store code is the one
 * compiled copy in this module (the same view_enter, pins, horizon check and
 * iterators as apl_read.c, shared through apl_int.h), so the reader registry,
 * the thread records that closing a view waits for and the per-thread
 * reader slots stay one set per process.
 *
 * Concurrency. Shared: the same as apl_read.c — block versions, the location
 * table, sb_version and sb_horizon (written by the controller alone) and this
 * thread's reader slot (written by this thread). Every read here is
 * read_begin (view_enter, then the per-call pin unless a snapshot's version
 * is given), the lookup or walk, a copy of the value bytes into private
 * memory, read_end (the horizon check while still pinned, unpin,
 * view_exit): no retry, no lock, no wait. Why safe: the same argument as
 * apl_read.c (apl_layout.h), plus two rules of this file. (1) No Python code
 * runs between read_begin and read_end — keys are encoded before, records
 * decoded after — so nothing can re-enter a read, close the view or wait for
 * the GIL inside one; the GIL is held throughout (a read is short), which
 * also serialises the threads of this process around the type's state.
 * (2) Records are decoded only from the private copy and only after the
 * horizon check passed, so a record is never built from memory that the
 * writer may be reusing, and the decoder's bounds checks see bytes that
 * cannot change under them. A TableReader holds a reference to the object
 * that owns its view, so the view's memory outlives it; a closed view fails
 * in view_enter (APL_ECLOSED) before anything mapped is touched. A snapshot's
 * TableReader (at()) is closed with its snapshot (and after fork, where the
 * pin is the parent's), then fails every read with APL_ECLOSED.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdlib.h>

#include "apl_int.h"
#include "apl_rec.h"

/* A record fits half a block (apl_rec.h): a larger value is damage. */
#define VALUE_CAP (APL_MAX_BLOCK / 2)
#define KEY_CAP (APL_MAX_KEY + 4)

/* Raise the exception instance `exc` a Python factory returned (NULL: the
 * factory raised itself). Returns NULL. */
static PyObject *raise_made(PyObject *exc)
{
    if (!exc)
        return NULL;
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else
        PyErr_Format(PyExc_SystemError, "an error factory returned %R instead of an exception", exc);
    Py_DECREF(exc);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* RecordCodec                                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    struct apl_rec_layout lay;
    PyObject *names;      /* tuple of interned field names, schema order */
    PyObject *fallback;   /* callable(rec) -> the canonical record; raises the typed error */
    PyObject *errors;     /* callable(kind, *args) -> the exception to raise */
} Codec;

static PyTypeObject CodecType;

static PyObject *corrupt(Codec *c, const char *detail, uint64_t n)
{
    return raise_made(PyObject_CallFunction(c->errors, "ssK", "corrupt", detail, (unsigned long long)n));
}

/* The dict of record image p[0..n), or NULL with the error set (a damaged
 * image: the codec's "corrupt" error). */
static PyObject *rec_decode(Codec *c, const uint8_t *p, uint64_t n)
{
    if (!c->names)   /* cleared by the garbage collector (a cycle being freed) */
        return PyErr_Format(PyExc_ValueError, "RecordCodec is not initialised");
    const struct apl_rec_layout *L = &c->lay;
    uint32_t var = apl_rec_varlen(L, p, n);
    if (var == UINT32_MAX)
        return corrupt(c, "its length does not match the table's record layout", n);
    if ((L->nfields & 7) && (p[L->fixed_at - 1] >> (L->nfields & 7)))
        return corrupt(c, "its null bitmap names fields the table does not have", n);
    PyObject *d = _PyDict_NewPresized(L->nfields);
    if (!d)
        return NULL;
    const uint8_t *ends = p + L->ends_at, *vbase = p + L->head;
    for (uint32_t i = 0; i < L->nfields; i++) {
        const struct apl_rec_field *f = &L->f[i];
        PyObject *val;
        if (p[i >> 3] & (1u << (i & 7))) {
            /* None: an empty slot or span, so every record has one image */
            static const uint8_t zero[8];
            int empty = apl_rec_fixed(f->type)
                ? !memcmp(p + f->at, zero, f->type == APL_REC_BOOL ? 1 : 8)
                : (f->at ? apl_rec_u16(ends + 2 * (f->at - 1)) : 0) == apl_rec_u16(ends + 2 * f->at);
            if (!f->nullable || !empty) {
                Py_DECREF(d);
                return corrupt(c, f->nullable ? "a None field holds a value"
                                              : "a field that may not be None is null", n);
            }
            val = Py_NewRef(Py_None);
        } else {
            switch (f->type) {
            case APL_REC_INT: {
                int64_t x;
                memcpy(&x, p + f->at, 8);
                val = PyLong_FromLongLong(x);
                break;
            }
            case APL_REC_FLOAT: {
                double x;
                memcpy(&x, p + f->at, 8);
                if (isnan(x)) {   /* validation never stores one */
                    Py_DECREF(d);
                    return corrupt(c, "a float field holds NaN", n);
                }
                val = PyFloat_FromDouble(x);
                break;
            }
            case APL_REC_BOOL:
                if (p[f->at] > 1) {
                    Py_DECREF(d);
                    return corrupt(c, "a bool field holds neither 0 nor 1", n);
                }
                val = Py_NewRef(p[f->at] ? Py_True : Py_False);
                break;
            default: {
                uint32_t start = f->at ? apl_rec_u16(ends + 2 * (f->at - 1)) : 0;
                uint32_t end = apl_rec_u16(ends + 2 * f->at);
                if (start > end || end > var) {
                    Py_DECREF(d);
                    return corrupt(c, "its end offsets are out of order", n);
                }
                if (f->type == APL_REC_STR) {
                    val = PyUnicode_DecodeUTF8((const char *)vbase + start, end - start, NULL);
                    if (!val && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                        PyErr_Clear();
                        Py_DECREF(d);
                        return corrupt(c, "a str field is not UTF-8", n);
                    }
                } else {
                    val = PyBytes_FromStringAndSize((const char *)vbase + start, end - start);
                }
            }
            }
        }
        if (!val || PyDict_SetItem(d, PyTuple_GET_ITEM(c->names, i), val) < 0) {
            Py_XDECREF(val);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(val);
    }
    return d;
}

/* One field's value as the encoder found it. */
struct enc_val {
    PyObject *v;          /* a reference of its own (a key's __eq__ may change the dict); NULL: None */
    const char *bytes;    /* str/bytes */
    Py_ssize_t len;
    union { int64_t i; double d; } x;
};

#define ENC_FALLBACK 1    /* not a canonical record: ask the fallback */

/* Pass 1: check every field of `rec` against the layout; the size of its
 * image in *total. 0, ENC_FALLBACK or -1 (a Python error is set). The
 * values ev[0..*held) hold a reference each, whatever it returns. */
static int enc_check(Codec *c, PyObject *rec, struct enc_val *ev, uint64_t *total, uint32_t *held)
{
    const struct apl_rec_layout *L = &c->lay;
    *held = 0;
    if (!PyDict_CheckExact(rec) || PyDict_GET_SIZE(rec) != (Py_ssize_t)L->nfields)
        return ENC_FALLBACK;
    uint64_t var = 0;
    for (uint32_t i = 0; i < L->nfields; i++) {
        const struct apl_rec_field *f = &L->f[i];
        PyObject *name = PyTuple_GET_ITEM(c->names, i);
        PyObject *v = PyDict_GetItemWithError(rec, name);
        if (!v)
            return PyErr_Occurred() ? -1 : ENC_FALLBACK;
        ev[i].v = v == Py_None ? NULL : Py_NewRef(v);
        *held = i + 1;
        if (v == Py_None) {
            if (!f->nullable)
                return ENC_FALLBACK;
            continue;
        }
        switch (f->type) {
        case APL_REC_INT: {
            int overflow;
            if (!PyLong_CheckExact(v))
                return ENC_FALLBACK;
            ev[i].x.i = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow)
                return ENC_FALLBACK;
            break;
        }
        case APL_REC_FLOAT:
            if (!PyFloat_CheckExact(v) || isnan(PyFloat_AS_DOUBLE(v)))
                return ENC_FALLBACK;
            ev[i].x.d = PyFloat_AS_DOUBLE(v);
            break;
        case APL_REC_BOOL:
            if (v != Py_True && v != Py_False)
                return ENC_FALLBACK;
            break;
        case APL_REC_STR:
            if (!PyUnicode_CheckExact(v))
                return ENC_FALLBACK;
            ev[i].bytes = PyUnicode_AsUTF8AndSize(v, &ev[i].len);
            if (!ev[i].bytes) {
                PyErr_Clear();
                raise_made(PyObject_CallFunction(c->errors, "sOs", "invalid", name,
                                                 "a str that UTF-8 cannot encode (a lone surrogate)"));
                return -1;
            }
            var += (uint64_t)ev[i].len;
            break;
        default:
            if (!PyBytes_CheckExact(v))
                return ENC_FALLBACK;
            ev[i].bytes = PyBytes_AS_STRING(v);
            ev[i].len = PyBytes_GET_SIZE(v);
            var += (uint64_t)ev[i].len;
        }
    }
    *total = L->head + var;
    return 0;
}

/* Pass 2: write the image of checked values into out (total bytes). */
static void enc_write(Codec *c, const struct enc_val *ev, uint8_t *out)
{
    const struct apl_rec_layout *L = &c->lay;
    memset(out, 0, L->head);
    uint8_t *ends = out + L->ends_at, *vbase = out + L->head;
    uint32_t off = 0;
    for (uint32_t i = 0; i < L->nfields; i++) {
        const struct apl_rec_field *f = &L->f[i];
        if (!ev[i].v) {
            out[i >> 3] |= (uint8_t)(1u << (i & 7));
        } else if (f->type == APL_REC_INT || f->type == APL_REC_FLOAT) {
            memcpy(out + f->at, &ev[i].x, 8);
        } else if (f->type == APL_REC_BOOL) {
            out[f->at] = ev[i].v == Py_True;
        } else {
            memcpy(vbase + off, ev[i].bytes, (size_t)ev[i].len);
            off += (uint32_t)ev[i].len;
        }
        if (!apl_rec_fixed(f->type)) {
            ends[2 * f->at] = (uint8_t)off;
            ends[2 * f->at + 1] = (uint8_t)(off >> 8);
        }
    }
}

static PyObject *rec_encode(Codec *c, PyObject *rec, uint64_t limit, int canonical)
{
    struct enc_val small[32], *ev = small;
    if (c->lay.nfields > 32 && !(ev = PyMem_Malloc(sizeof *ev * c->lay.nfields)))
        return PyErr_NoMemory();
    uint64_t total = 0;
    uint32_t held;
    PyObject *out = NULL;
    int rc = enc_check(c, rec, ev, &total, &held);
    if (rc == ENC_FALLBACK) {
        if (canonical) {
            PyErr_SetString(PyExc_SystemError, "the codec's fallback returned a record it cannot encode");
        } else {
            PyObject *canon = PyObject_CallOneArg(c->fallback, rec);
            if (canon) {
                out = rec_encode(c, canon, limit, 1);
                Py_DECREF(canon);
            }
        }
    } else if (rc == 0) {
        if (limit > APL_REC_MAX_LEN)
            limit = APL_REC_MAX_LEN;
        if (total > limit) {
            raise_made(PyObject_CallFunction(c->errors, "sOKK", "too_large", rec,
                                             (unsigned long long)total, (unsigned long long)limit));
        } else if ((out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total))) {
            enc_write(c, ev, (uint8_t *)PyBytes_AS_STRING(out));
        }
    }
    for (uint32_t i = 0; i < held; i++)
        Py_XDECREF(ev[i].v);
    if (ev != small)
        PyMem_Free(ev);
    return out;
}

static int type_code(PyObject *name)
{
    static const char *names[] = {0, "int", "float", "bool", "str", "bytes"};
    if (PyUnicode_Check(name))
        for (int t = APL_REC_INT; t <= APL_REC_BYTES; t++)
            if (PyUnicode_CompareWithASCIIString(name, names[t]) == 0)
                return t;
    return 0;
}

static int codec_init(Codec *c, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fields", "fallback", "errors", NULL};
    PyObject *fields, *fallback, *errors_;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:RecordCodec", kwlist, &fields, &fallback, &errors_))
        return -1;
    PyObject *seq = PySequence_Fast(fields, "RecordCodec: fields must be a sequence of (name, type, nullable)");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 4096) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "RecordCodec: %zd fields; a table has 1 to 4096", n);
        return -1;
    }
    struct apl_rec_field *f = PyMem_Calloc((size_t)n, sizeof *f);
    PyObject *names = PyTuple_New(n);
    if (!f || !names)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *name, *type;
        int nullable;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "UOp", &name, &type, &nullable)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "RecordCodec: each field is (name, type, nullable)");
            goto fail;
        }
        if (!(f[i].type = (uint8_t)type_code(type))) {
            PyErr_Format(PyExc_ValueError, "RecordCodec: field %R has unknown type %R", name, type);
            goto fail;
        }
        f[i].nullable = (uint8_t)nullable;
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        PyTuple_SET_ITEM(names, i, name);
    }
    PyMem_Free(c->lay.f);
    c->lay.f = f;
    c->lay.nfields = (uint32_t)n;
    apl_rec_plan(&c->lay);
    Py_XSETREF(c->names, names);
    Py_XSETREF(c->fallback, Py_NewRef(fallback));
    Py_XSETREF(c->errors, Py_NewRef(errors_));
    Py_DECREF(seq);
    return 0;
fail:
    PyMem_Free(f);
    Py_XDECREF(names);
    Py_DECREF(seq);
    return -1;
}

static int codec_traverse(Codec *c, visitproc visit, void *arg)
{
    Py_VISIT(c->names);
    Py_VISIT(c->fallback);
    Py_VISIT(c->errors);
    return 0;
}

static int codec_clear(Codec *c)
{
    Py_CLEAR(c->names);
    Py_CLEAR(c->fallback);
    Py_CLEAR(c->errors);
    return 0;
}

static void codec_dealloc(Codec *c)
{
    PyObject_GC_UnTrack(c);
    codec_clear(c);
    PyMem_Free(c->lay.f);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int codec_ready(Codec *c)
{
    if (c->names)
        return 1;
    PyErr_SetString(PyExc_ValueError, "RecordCodec is not initialised");
    return 0;
}

static PyObject *codec_encode(Codec *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2)
        return PyErr_Format(PyExc_TypeError, "encode(record, limit=65535): %zd arguments given", nargs);
    if (!codec_ready(c))
        return NULL;
    uint64_t limit = APL_REC_MAX_LEN;
    if (nargs == 2) {
        long long l = PyLong_AsLongLong(args[1]);
        if (l == -1 && PyErr_Occurred())
            return NULL;
        limit = l < 0 ? 0 : (uint64_t)l;
    }
    return rec_encode(c, args[0], limit, 0);
}

static PyObject *codec_decode(Codec *c, PyObject *arg)
{
    if (!codec_ready(c))
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *d = rec_decode(c, b.buf, (uint64_t)b.len);
    PyBuffer_Release(&b);
    return d;
}

static PyObject *codec_size(Codec *c, void *unused)
{
    return PyLong_FromUnsignedLong(c->lay.head);
}

static PyMethodDef codec_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))codec_encode, METH_FASTCALL,
     "encode(record, limit=65535) -> bytes: the image of a record (apl_rec.h). A record that is not\n"
     "canonical (a missing or unknown field, a value of another type) goes through the fallback,\n"
     "which raises the typed error or returns the canonical record; an image longer than `limit`\n"
     "raises the error the errors factory makes for \"too_large\"."},
    {"decode", (PyCFunction)codec_decode, METH_O,
     "decode(image) -> dict: the record of an image; a damaged one raises the \"corrupt\" error."},
    {NULL}
};

static PyGetSetDef codec_getset[] = {
    {"fixed_size", (getter)codec_size, NULL, "bytes of an image before its variable area", NULL},
    {NULL}
};

static PyMemberDef codec_members[] = {
    {"names", T_OBJECT, offsetof(Codec, names), READONLY, "field names in schema order"},
    {NULL}
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance._cext.RecordCodec",
    .tp_doc = "RecordCodec(fields, fallback, errors): one table's records as images (cext/apl_rec.h).\n"
              "fields: (name, type, nullable) in schema order; fallback(record) -> canonical record;\n"
              "errors(kind, *args) -> the exception for \"corrupt\", \"invalid\" and \"too_large\".",
    .tp_basicsize = sizeof(Codec),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)codec_init,
    .tp_traverse = (traverseproc)codec_traverse,
    .tp_clear = (inquiry)codec_clear,
    .tp_dealloc = (destructor)codec_dealloc,
    .tp_methods = codec_methods,
    .tp_members = codec_members,
    .tp_getset = codec_getset,
};

/* ------------------------------------------------------------------ */
/* TableReader                                                          */
/* ------------------------------------------------------------------ */

enum { KEY_INT = 1, KEY_STR = 2, KEY_BYTES = 3 };

typedef struct {
    PyObject_HEAD
    apl_view *v;
    uint64_t version;     /* 0: the latest, under a per-call pin; else a snapshot's pinned version */
    uint32_t file;
    uint8_t key_kind;
    uint8_t closed;       /* a snapshot's reader after the snapshot closed (or fork) */
    Codec *codec;
    PyObject *owner;      /* owns the view's memory: it must outlive every read */
    PyObject *key_encode; /* callable(key) -> encoded key bytes; raises the typed error */
    PyObject *on_error;   /* callable(code, op, argument): raises the error of a failed read */
} TReader;

static PyTypeObject TReaderType;

/* Raise the error of a read that returned `rc` (on_error raises it). */
static PyObject *read_error(TReader *t, int64_t rc, const char *op, PyObject *arg)
{
    PyObject *res = PyObject_CallFunction(t->on_error, "LsO", (long long)rc, op, arg ? arg : Py_None);
    if (res) {
        Py_DECREF(res);
        PyErr_Format(PyExc_SystemError, "read error %lld of %s was not raised", (long long)rc, op);
    }
    return NULL;
}

/* Escape bytes as a str/bytes key (apl keys.py): every 0x00 becomes 0x00
 * 0xFF, then 0x00 0x00. APL_EKEY when it would be longer than APL_MAX_KEY. */
static int escape_key(const char *p, Py_ssize_t n, uint8_t *out, uint32_t *klen)
{
    if (n > APL_MAX_KEY - 2)
        return APL_EKEY;
    if (!memchr(p, 0, (size_t)n)) {
        memcpy(out, p, (size_t)n);
        out[n] = out[n + 1] = 0;
        *klen = (uint32_t)n + 2;
        return APL_OK;
    }
    uint32_t o = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (o + 4 > APL_MAX_KEY + 2)
            return APL_EKEY;
        out[o++] = (uint8_t)p[i];
        if (!p[i])
            out[o++] = 0xFF;
    }
    out[o++] = 0;
    out[o++] = 0;
    if (o > APL_MAX_KEY)
        return APL_EKEY;
    *klen = o;
    return APL_OK;
}

#define KEY_PYERR 1  /* a Python error is set */

/* The encoded key: int and str (and bytes) keys here, anything else by the
 * table's Python encoder (which raises WrongTypeError naming the table). */
static int encode_key(TReader *t, PyObject *key, uint8_t *out, uint32_t *klen)
{
    if (t->key_kind == KEY_INT && PyLong_CheckExact(key)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (!overflow) {
            uint64_t be = __builtin_bswap64((uint64_t)x ^ 0x8000000000000000ull);
            memcpy(out, &be, 8);
            *klen = 8;
            return APL_OK;
        }
    } else if (t->key_kind == KEY_STR && PyUnicode_CheckExact(key)) {
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(key, &n);
        if (p)
            return escape_key(p, n, out, klen);
        PyErr_Clear();
    } else if (t->key_kind == KEY_BYTES && PyBytes_CheckExact(key)) {
        return escape_key(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), out, klen);
    }
    PyObject *enc = PyObject_CallOneArg(t->key_encode, key);
    if (!enc)
        return KEY_PYERR;
    if (!PyBytes_Check(enc)) {
        PyErr_Format(PyExc_TypeError, "the key encoder returned %.50s, not bytes", Py_TYPE(enc)->tp_name);
        Py_DECREF(enc);
        return KEY_PYERR;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(enc);
    int rc = APL_EKEY;
    if (n <= APL_MAX_KEY) {
        memcpy(out, PyBytes_AS_STRING(enc), (size_t)n);
        *klen = (uint32_t)n;
        rc = APL_OK;
    }
    Py_DECREF(enc);
    return rc;
}

/* The value of one key copied into out: its length, or an APL_* code. */
static int64_t get_copy(apl_view *v, uint32_t file, uint64_t version, const uint8_t *key, uint32_t klen,
                        uint8_t *out, uint32_t cap)
{
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    const uint8_t *val;
    uint32_t vlen;
    int64_t got = apl_lookup(v, file, ver, key, klen, &val, &vlen);
    if (got == APL_OK) {
        if (vlen > cap) {
            got = APL_ECORRUPT;
        } else {
            memcpy(out, val, vlen);
            got = vlen;
        }
    }
    return read_end(v, ver, r, got);
}

static PyObject *tr_get(TReader *t, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *dflt = nargs > 1 ? args[1] : Py_None;
    if (kwnames) {   /* get(key, default=x), as a mapping's get allows */
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        if (nkw != 1 || nargs != 1 || PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "default"))
            return PyErr_Format(PyExc_TypeError, "get(key, default=None): unexpected arguments");
        dflt = args[1];
    } else if (nargs < 1 || nargs > 2) {
        return PyErr_Format(PyExc_TypeError, "get(key, default=None): %zd arguments given", nargs);
    }
    PyObject *key = args[0];
    if (t->closed)
        return read_error(t, APL_ECLOSED, "get", key);
    uint8_t kbuf[KEY_CAP];
    uint32_t klen;
    int rc = encode_key(t, key, kbuf, &klen);
    if (rc == KEY_PYERR)
        return NULL;
    if (rc)
        return read_error(t, rc, "get", key);
    uint8_t vbuf[VALUE_CAP];
    int64_t n = get_copy(t->v, t->file, t->version, kbuf, klen, vbuf, sizeof vbuf);
    if (n >= 0)
        return rec_decode(t->codec, vbuf, (uint64_t)n);
    if (n == APL_NOTFOUND)
        return Py_NewRef(dflt);
    return read_error(t, n, "get", key);
}

/* Values as apl_scan and apl_find write them ([u32 length][bytes] each),
 * in private memory: grown to `want` bytes, the old contents kept. */
struct vals {
    uint8_t *buf;
    uint64_t cap;
};

static int vals_grow(struct vals *o, uint64_t want)
{
    if (want <= o->cap)
        return APL_OK;
    uint8_t *nb = realloc(o->buf, want);
    if (!nb)
        return APL_ENOMEM;
    o->buf = nb;
    o->cap = want;
    return APL_OK;
}

/* The list of `count` records decoded from buf[0..used); frees the buffer. */
static PyObject *vals_decode(Codec *c, struct vals *o, uint64_t used, uint64_t count)
{
    PyObject *list = PyList_New((Py_ssize_t)count);
    uint64_t off = 0;
    for (uint64_t i = 0; list && i < count; i++) {
        uint32_t n = 0;
        PyObject *d = NULL;
        if (off + 4 <= used) {
            memcpy(&n, o->buf + off, 4);
            if (off + 4 + n <= used)
                d = rec_decode(c, o->buf + off + 4, n);
            else
                corrupt(c, "the read returned a truncated value", n);
        } else {
            corrupt(c, "the read returned a truncated value", 0);
        }
        if (!d) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, d);
        off += 4 + (uint64_t)n;
    }
    free(o->buf);
    o->buf = 0;
    return list;
}

/* An optional bytes argument: (pointer, length), or NULL for None. */
static int opt_bytes(PyObject *o, const char *what, const uint8_t **p, uint32_t *n, int *none)
{
    *none = o == Py_None;
    if (*none) {
        *p = (const uint8_t *)"";
        *n = 0;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be encoded key bytes or None, not %.50s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    *p = (const uint8_t *)PyBytes_AS_STRING(o);
    *n = (uint32_t)PyBytes_GET_SIZE(o);
    return 0;
}

static PyObject *tr_scan(TReader *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5)
        return PyErr_Format(PyExc_TypeError, "scan(lo, lo_incl, hi, version, cap): %zd arguments given", nargs);
    if (t->closed)
        return read_error(t, APL_ECLOSED, "range", Py_None);
    const uint8_t *lo, *hi;
    uint32_t lolen, hilen;
    int lo_none, hi_none;
    if (opt_bytes(args[0], "lo", &lo, &lolen, &lo_none) || opt_bytes(args[2], "hi", &hi, &hilen, &hi_none))
        return NULL;
    int incl = PyObject_IsTrue(args[1]);
    unsigned long long version = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long long cap = PyLong_AsUnsignedLongLong(args[4]);
    if (incl < 0 || PyErr_Occurred())
        return NULL;
    /* one chunk of about `cap` bytes, with room for a whole first record */
    struct vals o = {0};
    int64_t n = vals_grow(&o, cap + VALUE_CAP + 8);
    uint8_t resume[APL_MAX_KEY];
    uint32_t rlen = 0;
    uint64_t count = 0;
    int more = 0;
    if (!n)
        n = apl_scan(t->v, t->file, lo, lolen, incl || lo_none, hi, hi_none ? APL_NO_BOUND : hilen,
                     t->version ? t->version : version, APL_SCAN_VALUES, o.buf, o.cap, &count,
                     resume, &rlen, &more);
    if (n < 0) {
        free(o.buf);
        return read_error(t, n == APL_EBUFSIZE ? APL_ECORRUPT : n, "range", Py_None);
    }
    PyObject *list = vals_decode(t->codec, &o, (uint64_t)n, count);
    if (!list)
        return NULL;
    PyObject *next = more ? PyBytes_FromStringAndSize((const char *)resume, rlen) : Py_NewRef(Py_None);
    if (!next) {
        Py_DECREF(list);
        return NULL;
    }
    PyObject *res = PyTuple_Pack(2, list, next);
    Py_DECREF(list);
    Py_DECREF(next);
    return res;
}

/* Every record of `file` whose alternate key in index file `index` encodes
 * to prefix, from one read: apl_find's chunks continued under one pin. */
static int64_t find_all(apl_view *v, uint32_t index, uint32_t file, uint64_t version,
                        const uint8_t *prefix, uint32_t plen, struct vals *o, uint64_t *count)
{
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    uint64_t ver, used = 0;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    uint8_t after[APL_MAX_KEY];
    uint32_t alen = 0;
    int more = 1;
    *count = 0;
    while (more) {
        uint64_t got = 0;
        uint64_t want = o->cap ? o->cap : 1 << 15;
        while (want - used < VALUE_CAP + 8)
            want *= 2;
        if ((rc = vals_grow(o, want)))   /* room for a whole next record */
            break;
        rc = apl_find_at(v, index, file, ver, prefix, plen, after, alen, o->buf + used, o->cap - used,
                         &got, after, &alen, &more);
        if (rc < 0)
            break;
        used += (uint64_t)rc;
        *count += got;
    }
    return read_end(v, ver, r, rc < 0 ? rc : (int64_t)used);
}

static PyObject *tr_find(TReader *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4)
        return PyErr_Format(PyExc_TypeError, "find(index, prefix, version, value): %zd arguments given", nargs);
    if (t->closed)
        return read_error(t, APL_ECLOSED, "find", args[3]);
    unsigned long index = PyLong_AsUnsignedLong(args[0]);
    unsigned long long version = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[1]))
        return PyErr_Format(PyExc_TypeError, "prefix must be bytes, not %.50s", Py_TYPE(args[1])->tp_name);
    uint32_t plen = (uint32_t)PyBytes_GET_SIZE(args[1]);
    if (plen > APL_MAX_KEY)
        return read_error(t, APL_EKEY, "find", args[3]);
    if (index >= t->v->v_nfiles)
        return read_error(t, APL_EFILE, "find", args[3]);
    struct vals o = {0};
    uint64_t count = 0;
    int64_t n = find_all(t->v, (uint32_t)index, t->file, t->version ? t->version : version,
                         (const uint8_t *)PyBytes_AS_STRING(args[1]), plen, &o, &count);
    if (n < 0) {
        free(o.buf);
        return read_error(t, n == APL_EBUFSIZE ? APL_ECORRUPT : n, "find", args[3]);
    }
    return vals_decode(t->codec, &o, (uint64_t)n, count);
}

static TReader *tr_alloc(void)
{
    return PyObject_GC_New(TReader, &TReaderType);
}

static PyObject *tr_at(TReader *t, PyObject *arg)
{
    unsigned long long version = PyLong_AsUnsignedLongLong(arg);
    if (version == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (!version)
        return PyErr_Format(PyExc_ValueError, "at(version): a snapshot's version is > 0");
    if (!t->codec)
        return PyErr_Format(PyExc_ValueError, "at(version): this TableReader was cleared");
    TReader *n = tr_alloc();
    if (!n)
        return NULL;
    n->v = t->v;
    n->version = version;
    n->file = t->file;
    n->key_kind = t->key_kind;
    n->closed = t->closed;
    n->codec = (Codec *)Py_NewRef(t->codec);
    n->owner = Py_NewRef(t->owner);
    n->key_encode = Py_NewRef(t->key_encode);
    n->on_error = Py_NewRef(t->on_error);
    PyObject_GC_Track(n);
    return (PyObject *)n;
}

static PyObject *tr_close(TReader *t, PyObject *unused)
{
    t->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *tr_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"view", "owner", "file", "codec", "key_type", "key_encode", "on_error", NULL};
    unsigned long long addr;
    unsigned int file;
    PyObject *owner, *codec, *key_encode, *on_error;
    const char *key_type;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KOIO!sOO:TableReader", kwlist, &addr, &owner, &file,
                                     &CodecType, &codec, &key_type, &key_encode, &on_error))
        return NULL;
    int kind = !strcmp(key_type, "int") ? KEY_INT : !strcmp(key_type, "str") ? KEY_STR
             : !strcmp(key_type, "bytes") ? KEY_BYTES : 0;
    if (!kind)
        return PyErr_Format(PyExc_ValueError, "TableReader: a key is int, str or bytes, not %s", key_type);
    apl_view *v = (apl_view *)(uintptr_t)addr;
    if (!v || file >= v->v_nfiles)
        return PyErr_Format(PyExc_ValueError, "TableReader: no file %u in this view", file);
    if (!codec_ready((Codec *)codec))
        return NULL;
    TReader *t = tr_alloc();
    if (!t)
        return NULL;
    t->v = v;
    t->version = 0;
    t->file = file;
    t->key_kind = (uint8_t)kind;
    t->closed = 0;
    t->codec = (Codec *)Py_NewRef(codec);
    t->owner = Py_NewRef(owner);
    t->key_encode = Py_NewRef(key_encode);
    t->on_error = Py_NewRef(on_error);
    PyObject_GC_Track(t);
    return (PyObject *)t;
}

static int tr_traverse(TReader *t, visitproc visit, void *arg)
{
    Py_VISIT(t->codec);
    Py_VISIT(t->owner);
    Py_VISIT(t->key_encode);
    Py_VISIT(t->on_error);
    return 0;
}

static int tr_clear(TReader *t)
{
    t->closed = 1;   /* never read through a view whose owner may be gone */
    Py_CLEAR(t->codec);
    Py_CLEAR(t->owner);
    Py_CLEAR(t->key_encode);
    Py_CLEAR(t->on_error);
    return 0;
}

static void tr_dealloc(TReader *t)
{
    PyObject_GC_UnTrack(t);
    tr_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *tr_version(TReader *t, void *unused)
{
    return PyLong_FromUnsignedLongLong(t->version);
}

static PyObject *tr_closed(TReader *t, void *unused)
{
    return PyBool_FromLong(t->closed);
}

static PyMethodDef tr_methods[] = {
    {"get", (PyCFunction)(void (*)(void))tr_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None) -> the record with this primary key (a dict), or default"},
    {"scan", (PyCFunction)(void (*)(void))tr_scan, METH_FASTCALL,
     "scan(lo, lo_incl, hi, version, cap) -> (records, resume): records of [lo, hi) (encoded keys,\n"
     "None = unbounded) in key order from one read at `version` (0: the latest; a snapshot's reader\n"
     "reads its own), about `cap` bytes of them; resume is the last key taken when more remain\n"
     "(continue with lo=resume, lo_incl=False), else None"},
    {"find", (PyCFunction)(void (*)(void))tr_find, METH_FASTCALL,
     "find(index, prefix, version, value) -> every record whose alternate key in index file `index`\n"
     "encodes to `prefix`, in primary-key order, from one read (`value` names it in errors)"},
    {"at", (PyCFunction)tr_at, METH_O,
     "at(version) -> a reader of the same table at a pinned version (a snapshot's); close() it when\n"
     "the pin goes"},
    {"close", (PyCFunction)tr_close, METH_NOARGS, "close(): every later read fails with APL_ECLOSED"},
    {NULL}
};

static PyGetSetDef tr_getset[] = {
    {"version", (getter)tr_version, NULL, "the pinned version read (0: the latest)", NULL},
    {"closed", (getter)tr_closed, NULL, "True once closed", NULL},
    {NULL}
};

static PyTypeObject TReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance._cext.TableReader",
    .tp_doc = "TableReader(view, owner, file, codec, key_type, key_encode, on_error): the reads of\n"
              "one table through a view (its address), each in one call. owner keeps the view alive;\n"
              "key_encode(key) encodes keys the reader does not (raising the typed error);\n"
              "on_error(code, op, argument) raises the error of a failed read.",
    .tp_basicsize = sizeof(TReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = tr_new,
    .tp_traverse = (traverseproc)tr_traverse,
    .tp_clear = (inquiry)tr_clear,
    .tp_dealloc = (destructor)tr_dealloc,
    .tp_methods = tr_methods,
    .tp_getset = tr_getset,
};

/* ------------------------------------------------------------------ */
/* Installing the types                                                 */
/* ------------------------------------------------------------------ */

int apl_py_install(const char *module)
{
    /* called through cffi, which released the GIL */
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = APL_EINVAL;
    if (PyType_Ready(&CodecType) == 0 && PyType_Ready(&TReaderType) == 0) {
        PyObject *m = PyImport_ImportModule(module);
        if (m) {
            if (PyObject_SetAttrString(m, "RecordCodec", (PyObject *)&CodecType) == 0 &&
                PyObject_SetAttrString(m, "TableReader", (PyObject *)&TReaderType) == 0)
                rc = APL_OK;
            Py_DECREF(m);
        }
    }
    if (rc)
        PyErr_Clear();
    PyGILState_Release(g);
    return rc;
}
