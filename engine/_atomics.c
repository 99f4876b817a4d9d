/*
 * 64-bit atomic operations on raw addresses inside shared memory.
 *
 * Why this exists: the routing table in shared memory must let several worker
 * processes claim slots without a lock that a killed process could leave held.
 * That needs compare-and-swap, which pure Python cannot do on a buffer. This
 * module is deliberately tiny: callers take the base address of a mapping once
 * with address(), keep the mapping alive themselves, and pass addresses of
 * 8-byte aligned words. Each call is a few nanoseconds plus the call overhead.
 *
 * Memory order: cas/fetch_add/exchange are sequentially consistent, load is
 * acquire and store is release, which is what a seqlock needs on any CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int
get_addr(PyObject *obj, uint64_t **out)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (value == 0 || (value & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "address must be non-zero and 8-byte aligned");
        return -1;
    }
    *out = (uint64_t *)(uintptr_t)value;
    return 0;
}

static int
get_u64(PyObject *obj, uint64_t *out)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)value;
    return 0;
}

static PyObject *
atomics_address(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    void *base = view.buf;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)base);
}

static PyObject *
atomics_cas(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *addr, expected, desired;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "cas(address, expected, desired)");
        return NULL;
    }
    if (get_addr(args[0], &addr) < 0 || get_u64(args[1], &expected) < 0 ||
        get_u64(args[2], &desired) < 0)
        return NULL;
    if (__atomic_compare_exchange_n(addr, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
atomics_load(PyObject *self, PyObject *arg)
{
    uint64_t *addr;
    if (get_addr(arg, &addr) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(addr, __ATOMIC_ACQUIRE));
}

static PyObject *
atomics_store(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *addr, value;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store(address, value)");
        return NULL;
    }
    if (get_addr(args[0], &addr) < 0 || get_u64(args[1], &value) < 0)
        return NULL;
    __atomic_store_n(addr, value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
atomics_fetch_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *addr, delta;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fetch_add(address, delta)");
        return NULL;
    }
    if (get_addr(args[0], &addr) < 0 || get_u64(args[1], &delta) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add(addr, delta, __ATOMIC_SEQ_CST));
}

static PyObject *
atomics_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *addr, value;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "exchange(address, value)");
        return NULL;
    }
    if (get_addr(args[0], &addr) < 0 || get_u64(args[1], &value) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_exchange_n(addr, value, __ATOMIC_SEQ_CST));
}

static PyObject *
atomics_fence(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef atomics_methods[] = {
    {"address", atomics_address, METH_O,
     "address(buffer) -> int: base address of a writable buffer (caller keeps it alive)."},
    {"cas", (PyCFunction)(void (*)(void))atomics_cas, METH_FASTCALL,
     "cas(address, expected, desired) -> bool: atomic compare-and-swap of a u64."},
    {"load", atomics_load, METH_O, "load(address) -> int: acquire load of a u64."},
    {"store", (PyCFunction)(void (*)(void))atomics_store, METH_FASTCALL,
     "store(address, value): release store of a u64."},
    {"fetch_add", (PyCFunction)(void (*)(void))atomics_fetch_add, METH_FASTCALL,
     "fetch_add(address, delta) -> int: atomic add (mod 2**64), returns the old value."},
    {"exchange", (PyCFunction)(void (*)(void))atomics_exchange, METH_FASTCALL,
     "exchange(address, value) -> int: atomic swap, returns the old value."},
    {"fence", atomics_fence, METH_NOARGS, "fence(): full memory barrier."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef atomics_module = {
    PyModuleDef_HEAD_INIT, "_atomics",
    "64-bit atomics on shared memory addresses (see engine/_atomics.c).", -1,
    atomics_methods,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    return PyModule_Create(&atomics_module);
}
