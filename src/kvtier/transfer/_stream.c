/* kvtier.transfer._stream: a memory copy with streaming (non-temporal) stores.
 *
 * A block copy between the engine's KV tensors and the host arena writes bytes that nobody
 * reads again soon from this core's cache. Ordinary stores first read each destination line
 * into the cache (read for ownership), so a copy moves three bytes through memory per byte
 * copied; streaming stores skip that read, and glibc's memcpy only uses them for copies of
 * several MiB, never for one block's 64 KiB pieces. With them the checked copy (copy, then
 * checksum the source while it is still in cache) keeps up with a plain torch gather on one
 * core; with memcpy the checksum's cost shows.
 *
 * copy(dst, src, nbytes): dst and src are addresses (ints); the GIL is released for the copy.
 * The ranges must not overlap. Where SSE2 is not available this is memcpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Below this size the copy stays in cache anyway and releasing the GIL costs more than it saves. */
#define STREAM_MIN_BYTES 4096

static void stream_copy(char *dst, const char *src, size_t n)
{
#if defined(__SSE2__)
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
    /* Streaming stores are weakly ordered: make them visible before the caller goes on (another
     * thread may read the destination next). */
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

static PyObject *py_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "copy(dst, src, nbytes) takes 3 arguments, got %zd", nargs);
        return NULL;
    }
    char *dst = (char *)PyLong_AsVoidPtr(args[0]);
    if (dst == NULL && PyErr_Occurred())
        return NULL;
    const char *src = (const char *)PyLong_AsVoidPtr(args[1]);
    if (src == NULL && PyErr_Occurred())
        return NULL;
    size_t n = PyLong_AsSize_t(args[2]);
    if (n == (size_t)-1 && PyErr_Occurred())
        return NULL;
    if (n == 0)
        Py_RETURN_NONE;
    if (dst == NULL || src == NULL) {
        PyErr_SetString(PyExc_ValueError, "copy: null address");
        return NULL;
    }
    if (n < STREAM_MIN_BYTES) {
        memcpy(dst, src, n);
    } else {
        Py_BEGIN_ALLOW_THREADS
        stream_copy(dst, src, n);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_FASTCALL,
     "copy(dst, src, nbytes): copy nbytes from address src to address dst with streaming "
     "stores (GIL released); the ranges must not overlap."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvtier.transfer._stream",
    "A memory copy with streaming (non-temporal) stores.", -1, methods,
};

PyMODINIT_FUNC PyInit__stream(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#if defined(__SSE2__)
    if (PyModule_AddIntConstant(m, "STREAMING", 1) < 0) {
#else
    if (PyModule_AddIntConstant(m, "STREAMING", 0) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
