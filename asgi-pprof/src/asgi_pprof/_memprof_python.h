/* What differs between CPython versions for the sampler: which interpreters it runs on, where a
   thread's frames are, and how a frame's code and line are read. The next version is this file.

   The frames are read from the interpreter's internal frames, as Python/tracemalloc.c reads them:
   PyThreadState_GetFrame() would create frame objects, which allocates inside malloc. */

#ifndef ASGI_PPROF_MEMPROF_PYTHON_H
#define ASGI_PPROF_MEMPROF_PYTHON_H

#define PY_SSIZE_T_CLEAN
#ifndef Py_BUILD_CORE_MODULE
#  define Py_BUILD_CORE_MODULE 1  /* the internal headers, for the frames */
#endif
#include <Python.h>

/* CPython 3.11 to 3.14 with the GIL, and free-threaded 3.13. Free-threaded 3.14 is refused: it
   keeps bytecode per thread and could not be tested (no build of it can be had here). Elsewhere
   the module is a stub whose import says why; a reason given at build time
   (-DMEMPROF_UNSUPPORTED_REASON='"..."') makes that stub anywhere, for its test. */
#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030F0000
#  define MEMPROF_UNSUPPORTED_REASON "CPython 3.11 to 3.14"
#elif defined(Py_GIL_DISABLED) && PY_VERSION_HEX >= 0x030E0000
#  define MEMPROF_UNSUPPORTED_REASON \
       "CPython 3.11 to 3.14 with the GIL and free-threaded 3.13 (free-threaded 3.14 is untested)"
#endif

#ifndef MEMPROF_UNSUPPORTED_REASON

#if PY_VERSION_HEX >= 0x030E0000
/* 3.14's frame header has inline functions with unused parameters: not ours to fix. */
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wunused-parameter"
#  include "internal/pycore_interpframe.h"
#  pragma GCC diagnostic pop
#else
#  include "internal/pycore_frame.h"
#endif
#include "internal/pycore_context.h"  /* a context variable's lookup cache */

/* This thread's state if it holds the GIL (is attached), else NULL: the raw domain is called
   without it, and then its frames are not ours to read. */
static inline PyThreadState *
memprof_attached_thread(void)
{
#if PY_VERSION_HEX < 0x030C0000
    /* 3.11 answers the thread that holds the GIL, whichever thread asks. */
    PyThreadState *tstate = _PyThreadState_UncheckedGet();
    return tstate != NULL && tstate == PyGILState_GetThisThreadState() ? tstate : NULL;
#elif PY_VERSION_HEX < 0x030D0000
    return _PyThreadState_UncheckedGet();
#else
    return PyThreadState_GetUnchecked();
#endif
}

/* The innermost frame of a thread. */
static inline _PyInterpreterFrame *
memprof_current_frame(PyThreadState *tstate)
{
#if PY_VERSION_HEX < 0x030D0000
    return tstate->cframe != NULL ? tstate->cframe->current_frame : NULL;
#else
    return tstate->current_frame;
#endif
}

/* A frame's code object, or NULL for a frame to leave out: one being set up (no instruction yet)
   or one of the interpreter's own entry frames. */
static inline PyCodeObject *
memprof_frame_code(_PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX < 0x030C0000
    return _PyFrame_IsIncomplete(frame) ? NULL : frame->f_code;
#elif PY_VERSION_HEX < 0x030D0000
    if (frame->owner == FRAME_OWNED_BY_CSTACK || _PyFrame_IsIncomplete(frame)) {
        return NULL;
    }
    return frame->f_code;
#elif PY_VERSION_HEX < 0x030E0000
    if (frame->owner == FRAME_OWNED_BY_CSTACK || !PyCode_Check(frame->f_executable) ||
            _PyFrame_IsIncomplete(frame)) {
        return NULL;
    }
    return (PyCodeObject *)frame->f_executable;
#else
    if (frame->owner >= FRAME_OWNED_BY_INTERPRETER) {
        return NULL;
    }
    PyObject *executable = PyStackRef_AsPyObjectBorrow(frame->f_executable);
    if (!PyCode_Check(executable) || _PyFrame_IsIncomplete(frame)) {
        return NULL;
    }
    return (PyCodeObject *)executable;
#endif
}

/* The instruction a frame is running, in code units from the start of its bytecode. */
static inline int
memprof_frame_lasti(_PyInterpreterFrame *frame)
{
    return _PyInterpreterFrame_LASTI(frame);
}

/* A context variable's value here (a new reference, or NULL if unset and no default), read
   without leaving a trace. PyContextVar_Get() caches what it finds in the variable; an allocation
   made inside ContextVar.set() or reset(), before the new context is in place, would cache a
   value that is about to be stale, and Python's own reads would then return it. */
static inline PyObject *
memprof_context_value(PyObject *variable)
{
    PyObject *value = NULL;
#ifndef Py_GIL_DISABLED  /* free-threaded builds keep no cache */
    PyContextVar *var = (PyContextVar *)variable;
    PyObject *cached = var->var_cached;
    uint64_t cached_tsid = var->var_cached_tsid, cached_tsver = var->var_cached_tsver;
#endif
    if (PyContextVar_Get(variable, NULL, &value) < 0) {
        value = NULL;
    }
#ifndef Py_GIL_DISABLED
    var->var_cached = cached;
    var->var_cached_tsid = cached_tsid;
    var->var_cached_tsver = cached_tsver;
#endif
    return value;
}

#endif  /* !MEMPROF_UNSUPPORTED_REASON */
#endif  /* ASGI_PPROF_MEMPROF_PYTHON_H */
