/* _memprof: a sampling heap profiler for CPython, after Go's runtime.MemProfile.

   Like Go's runtime (malloc.go, mprof.go), it counts the bytes allocated and records one
   allocation every `rate` bytes on average: the distance to the next sampled allocation is drawn
   from an exponential distribution with mean `rate`, so a block of `size` bytes is sampled with
   probability 1 - exp(-size/rate), whatever the sizes around it. A rate of 1 samples every block.

   It wraps the PYMEM_DOMAIN_MEM (PyMem_Malloc) and PYMEM_DOMAIN_OBJ (PyObject_Malloc) allocators
   with PEP 445 hooks, as Modules/_tracemalloc.c does. The GIL is held in both domains, so the
   state below needs no lock. PYMEM_DOMAIN_RAW (PyMem_RawMalloc, called without the GIL, and
   malloc itself) is not seen: C libraries' own buffers, and arenas, are not in the profile.

   Each sampled allocation costs a walk of its thread's frames (up to `max_frames`), read from
   the interpreter's internal frames as _tracemalloc.c does: PyThreadState_GetFrame() and
   PyFrame_GetBack() would create frame objects, which allocates inside malloc and can start a
   garbage collection there. A frame is stored as what is cheap: its code object (kept alive by a
   reference) and its instruction offset; lines are resolved only when a profile is built.

   Stacks are deduplicated in a hash table of records keyed, as Go's buckets are, by the stack
   AND the block size, so that each record has one size. A record counts the sampled blocks
   allocated and freed since start; bytes are counts times the size. Sampled blocks still live
   are in a second table, keyed by address, that free() and realloc() update. Every free() asks
   a small counting filter first: a byte per slot of addresses, zero where no sampled block
   lives, so that almost every free() costs one load.

   The sampler's own tables are allocated with the C library's malloc: no hook sees them, and
   tracemalloc does not trace them. While the sampler builds Python objects for a snapshot, its
   thread's allocations are not sampled (the `busy` guard).

   Supported: CPython 3.11 with the GIL (the internal frame layout differs in other versions).
   Elsewhere the module raises ImportError with the reason, and the tracemalloc profile stays. */

#define PY_SSIZE_T_CLEAN
#ifndef Py_BUILD_CORE_MODULE
#  define Py_BUILD_CORE_MODULE 1  /* the internal headers, for the frames */
#endif
#include <Python.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && !defined(Py_GIL_DISABLED)
#  define MEMPROF_SUPPORTED 1
#else
#  define MEMPROF_SUPPORTED 0
#endif

#if MEMPROF_SUPPORTED

#include "internal/pycore_frame.h"   /* _PyInterpreterFrame, _PyFrame_IsIncomplete */
#include "internal/pycore_pymem.h"   /* _Py_tracemalloc_config */
#include "internal/pycore_pystate.h" /* _PyThreadState_GET */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_RATE 524288     /* Go's runtime.MemProfileRate: 512 KiB */
#define MAX_FRAMES 65535        /* nframe is a uint16_t, as in tracemalloc */
#define FILTER_BITS 16          /* 65,536 one-byte counters: 64 KiB */
#define FILTER_SATURATED 255    /* a counter that reached it stays: never a false "not sampled" */
#define INITIAL_BUCKETS 1024

typedef struct {
    PyCodeObject *code;   /* a strong reference, held by the record */
    intptr_t lasti;       /* _PyInterpreterFrame_LASTI: code units, -1 before the first one */
} frame_t;

/* One stack and block size: Go's bucket. */
typedef struct record {
    struct record *next;  /* the next record in the same hash bucket */
    Py_uhash_t hash;
    size_t size;
    uint64_t allocs;      /* sampled blocks allocated since start */
    uint64_t frees;       /* ... and freed since */
    uint32_t index;       /* records are numbered from 0 in the order they are made */
    uint16_t nframe;
    frame_t frames[];     /* leaf first */
} record_t;

/* A sampled block still live. */
typedef struct block {
    struct block *next;
    uintptr_t address;
    record_t *record;
} block_t;

typedef struct {
    record_t **records;   /* hash buckets */
    size_t record_buckets, nrecords;
    block_t **blocks;
    size_t block_buckets, nblocks;
    frame_t *scratch;     /* the stack being read, max_frames long */
    size_t own_bytes;     /* C memory held by all of the above */
} tables_t;

/* One hooked domain: the allocator our hooks call, as _tracemalloc.c keeps `allocators`. */
typedef struct {
    PyMemAllocatorDomain domain;
    PyMemAllocatorEx wrapped;
    int installed;
} hook_t;

static struct {
    int running;
    size_t rate;
    int max_frames;
    size_t bytes_until_sample;  /* Go's mcache.nextSample; SIZE_MAX while not running */
    uint64_t random_state;
    PyThreadState *busy;        /* the thread in the sampler's own code: not sampled */
    volatile int forked;        /* set in a forked child: restart the totals at the next chance */
    uint64_t samples;           /* allocations sampled since start */
    uint64_t dropped;           /* samples lost because our own malloc failed */
    uint64_t generation;        /* how many times it started: record numbers restart each time */
    tables_t tables;
    uint8_t filter[1 << FILTER_BITS];
} sampler = {.bytes_until_sample = SIZE_MAX};

static hook_t hooks[] = {{.domain = PYMEM_DOMAIN_MEM}, {.domain = PYMEM_DOMAIN_OBJ}};
#define NHOOKS (sizeof(hooks) / sizeof(hooks[0]))


/* ---- random numbers and sampling distances ------------------------------------------------ */

static uint64_t
mix64(uint64_t x)
{
    /* splitmix64's finalizer: spreads a seed's bits, and hashes addresses */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void
seed_random(void)
{
    /* async-signal-safe: also called in a forked child */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    uint64_t seed = sampler.random_state ^ ((uint64_t)getpid() << 32) ^
                    (uint64_t)now.tv_nsec ^ ((uint64_t)now.tv_sec << 20);
    sampler.random_state = mix64(seed) | 1;  /* xorshift's state must not be 0 */
}

static uint64_t
random_next(void)
{
    /* xorshift64* */
    uint64_t x = sampler.random_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    sampler.random_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* Go's nextSample and fastexprand: -ln(q) * rate for q uniform in (0, 1], from 26 random bits,
   plus one byte. A rate of 1 samples everything. */
static size_t
next_sample_distance(void)
{
    if (sampler.rate <= 1) {
        return 0;
    }
    const int random_bits = 26;
    double q = (double)(random_next() >> (64 - random_bits)) + 1.0;
    double qlog = log2(q) - random_bits;
    if (qlog > 0) {
        qlog = 0;
    }
    return (size_t)(qlog * (-M_LN2 * (double)sampler.rate)) + 1;
}


/* ---- the tables ----------------------------------------------------------------------------- */

static inline size_t
filter_slot(uintptr_t address)
{
    return (size_t)((address * 0x9e3779b97f4a7c15ULL) >> (64 - FILTER_BITS));
}

static inline size_t
block_bucket(uintptr_t address, size_t nbuckets)
{
    return (size_t)(mix64(address) & (nbuckets - 1));
}

static void *
own_calloc(size_t nelem, size_t elsize)
{
    void *ptr = calloc(nelem, elsize);  /* the C library's: no PEP 445 hook sees it */
    if (ptr != NULL) {
        sampler.tables.own_bytes += nelem * elsize;
    }
    return ptr;
}

static void
own_free(void *ptr, size_t size)
{
    if (ptr != NULL) {
        sampler.tables.own_bytes -= size;
        free(ptr);
    }
}

static size_t
record_bytes(uint16_t nframe)
{
    return sizeof(record_t) + nframe * sizeof(frame_t);
}

static Py_uhash_t
stack_hash(size_t size, const frame_t *frames, int nframe)
{
    uint64_t hash = mix64(size + 1);
    for (int i = 0; i < nframe; i++) {
        hash = mix64(hash ^ (uintptr_t)frames[i].code);
        hash = mix64(hash ^ (uint64_t)frames[i].lasti);
    }
    return (Py_uhash_t)hash;
}

static int
same_stack(const record_t *record, Py_uhash_t hash, size_t size, const frame_t *frames,
           int nframe)
{
    if (record->hash != hash || record->size != size || record->nframe != nframe) {
        return 0;
    }
    for (int i = 0; i < nframe; i++) {
        if (record->frames[i].code != frames[i].code ||
                record->frames[i].lasti != frames[i].lasti) {
            return 0;
        }
    }
    return 1;
}

/* Double the buckets of a chained table when it is as full as it is wide; if our malloc fails,
   the chains just grow longer. */
static void
grow_records(void)
{
    tables_t *t = &sampler.tables;
    size_t nbuckets = t->record_buckets * 2;
    record_t **buckets = own_calloc(nbuckets, sizeof(record_t *));
    if (buckets == NULL) {
        return;
    }
    for (size_t i = 0; i < t->record_buckets; i++) {
        record_t *record = t->records[i];
        while (record != NULL) {
            record_t *next = record->next;
            size_t bucket = record->hash & (nbuckets - 1);
            record->next = buckets[bucket];
            buckets[bucket] = record;
            record = next;
        }
    }
    own_free(t->records, t->record_buckets * sizeof(record_t *));
    t->records = buckets;
    t->record_buckets = nbuckets;
}

static void
grow_blocks(void)
{
    tables_t *t = &sampler.tables;
    size_t nbuckets = t->block_buckets * 2;
    block_t **buckets = own_calloc(nbuckets, sizeof(block_t *));
    if (buckets == NULL) {
        return;
    }
    for (size_t i = 0; i < t->block_buckets; i++) {
        block_t *block = t->blocks[i];
        while (block != NULL) {
            block_t *next = block->next;
            size_t bucket = block_bucket(block->address, nbuckets);
            block->next = buckets[bucket];
            buckets[bucket] = block;
            block = next;
        }
    }
    own_free(t->blocks, t->block_buckets * sizeof(block_t *));
    t->blocks = buckets;
    t->block_buckets = nbuckets;
}

/* The record of this stack and size, created (holding its code objects) if it is new. */
static record_t *
find_record(size_t size, const frame_t *frames, int nframe)
{
    tables_t *t = &sampler.tables;
    Py_uhash_t hash = stack_hash(size, frames, nframe);
    record_t **bucket = &t->records[hash & (t->record_buckets - 1)];
    for (record_t *record = *bucket; record != NULL; record = record->next) {
        if (same_stack(record, hash, size, frames, nframe)) {
            return record;
        }
    }
    record_t *record = own_calloc(1, record_bytes((uint16_t)nframe));
    if (record == NULL) {
        return NULL;
    }
    record->hash = hash;
    record->size = size;
    record->nframe = (uint16_t)nframe;
    record->index = (uint32_t)t->nrecords;
    for (int i = 0; i < nframe; i++) {
        record->frames[i] = frames[i];
        Py_INCREF(frames[i].code);  /* allocates nothing: safe inside malloc */
    }
    record->next = *bucket;
    *bucket = record;
    if (++t->nrecords > t->record_buckets) {
        grow_records();
    }
    return record;
}

/* Forget a sampled block that is freed; the filter makes the usual case, a block that was never
   sampled, one load. */
static void
forget_sampled_block(uintptr_t address)
{
    tables_t *t = &sampler.tables;
    block_t **link = &t->blocks[block_bucket(address, t->block_buckets)];
    for (block_t *block = *link; block != NULL; link = &block->next, block = block->next) {
        if (block->address == address) {
            *link = block->next;
            block->record->frees++;
            t->nblocks--;
            own_free(block, sizeof(block_t));
            uint8_t *count = &sampler.filter[filter_slot(address)];
            if (*count != FILTER_SATURATED) {
                (*count)--;
            }
            return;
        }
    }
}

static inline void
forget_block(void *ptr)
{
    if (ptr != NULL && sampler.filter[filter_slot((uintptr_t)ptr)] != 0) {
        forget_sampled_block((uintptr_t)ptr);
    }
}

static void
remember_block(uintptr_t address, record_t *record)
{
    tables_t *t = &sampler.tables;
    block_t *block = own_calloc(1, sizeof(block_t));
    if (block == NULL) {
        record->frees++;  /* counted as allocated, but we cannot follow it */
        sampler.dropped++;
        return;
    }
    block->address = address;
    block->record = record;
    block_t **bucket = &t->blocks[block_bucket(address, t->block_buckets)];
    block->next = *bucket;
    *bucket = block;
    uint8_t *count = &sampler.filter[filter_slot(address)];
    if (*count != FILTER_SATURATED) {
        (*count)++;
    }
    if (++t->nblocks > t->block_buckets) {
        grow_blocks();
    }
}

/* In a forked child: what the parent allocated is not the child's. The totals restart from
   what is live, so that allocated stays at least in use. */
static void
restart_totals(void)
{
    tables_t *t = &sampler.tables;
    sampler.forked = 0;
    for (size_t i = 0; i < t->record_buckets; i++) {
        for (record_t *record = t->records[i]; record != NULL; record = record->next) {
            record->allocs -= record->frees;
            record->frees = 0;
        }
    }
}


/* ---- sampling --------------------------------------------------------------------------------- */

/* The frames of `tstate`, leaf first, from the internal frames: nothing is allocated. */
static int
read_stack(PyThreadState *tstate, frame_t *frames, int max_frames)
{
    int nframe = 0;
    if (tstate == NULL || tstate->cframe == NULL) {
        return 0;
    }
    _PyInterpreterFrame *frame = tstate->cframe->current_frame;
    for (; frame != NULL && nframe < max_frames; frame = frame->previous) {
        if (_PyFrame_IsIncomplete(frame)) {  /* being set up: no instruction yet */
            continue;
        }
        frames[nframe].code = frame->f_code;
        frames[nframe].lasti = _PyInterpreterFrame_LASTI(frame);
        nframe++;
    }
    return nframe;
}

static void
sample_allocation(void *ptr, size_t size)
{
    if (!sampler.running) {
        sampler.bytes_until_sample = SIZE_MAX;
        return;
    }
    sampler.bytes_until_sample = next_sample_distance();
    PyThreadState *tstate = _PyThreadState_GET();
    if (size == 0 || tstate == sampler.busy) {
        return;  /* an empty block weighs nothing; the sampler's own blocks are not profiled */
    }
    if (sampler.forked) {
        restart_totals();
    }
    /* A block at this address that we still think live was freed where we cannot see it. */
    forget_block(ptr);
    int nframe = read_stack(tstate, sampler.tables.scratch, sampler.max_frames);
    record_t *record = find_record(size, sampler.tables.scratch, nframe);
    if (record == NULL) {
        sampler.dropped++;
        return;
    }
    record->allocs++;
    sampler.samples++;
    remember_block((uintptr_t)ptr, record);
}

/* Go's mallocgc: `if size < c.nextSample { c.nextSample -= size } else { profilealloc() }`. */
static inline void
count_allocation(void *ptr, size_t size)
{
    if (size < sampler.bytes_until_sample) {
        sampler.bytes_until_sample -= size;
        return;
    }
    sample_allocation(ptr, size);
}


/* ---- the PEP 445 hooks ------------------------------------------------------------------------ */

static void *
hook_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *alloc = (PyMemAllocatorEx *)ctx;
    void *ptr = alloc->malloc(alloc->ctx, size);
    if (ptr != NULL) {
        count_allocation(ptr, size);
    }
    return ptr;
}

static void *
hook_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *alloc = (PyMemAllocatorEx *)ctx;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) {
        return NULL;  /* nelem * elsize would overflow */
    }
    void *ptr = alloc->calloc(alloc->ctx, nelem, elsize);
    if (ptr != NULL) {
        count_allocation(ptr, nelem * elsize);
    }
    return ptr;
}

static void *
hook_realloc(void *ctx, void *ptr, size_t new_size)
{
    PyMemAllocatorEx *alloc = (PyMemAllocatorEx *)ctx;
    void *new_ptr = alloc->realloc(alloc->ctx, ptr, new_size);
    if (new_ptr == NULL) {
        return NULL;  /* failed: the old block is still there, and still ours */
    }
    /* The old block is gone, even where it stays in place: it had another size. The new one
       is an allocation of the new size. */
    forget_block(ptr);
    count_allocation(new_ptr, new_size);
    return new_ptr;
}

static void
hook_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *alloc = (PyMemAllocatorEx *)ctx;
    forget_block(ptr);
    alloc->free(alloc->ctx, ptr);
}

static int
hook_is_on_top(hook_t *hook)
{
    PyMemAllocatorEx current;
    PyMem_GetAllocator(hook->domain, &current);
    return current.malloc == hook_malloc && current.ctx == &hook->wrapped;
}

static void
install_hooks(void)
{
    for (size_t i = 0; i < NHOOKS; i++) {
        hook_t *hook = &hooks[i];
        if (hook->installed) {
            continue;  /* still in the chain, below whatever wrapped it since */
        }
        PyMem_GetAllocator(hook->domain, &hook->wrapped);
        PyMemAllocatorEx ours = {
            .ctx = &hook->wrapped,
            .malloc = hook_malloc,
            .calloc = hook_calloc,
            .realloc = hook_realloc,
            .free = hook_free,
        };
        PyMem_SetAllocator(hook->domain, &ours);
        hook->installed = 1;
    }
}

/* Unhook where we are on top. Where something wrapped us after we started (tracemalloc), it
   calls our hooks and will put them back when it stops: they stay, passing everything through,
   rather than unhooking it. */
static void
uninstall_hooks(void)
{
    for (size_t i = 0; i < NHOOKS; i++) {
        hook_t *hook = &hooks[i];
        if (hook->installed && hook_is_on_top(hook)) {
            PyMem_SetAllocator(hook->domain, &hook->wrapped);
            hook->installed = 0;
        }
    }
}


/* ---- start, stop, snapshot -------------------------------------------------------------------- */

/* Free detached tables: DECREF may free a code object, whose free() enters our hook; the hook
   must then find empty tables, not these. */
static void
free_tables(tables_t *t)
{
    for (size_t i = 0; i < t->block_buckets; i++) {
        block_t *block = t->blocks[i];
        while (block != NULL) {
            block_t *next = block->next;
            free(block);
            block = next;
        }
    }
    free(t->blocks);
    for (size_t i = 0; i < t->record_buckets; i++) {
        record_t *record = t->records[i];
        while (record != NULL) {
            record_t *next = record->next;
            for (int j = 0; j < record->nframe; j++) {
                Py_DECREF(record->frames[j].code);
            }
            free(record);
            record = next;
        }
    }
    free(t->records);
    free(t->scratch);
}

static int
new_tables(int max_frames)
{
    tables_t *t = &sampler.tables;
    memset(t, 0, sizeof(*t));
    t->records = own_calloc(INITIAL_BUCKETS, sizeof(record_t *));
    t->blocks = own_calloc(INITIAL_BUCKETS, sizeof(block_t *));
    t->scratch = own_calloc((size_t)max_frames, sizeof(frame_t));
    t->record_buckets = t->block_buckets = INITIAL_BUCKETS;
    if (t->records == NULL || t->blocks == NULL || t->scratch == NULL) {
        tables_t failed = *t;
        memset(t, 0, sizeof(*t));
        free_tables(&failed);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(start_doc,
"start(rate, max_frames)\n--\n\n"
"Sample one allocation every `rate` bytes on average (1: every one), keeping up to\n"
"`max_frames` frames of each sampled stack. RuntimeError if it runs already, or if tracemalloc\n"
"was started first (its stop() would unhook the sampler).");

static PyObject *
memprof_start(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_ssize_t rate;
    int max_frames;
    if (!PyArg_ParseTuple(args, "ni:start", &rate, &max_frames)) {
        return NULL;
    }
    if (rate < 1) {
        PyErr_SetString(PyExc_ValueError, "rate must be at least 1 byte");
        return NULL;
    }
    if (max_frames < 1 || max_frames > MAX_FRAMES) {
        PyErr_Format(PyExc_ValueError, "max_frames must be from 1 to %d", MAX_FRAMES);
        return NULL;
    }
    if (sampler.running) {
        PyErr_SetString(PyExc_RuntimeError, "the sampling heap profiler is already running");
        return NULL;
    }
    if (_Py_tracemalloc_config.tracing && !hooks[0].installed) {
        PyErr_SetString(PyExc_RuntimeError,
            "tracemalloc is tracing: start the sampling heap profiler first, or stop "
            "tracemalloc (tracemalloc.stop() would silently unhook a sampler started after it)");
        return NULL;
    }
    if (new_tables(max_frames) < 0) {
        return PyErr_NoMemory();
    }
    memset(sampler.filter, 0, sizeof(sampler.filter));
    sampler.rate = (size_t)rate;
    sampler.max_frames = max_frames;
    sampler.samples = sampler.dropped = 0;
    sampler.generation++;
    sampler.forked = 0;
    sampler.busy = NULL;
    seed_random();
    sampler.bytes_until_sample = next_sample_distance();
    sampler.running = 1;
    install_hooks();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc,
"stop()\n--\n\n"
"Stop sampling and forget every record. Unhooks the allocators unless something (tracemalloc)\n"
"wrapped them since start: then the hooks stay in its chain, passing everything through.");

static PyObject *
memprof_stop(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    if (!sampler.running) {
        Py_RETURN_NONE;
    }
    sampler.running = 0;
    sampler.bytes_until_sample = SIZE_MAX;
    uninstall_hooks();
    tables_t detached = sampler.tables;
    memset(&sampler.tables, 0, sizeof(sampler.tables));
    memset(sampler.filter, 0, sizeof(sampler.filter));
    free_tables(&detached);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(is_running_doc, "is_running()\n--\n\nWhether the sampler is sampling.");

static PyObject *
memprof_is_running(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(sampler.running);
}

PyDoc_STRVAR(snapshot_doc,
"snapshot(known)\n--\n\n"
"The records: a list of (index, size, allocated, freed, frames) with counts of sampled blocks;\n"
"frames is a flat tuple (code, line, code, line, ...) leaf first, or None for the records\n"
"numbered below `known`, whose stacks the caller has from an earlier snapshot of the same\n"
"generation (stats()): a record's stack never changes. Empty when not running.");

static PyObject *
snapshot_frames(const record_t *record)
{
    PyObject *frames = PyTuple_New(2 * (Py_ssize_t)record->nframe);
    if (frames == NULL) {
        return NULL;
    }
    for (int i = 0; i < record->nframe; i++) {
        PyCodeObject *code = record->frames[i].code;
        int offset = (int)record->frames[i].lasti * (int)sizeof(_Py_CODEUNIT);
        int line = PyCode_Addr2Line(code, offset);
        PyObject *lineno = PyLong_FromLong(line);
        if (lineno == NULL) {
            Py_DECREF(frames);
            return NULL;
        }
        Py_INCREF(code);
        PyTuple_SET_ITEM(frames, 2 * i, (PyObject *)code);
        PyTuple_SET_ITEM(frames, 2 * i + 1, lineno);
    }
    return frames;
}

static PyObject *
snapshot_record(const record_t *record, Py_ssize_t known)
{
    PyObject *frames = Py_None;
    Py_INCREF(frames);
    if ((Py_ssize_t)record->index >= known) {
        Py_DECREF(frames);
        frames = snapshot_frames(record);
        if (frames == NULL) {
            return NULL;
        }
    }
    return Py_BuildValue("(InKKN)", (unsigned int)record->index, (Py_ssize_t)record->size,
                         (unsigned long long)record->allocs,
                         (unsigned long long)record->frees, frames);
}

static PyObject *
memprof_snapshot(PyObject *Py_UNUSED(module), PyObject *known_object)
{
    Py_ssize_t known = PyLong_AsSsize_t(known_object);
    if (known == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *records = PyList_New(0);
    if (records == NULL || !sampler.running) {
        return records;
    }
    if (sampler.forked) {
        restart_totals();
    }
    /* No collection while we walk: a finalizer could run Python code, release the GIL, and let
       another thread stop the sampler under us. Our own allocations are not sampled. */
    int gc_was_enabled = PyGC_Disable();
    PyThreadState *busy_before = sampler.busy;
    sampler.busy = _PyThreadState_GET();
    const tables_t *t = &sampler.tables;
    for (size_t i = 0; i < t->record_buckets && records != NULL; i++) {
        for (const record_t *record = t->records[i]; record != NULL; record = record->next) {
            PyObject *item = snapshot_record(record, known);
            if (item == NULL || PyList_Append(records, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(records);
                break;
            }
            Py_DECREF(item);
        }
    }
    sampler.busy = busy_before;
    if (gc_was_enabled) {
        PyGC_Enable();
    }
    return records;
}

PyDoc_STRVAR(stats_doc,
"stats()\n--\n\n"
"A dict: running, rate, max_frames, samples, dropped, records, live_blocks, own_bytes (the C\n"
"memory of the sampler's tables and filter).");

static PyObject *
memprof_stats(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    const tables_t *t = &sampler.tables;
    size_t own = sampler.running ? t->own_bytes + sizeof(sampler.filter) : 0;
    return Py_BuildValue("{s:O,s:n,s:i,s:K,s:K,s:K,s:n,s:n,s:n}",
                         "running", sampler.running ? Py_True : Py_False,
                         "rate", (Py_ssize_t)sampler.rate,
                         "max_frames", sampler.max_frames,
                         "samples", (unsigned long long)sampler.samples,
                         "dropped", (unsigned long long)sampler.dropped,
                         "generation", (unsigned long long)sampler.generation,
                         "records", (Py_ssize_t)t->nrecords,
                         "live_blocks", (Py_ssize_t)t->nblocks,
                         "own_bytes", (Py_ssize_t)own);
}

PyDoc_STRVAR(hooks_installed_doc,
"hooks_installed()\n--\n\n"
"Whether the hooks are in the allocator chain (sampling or, wrapped, passing through).");

static PyObject *
memprof_hooks_installed(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(hooks[0].installed || hooks[1].installed);
}

PyDoc_STRVAR(set_busy_doc,
"set_busy(busy)\n--\n\n"
"Whether this thread is doing the profiler's own work (building a profile): while it is, its\n"
"allocations are not sampled. One thread at a time: the caller holds a lock.");

static PyObject *
memprof_set_busy(PyObject *Py_UNUSED(module), PyObject *busy)
{
    int is_busy = PyObject_IsTrue(busy);
    if (is_busy < 0) {
        return NULL;
    }
    sampler.busy = is_busy ? _PyThreadState_GET() : NULL;
    Py_RETURN_NONE;
}

static void
after_fork_in_child(void)
{
    seed_random();       /* else parent and child would sample the same allocations */
    sampler.forked = 1;  /* the totals restart at the next sample or snapshot, under the GIL */
}

static PyMethodDef memprof_methods[] = {
    {"start", memprof_start, METH_VARARGS, start_doc},
    {"stop", memprof_stop, METH_NOARGS, stop_doc},
    {"is_running", memprof_is_running, METH_NOARGS, is_running_doc},
    {"snapshot", memprof_snapshot, METH_O, snapshot_doc},
    {"stats", memprof_stats, METH_NOARGS, stats_doc},
    {"hooks_installed", memprof_hooks_installed, METH_NOARGS, hooks_installed_doc},
    {"set_busy", memprof_set_busy, METH_O, set_busy_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef memprof_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asgi_pprof._memprof",
    .m_doc = "A sampling heap profiler after Go's runtime.MemProfile (see asgi_pprof.sampling).",
    .m_size = -1,  /* one sampler per process: the allocator hooks are process-wide */
    .m_methods = memprof_methods,
};

PyMODINIT_FUNC
PyInit__memprof(void)
{
    static int atfork_registered = 0;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_ImportError, "pthread_atfork failed");
            return NULL;
        }
        atfork_registered = 1;
    }
    PyObject *module = PyModule_Create(&memprof_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "DEFAULT_RATE", DEFAULT_RATE) < 0 ||
            PyModule_AddIntConstant(module, "MAX_FRAMES", MAX_FRAMES) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

#else  /* !MEMPROF_SUPPORTED */

PyMODINIT_FUNC
PyInit__memprof(void)
{
    PyErr_Format(PyExc_ImportError,
                 "the sampling heap profiler supports CPython 3.11 with the GIL only "
                 "(this is %s); the tracemalloc heap profile is still available",
                 Py_GetVersion());
    return NULL;
}

#endif
