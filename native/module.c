/* The uringloop._dataplane module: its types, the names it calls Python by, and the
 * at-fork handler that makes every ring of the parent unusable in a child (rule 4 of
 * dataplane.h: ring_forked() compares a ring's generation with this one).
 */
#include "dataplane.h"

#include <pthread.h>

unsigned long ul_fork_generation = 0;

static void ul_after_fork_child(void) { ul_fork_generation++; }

PyObject *str_set_result, *str_set_exception, *str_done;
PyObject *str_data_received, *str_get_buffer, *str_buffer_updated;
PyObject *str_stream_eof, *str_stream_error, *str_stream_flushed, *str_protocol_error;
PyObject *str_pause_protocol, *str_resume_protocol, *str_stream_unpinned, *str_is_closed;
PyObject *str_stream_recv_over;
PyObject *str_fileno;
PyObject *ul_minus_one;

PyObject *ul_fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && tb)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static PyObject *module_faults_on(PyObject *m, PyObject *args)
{
    int on;
    unsigned long phase = 0;
    if (!PyArg_ParseTuple(args, "p|k:faults_on", &on, &phase))
        return NULL;
    ul_faults_on(on, phase);
    Py_RETURN_NONE;
}

static PyMethodDef dataplane_functions[] = {
    {"faults_on", module_faults_on, METH_VARARGS,
     "faults_on(on, phase=0): fault injection builds: injected faults on (counting to the "
     "next ones from phase) or off"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef dataplane_module = {
    PyModuleDef_HEAD_INIT, "uringloop._dataplane", "uringloop's per-event path over io_uring", -1,
    dataplane_functions,
};

static int intern(PyObject **slot, const char *name)
{
    *slot = PyUnicode_InternFromString(name);
    return *slot ? 0 : -1;
}

static int add_type(PyObject *m, const char *name, PyTypeObject *type)
{
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__dataplane(void)
{
    if (intern(&str_set_result, "set_result") || intern(&str_set_exception, "set_exception") ||
        intern(&str_done, "done") || intern(&str_data_received, "data_received") ||
        intern(&str_get_buffer, "get_buffer") || intern(&str_buffer_updated, "buffer_updated") ||
        intern(&str_stream_eof, "_stream_eof") || intern(&str_stream_error, "_stream_error") ||
        intern(&str_stream_flushed, "_stream_flushed") ||
        intern(&str_protocol_error, "_protocol_error") ||
        intern(&str_pause_protocol, "_pause_protocol") ||
        intern(&str_resume_protocol, "_resume_protocol") ||
        intern(&str_stream_unpinned, "_stream_unpinned") ||
        intern(&str_stream_recv_over, "_stream_recv_over") || intern(&str_is_closed, "is_closed") ||
        intern(&str_fileno, "fileno"))
        return NULL;
    if (!(ul_minus_one = PyLong_FromLong(-1)))
        return NULL;
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&StreamType) < 0 ||
        PyType_Ready(&BufferPoolType) < 0 || PyType_Ready(&ZeroCopyBufferType) < 0 ||
        PyType_Ready(&LoopCoreType) < 0 || PyType_Ready(&ForwardType) < 0 ||
        sched_ready_types() < 0 || dgram_ready_type() < 0)
        return NULL;
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, ul_after_fork_child);
        atfork_done = 1;
    }
    PyObject *m = PyModule_Create(&dataplane_module);
    if (!m)
        return NULL;
#ifdef UL_FAULT_INJECTION
    const int fault_injection = 1;
#else
    const int fault_injection = 0;
#endif
    if (add_type(m, "Ring", &RingType) < 0 || add_type(m, "Stream", &StreamType) < 0 ||
        add_type(m, "Datagram", &DatagramType) < 0 ||
        add_type(m, "ZeroCopyBuffer", &ZeroCopyBufferType) < 0 ||
        add_type(m, "LoopCore", &LoopCoreType) < 0 || add_type(m, "Forward", &ForwardType) < 0 ||
        PyModule_AddIntConstant(m, "FAULT_INJECTION", fault_injection) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
