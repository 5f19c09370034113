/* _memprof: a sampling heap profiler for CPython, after Go's runtime.MemProfile.

   Like Go's runtime (malloc.go, mprof.go), it counts the bytes allocated and records one
   allocation every `rate` bytes on average: the distance to the next sampled allocation is drawn
   from an exponential distribution with mean `rate`, so a block of `size` bytes is sampled with
   probability 1 - exp(-size/rate), whatever the sizes around it. A rate of 1 samples every block.
   Each thread keeps its own distance, as each of Go's Ms does: the common path is a thread-local
   subtraction, no lock, no atomic.

   It wraps all three allocator domains with PEP 445 hooks, as Modules/_tracemalloc.c does:
   PYMEM_DOMAIN_OBJ and MEM (called with the GIL, or attached, held) and RAW (called from any
   thread, with or without it). pymalloc hands blocks over 512 bytes to the raw domain: `start`
   finds the size from which it does, and the OBJ and MEM hooks leave such blocks to the raw hook,
   so that no block is counted twice. A sampled block's stack is read only where its thread holds
   the GIL; elsewhere the block is recorded under a stack of its own kind (NO_GIL).

   A sampled allocation reads its thread's frames (up to `max_frames`) from the interpreter's
   internal frames (see _memprof_python.h) and keeps names, not code objects: each function's file
   name, qualified name and first line are copied into the sampler's own memory, so nothing it
   records keeps a Python object alive, and two functions at the same file and line stay two.
   Functions, locations (a function and a line) and stacks are interned in tables; a record is a
   stack, a block size class (Go's size classes: exact for small blocks, 12.5% apart above), a
   label set (read from a context variable the caller names) and optionally a thread. It counts
   the sampled blocks and bytes allocated and freed. Live sampled blocks are in a table keyed by
   address, behind a counting filter that makes almost every free() one load.

   Everything the sampler holds is bounded by `max_bytes`. At the bound, records with no live
   block are folded into one FOLDED record (their totals kept), least recently sampled first; if
   that is not enough, new stacks are counted into one TABLE_FULL record. Both are visible.

   The tables sit behind one mutex, taken only on a sampled allocation, on the free of a block that
   may be sampled, and by `snapshot`, which copies what it needs under the lock and builds Python
   objects after releasing it. So the sampler runs on free-threaded builds too (Py_mod_gil says it
   does not need the GIL). The hooks read only static state, never their context pointer, so a
   thread that races a start or a stop reaches a valid allocator either way.

   Supported interpreters, and what differs between them: _memprof_python.h. Elsewhere the module
   raises ImportError with the reason, and the tracemalloc profile stays. */

#include "_memprof_python.h"

#ifndef MEMPROF_UNSUPPORTED_REASON

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_RATE 524288          /* Go's runtime.MemProfileRate: 512 KiB */
#define DEFAULT_MAX_BYTES (4 << 20)  /* everything the sampler holds */
#define MIN_MAX_BYTES (256 << 10)
#define MAX_FRAMES 128               /* Go keeps 128 since 1.23; deeper stacks are cut */
#define FILTER_BITS 16               /* 65,536 one-byte counters: 64 KiB */
#define FILTER_SATURATED 255         /* a counter that reached it stays: never a false "not sampled" */
#define INITIAL_BUCKETS 256
#define IDLE_DISTANCE (1 << 20)      /* while stopped, each thread looks in once per MiB */
#define THREAD_LOCAL __thread __attribute__((tls_model("initial-exec")))

/* The kinds of stacks: a real one, or one that stands for samples without one. */
enum {STACK_FRAMES = 0, STACK_FOLDED, STACK_TABLE_FULL, STACK_NO_FRAMES, STACK_NO_GIL, NKINDS};

/* ---- the tables' types ------------------------------------------------------------------------ */

/* The head of every entry: entries are chained in the buckets of an index. */
typedef struct node {
    struct node *next;
    uint64_t hash;
} node_t;

typedef struct {
    node_t **buckets;
    size_t nbuckets;  /* a power of two */
    size_t count;
} index_t;

/* A str's characters, copied: kind (1, 2 or 4 bytes a character) and length. */
typedef struct {
    uint32_t length;
    uint8_t kind;
} text_t;

typedef struct text_copy {
    text_t text;
    char data[];
} text_copy_t;

typedef struct function {
    node_t node;
    uint32_t id, refs;         /* refs: the locations that point here */
    int firstlineno;
    uint8_t own, reported;     /* own: a file of the profiler's own (its samples are left out) */
    text_t filename, qualname;
    char data[];               /* the file name's characters, then the qualified name's */
} function_t;

typedef struct location {
    node_t node;
    uint32_t id, refs;         /* refs: the stacks that hold it */
    function_t *function;
    int line;
    uint8_t reported;
    int32_t cached_at;         /* its slot in the frame cache, or -1 */
} location_t;

/* What a frame was found to be: its code and instruction, and the names and line table that made
   them this location. A code object freed and another made at its address hits only if its names
   (the same str objects), first line and line table (by hash) are the same: the same location. */
typedef struct {
    PyCodeObject *code;
    PyObject *filename, *qualname;  /* compared by identity, never dereferenced */
    Py_hash_t linetable_hash;
    int lasti, firstlineno;
    location_t *location;
} frame_cache_t;

#define FRAME_CACHE_SLOTS 1024

typedef struct stack {
    node_t node;
    uint32_t id, refs;         /* refs: the records that hold it */
    uint16_t nframe;
    uint8_t kind, own, reported;
    location_t *frames[];      /* leaf first */
} call_stack_t;

/* Go's bucket: one stack, size class, label set and thread. */
typedef struct record {
    node_t node;
    call_stack_t *stack;
    uint32_t size_class, label;
    uint64_t thread;
    uint64_t allocs, frees;              /* sampled blocks allocated since start, and freed */
    uint64_t alloc_bytes, free_bytes;    /* ... their requested bytes */
    uint64_t last_sample;                /* the sample count when it was last sampled */
} record_t;

/* A sampled block still live. */
typedef struct block {
    node_t node;
    uintptr_t address;
    record_t *record;
    size_t size;
} block_t;

/* Ids of reported entries since freed, for the next snapshot to pass on. */
typedef struct {
    uint32_t *ids;
    size_t count, capacity;
} id_list_t;

typedef struct {
    index_t functions, locations, stacks, records, blocks;
    call_stack_t *special[NKINDS];            /* the stacks of the kinds without frames */
    frame_cache_t *frame_cache;          /* FRAME_CACHE_SLOTS, direct-mapped */
    record_t *folded, *table_full;
    id_list_t dead_functions, dead_locations, dead_stacks;
    uint32_t next_id;                    /* ids are unique across the kinds, from 1 */
    int resync;                          /* a dead list overflowed: report everything again */
    size_t own_bytes;                    /* everything above, in the C library's memory */
} tables_t;

/* One hooked domain: the allocator our hooks call, as _tracemalloc.c keeps `allocators`. */
typedef struct {
    PyMemAllocatorEx wrapped;
    PyMemAllocatorEx ours;
    int installed;
} hook_t;

/* What each thread keeps for itself. Threads are listed (from their first allocation to their
   end) so that a start can send each back to draw its distance at the new rate. */
typedef struct thread_state {
    size_t bytes_until_sample;  /* Go's mcache.nextSample; 0: draw before the next allocation */
    uint64_t generation;        /* the start it was drawn for */
    uint64_t random_state;
    int in_sampler;             /* in the sampler's own code: everything passes through */
    int probing, probe_seen;    /* start() asking which sizes pymalloc hands to the raw domain */
    int in_realloc, raw_handled;  /* an OBJ or MEM realloc that pymalloc passed to the raw domain */
    int listed;                 /* 1 on the list, 0 not yet, -1 ended (never again) */
    uint64_t serial;            /* this thread's number, never reused (idents are) */
    uint64_t ident;             /* PyThread_get_thread_ident(), to name it while it lives */
    struct thread_state *next_thread;
} thread_state_t;

static THREAD_LOCAL thread_state_t thread_state;
static thread_state_t *threads;     /* every listed thread's state, behind table_lock */
static uint64_t thread_serials;     /* the last serial given to a thread */
static pthread_key_t thread_end;    /* its destructor takes a thread off the list */

static struct {
    int running;                  /* read without the lock: atomic */
    uint64_t generation;          /* how many times it started; read without the lock: atomic */
    size_t rate, max_bytes;
    int max_frames;
    int label_threads;            /* records keep the thread that allocated */
    PyObject *label_variable;     /* a contextvars.ContextVar holding an int label set, or NULL */
    PyInterpreterState *owner;    /* the interpreter that started it: the only one to stop it */
    size_t delegated_above[3];    /* by domain: larger blocks are counted by the raw hook */
    uint64_t samples;             /* allocations sampled since start */
    uint64_t dropped;             /* sampled blocks not followed: no room for them */
    uint64_t folded;              /* records folded to make room */
    uint64_t table_full;          /* samples counted in the table-full record: no room for theirs */
    uint64_t samples_at_snapshot; /* `samples` when the last snapshot was taken */
    uint64_t records_since_fold;  /* records made since the last folding pass */
    double inuse_estimate;        /* the bytes the live sampled blocks stand for */
    tables_t tables;
    struct text_copy **own_files; /* the profiler's own files: their stacks are left out */
    size_t nown_files;
    uint8_t filter[1 << FILTER_BITS];
} sampler;

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static hook_t hooks[3];  /* by PyMemAllocatorDomain: RAW, MEM, OBJ */

/* The lock, taken by a thread marked as in the sampler: should anything allocate while it is
   held, the hooks pass it through instead of taking the lock again. Nothing that makes a Python
   object (or sets an exception) runs while it is held. */
static int
lock_tables(void)
{
    int was_in_sampler = thread_state.in_sampler;
    thread_state.in_sampler = 1;
    pthread_mutex_lock(&table_lock);
    return was_in_sampler;
}

static void
unlock_tables(int was_in_sampler)
{
    pthread_mutex_unlock(&table_lock);
    thread_state.in_sampler = was_in_sampler;
}

static inline int
is_running(void)
{
    return __atomic_load_n(&sampler.running, __ATOMIC_ACQUIRE);
}


/* ---- random numbers and sampling distances ------------------------------------------------ */

static uint64_t
mix64(uint64_t x)
{
    /* splitmix64's finalizer: spreads a seed's bits, and hashes keys */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void
seed_random(thread_state_t *t)
{
    /* async-signal-safe: also called in a forked child */
    static uint64_t seeds;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    uint64_t seed = __atomic_add_fetch(&seeds, 1, __ATOMIC_RELAXED) ^ (uint64_t)(uintptr_t)t ^
                    ((uint64_t)getpid() << 32) ^ (uint64_t)now.tv_nsec ^
                    ((uint64_t)now.tv_sec << 20);
    t->random_state = mix64(seed) | 1;  /* xorshift's state must not be 0 */
}

static uint64_t
random_next(thread_state_t *t)
{
    /* xorshift64* */
    uint64_t x = t->random_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t->random_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* Go's nextSample and fastexprand: -ln(q) * rate for q uniform in (0, 1], from 26 random bits,
   plus one byte. A rate of 1 samples everything. */
static size_t
next_sample_distance(thread_state_t *t, size_t rate)
{
    if (rate <= 1) {
        return 0;
    }
    const int random_bits = 26;
    double q = (double)(random_next(t) >> (64 - random_bits)) + 1.0;
    double qlog = log2(q) - random_bits;
    if (qlog > 0) {
        qlog = 0;
    }
    return (size_t)(qlog * (-M_LN2 * (double)rate)) + 1;
}

/* What a sampled block of `size` bytes stands for: Go's scaleHeapSample for one block. */
static double
block_weight(size_t size, size_t rate)
{
    if (rate <= 1) {
        return (double)size;
    }
    return (double)size / -expm1(-(double)size / (double)rate);
}

/* Go's size classes, in spirit: 16-byte steps up to 512 bytes (pymalloc's), then 8 classes per
   power of two, at most 12.5% apart. A record's block sizes are those of one class. */
static uint32_t
size_class(size_t size)
{
    if (size <= 512) {
        return (uint32_t)((size + 15) / 16);
    }
    int bits = 63 - __builtin_clzll((unsigned long long)(size - 1));  /* 9 or more */
    size_t step = (size_t)1 << (bits - 3);
    size_t within = (size - 1 - ((size_t)1 << bits)) / step;        /* 0 to 7 */
    return 32 + (uint32_t)(bits - 9) * 8 + (uint32_t)within + 1;
}


/* ---- the sampler's own memory: the C library's, which no hook sees; bounded ------------------ */

static void *
own_calloc(size_t nelem, size_t elsize)
{
    tables_t *t = &sampler.tables;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) {
        return NULL;
    }
    size_t size = nelem * elsize;
    /* The filter counts toward the bound: max_bytes is all the sampler holds. */
    if (t->own_bytes + size + sizeof(sampler.filter) > sampler.max_bytes) {
        return NULL;
    }
    void *ptr = calloc(nelem, elsize);
    if (ptr != NULL) {
        t->own_bytes += size;
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


/* ---- indexes: chained hash tables of entries that start with a node ------------------------ */

static int
index_init(index_t *index)
{
    index->buckets = own_calloc(INITIAL_BUCKETS, sizeof(node_t *));
    index->nbuckets = INITIAL_BUCKETS;
    index->count = 0;
    return index->buckets == NULL ? -1 : 0;
}

static inline node_t *
index_first(const index_t *index, uint64_t hash)
{
    return index->buckets[hash & (index->nbuckets - 1)];
}

/* Double the buckets when the index is as full as it is wide; if there is no room, the chains
   just grow longer. */
static void
index_grow(index_t *index)
{
    size_t nbuckets = index->nbuckets * 2;
    node_t **buckets = own_calloc(nbuckets, sizeof(node_t *));
    if (buckets == NULL) {
        return;
    }
    for (size_t i = 0; i < index->nbuckets; i++) {
        node_t *node = index->buckets[i];
        while (node != NULL) {
            node_t *next = node->next;
            node_t **bucket = &buckets[node->hash & (nbuckets - 1)];
            node->next = *bucket;
            *bucket = node;
            node = next;
        }
    }
    own_free(index->buckets, index->nbuckets * sizeof(node_t *));
    index->buckets = buckets;
    index->nbuckets = nbuckets;
}

static void
index_add(index_t *index, node_t *node)
{
    node_t **bucket = &index->buckets[node->hash & (index->nbuckets - 1)];
    node->next = *bucket;
    *bucket = node;
    if (++index->count > index->nbuckets) {
        index_grow(index);
    }
}

static void
index_remove(index_t *index, node_t *node)
{
    node_t **link = &index->buckets[node->hash & (index->nbuckets - 1)];
    while (*link != node) {
        link = &(*link)->next;
    }
    *link = node->next;
    index->count--;
}


/* ---- names: a str's characters, copied and compared without allocating -------------------- */

static text_t
text_of(PyObject *str)
{
    text_t text = {0, PyUnicode_1BYTE_KIND};
    if (str != NULL && PyUnicode_CheckExact(str)) {
        text.length = (uint32_t)PyUnicode_GET_LENGTH(str);
        text.kind = (uint8_t)PyUnicode_KIND(str);
    }
    return text;
}

static inline size_t
text_bytes(text_t text)
{
    return (size_t)text.length * text.kind;
}

static int
text_equals(text_t text, const char *data, PyObject *str)
{
    text_t other = text_of(str);
    if (other.length != text.length || other.kind != text.kind) {
        return 0;
    }
    return text.length == 0 || memcmp(data, PyUnicode_DATA(str), text_bytes(text)) == 0;
}

static uint64_t
str_hash(PyObject *str)
{
    /* A str caches its hash: usually a load. */
    return str != NULL && PyUnicode_CheckExact(str) ? (uint64_t)PyObject_Hash(str) : 0;
}


static int
is_own_file(text_t filename, const char *data)
{
    for (size_t i = 0; i < sampler.nown_files; i++) {
        const text_copy_t *own = sampler.own_files[i];
        if (own->text.length == filename.length && own->text.kind == filename.kind &&
                memcmp(own->data, data, text_bytes(filename)) == 0) {
            return 1;
        }
    }
    return 0;
}


/* ---- functions, locations and stacks: interned, counted, freed when nothing holds them ----- */

/* Remember a reported entry's death for the next snapshot; if there is no room, the next
   snapshot reports everything again instead. */
static void
note_dead(id_list_t *list, uint32_t id)
{
    tables_t *t = &sampler.tables;
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 64;
        uint32_t *ids = own_calloc(capacity, sizeof(uint32_t));
        if (ids == NULL) {
            t->resync = 1;
            return;
        }
        if (list->count) {
            memcpy(ids, list->ids, list->count * sizeof(uint32_t));
        }
        own_free(list->ids, list->capacity * sizeof(uint32_t));
        list->ids = ids;
        list->capacity = capacity;
    }
    list->ids[list->count++] = id;
}

static size_t
function_bytes(text_t filename, text_t qualname)
{
    return sizeof(function_t) + text_bytes(filename) + text_bytes(qualname);
}

static function_t *
intern_function(PyCodeObject *code)
{
    tables_t *t = &sampler.tables;
    PyObject *filename = code->co_filename, *qualname = code->co_qualname;
    uint64_t hash = mix64(str_hash(filename) ^ mix64(str_hash(qualname) + 1) ^
                          (uint64_t)code->co_firstlineno);
    for (node_t *node = index_first(&t->functions, hash); node != NULL; node = node->next) {
        function_t *function = (function_t *)node;
        if (node->hash == hash && function->firstlineno == code->co_firstlineno &&
                text_equals(function->filename, function->data, filename) &&
                text_equals(function->qualname, function->data + text_bytes(function->filename),
                            qualname)) {
            return function;
        }
    }
    text_t file_text = text_of(filename), name_text = text_of(qualname);
    function_t *function = own_calloc(1, function_bytes(file_text, name_text));
    if (function == NULL) {
        return NULL;
    }
    function->node.hash = hash;
    function->id = ++t->next_id;
    function->firstlineno = code->co_firstlineno;
    function->filename = file_text;
    function->qualname = name_text;
    if (file_text.length) {
        memcpy(function->data, PyUnicode_DATA(filename), text_bytes(file_text));
    }
    if (name_text.length) {
        memcpy(function->data + text_bytes(file_text), PyUnicode_DATA(qualname),
               text_bytes(name_text));
    }
    function->own = (uint8_t)is_own_file(file_text, function->data);
    index_add(&t->functions, &function->node);
    return function;
}

static void
drop_function(function_t *function)
{
    tables_t *t = &sampler.tables;
    if (function->reported) {
        note_dead(&t->dead_functions, function->id);
    }
    index_remove(&t->functions, &function->node);
    own_free(function, function_bytes(function->filename, function->qualname));
}

/* The location of a function and line. */
static location_t *
intern_location(function_t *function, int line)
{
    tables_t *t = &sampler.tables;
    uint64_t hash = mix64(((uint64_t)function->id << 32) ^ (uint32_t)line);
    for (node_t *node = index_first(&t->locations, hash); node != NULL; node = node->next) {
        location_t *location = (location_t *)node;
        if (node->hash == hash && location->function == function && location->line == line) {
            return location;
        }
    }
    location_t *location = own_calloc(1, sizeof(location_t));
    if (location == NULL) {
        return NULL;
    }
    location->node.hash = hash;
    location->id = ++t->next_id;
    location->function = function;
    location->line = line;
    location->cached_at = -1;
    function->refs++;
    index_add(&t->locations, &location->node);
    return location;
}

static void
drop_location(location_t *location)
{
    tables_t *t = &sampler.tables;
    if (location->reported) {
        note_dead(&t->dead_locations, location->id);
    }
    index_remove(&t->locations, &location->node);
    if (location->cached_at >= 0 && t->frame_cache[location->cached_at].location == location) {
        t->frame_cache[location->cached_at].location = NULL;
    }
    function_t *function = location->function;
    own_free(location, sizeof(location_t));
    if (--function->refs == 0) {
        drop_function(function);
    }
}

static size_t
stack_bytes(uint16_t nframe)
{
    return sizeof(call_stack_t) + nframe * sizeof(location_t *);
}

static call_stack_t *
new_stack(uint64_t hash, uint8_t kind, location_t **frames, int nframe)
{
    tables_t *t = &sampler.tables;
    call_stack_t *stack = own_calloc(1, stack_bytes((uint16_t)nframe));
    if (stack == NULL) {
        return NULL;
    }
    stack->node.hash = hash;
    stack->id = ++t->next_id;
    stack->kind = kind;
    stack->nframe = (uint16_t)nframe;
    for (int i = 0; i < nframe; i++) {
        stack->frames[i] = frames[i];
        frames[i]->refs++;
        stack->own |= frames[i]->function->own;
    }
    index_add(&t->stacks, &stack->node);
    return stack;
}

static call_stack_t *
intern_stack(location_t **frames, int nframe)
{
    tables_t *t = &sampler.tables;
    uint64_t hash = mix64((uint64_t)nframe);
    for (int i = 0; i < nframe; i++) {
        hash = mix64(hash ^ frames[i]->id);
    }
    for (node_t *node = index_first(&t->stacks, hash); node != NULL; node = node->next) {
        call_stack_t *stack = (call_stack_t *)node;
        if (node->hash == hash && stack->kind == STACK_FRAMES && stack->nframe == nframe &&
                memcmp(stack->frames, frames, nframe * sizeof(location_t *)) == 0) {
            return stack;
        }
    }
    return new_stack(hash, STACK_FRAMES, frames, nframe);
}

static void
drop_stack(call_stack_t *stack)
{
    tables_t *t = &sampler.tables;
    if (stack->reported) {
        note_dead(&t->dead_stacks, stack->id);
    }
    index_remove(&t->stacks, &stack->node);
    for (int i = 0; i < stack->nframe; i++) {
        location_t *location = stack->frames[i];
        if (--location->refs == 0) {
            drop_location(location);
        }
    }
    own_free(stack, stack_bytes(stack->nframe));
}

/* Entries that nothing holds: made for a sample that then found no room, or left by folded
   records (stacks of the profiler's own work are kept, so that its samples cost no table work).
   Swept at the bound. */
static void
sweep_index(index_t *index, void (*drop)(void *), size_t refs_offset)
{
    for (size_t i = 0; i < index->nbuckets; i++) {
        node_t *node = index->buckets[i];
        while (node != NULL) {
            node_t *next = node->next;
            if (*(uint32_t *)((char *)node + refs_offset) == 0) {
                drop(node);
            }
            node = next;
        }
    }
}

static void drop_stack_entry(void *entry) { drop_stack(entry); }
static void drop_location_entry(void *entry) { drop_location(entry); }
static void drop_function_entry(void *entry) { drop_function(entry); }

static void
sweep_unheld(void)
{
    tables_t *t = &sampler.tables;
    sweep_index(&t->stacks, drop_stack_entry, offsetof(call_stack_t, refs));
    sweep_index(&t->locations, drop_location_entry, offsetof(location_t, refs));
    sweep_index(&t->functions, drop_function_entry, offsetof(function_t, refs));
}


/* ---- records, live blocks and the filter ---------------------------------------------------- */

static uint64_t
record_hash(const call_stack_t *stack, uint32_t size_class, uint32_t label, uint64_t thread)
{
    return mix64(mix64(((uint64_t)stack->id << 32) ^ size_class) ^ mix64(label + thread * 31));
}

static record_t *
new_record(call_stack_t *stack, uint32_t size_class, uint32_t label, uint64_t thread)
{
    tables_t *t = &sampler.tables;
    record_t *record = own_calloc(1, sizeof(record_t));
    if (record == NULL) {
        return NULL;
    }
    record->node.hash = record_hash(stack, size_class, label, thread);
    record->stack = stack;
    record->size_class = size_class;
    record->label = label;
    record->thread = thread;
    stack->refs++;
    index_add(&t->records, &record->node);
    sampler.records_since_fold++;
    return record;
}

static record_t *
find_record(call_stack_t *stack, uint32_t size_class, uint32_t label, uint64_t thread)
{
    uint64_t hash = record_hash(stack, size_class, label, thread);
    for (node_t *node = index_first(&sampler.tables.records, hash); node; node = node->next) {
        record_t *record = (record_t *)node;
        if (node->hash == hash && record->stack == stack && record->size_class == size_class &&
                record->label == label && record->thread == thread) {
            return record;
        }
    }
    return NULL;
}

static void
remove_record(record_t *record)
{
    index_remove(&sampler.tables.records, &record->node);
    call_stack_t *stack = record->stack;
    own_free(record, sizeof(record_t));
    if (--stack->refs == 0 && stack->kind == STACK_FRAMES && !stack->own) {
        drop_stack(stack);
    }
}

static inline size_t
filter_slot(uintptr_t address)
{
    return (size_t)((address * 0x9e3779b97f4a7c15ULL) >> (64 - FILTER_BITS));
}

static void
filter_add(uintptr_t address, int delta)
{
    uint8_t *count = &sampler.filter[filter_slot(address)];
    uint8_t value = __atomic_load_n(count, __ATOMIC_RELAXED);
    if (value != FILTER_SATURATED) {
        __atomic_store_n(count, (uint8_t)(value + delta), __ATOMIC_RELAXED);
    }
}

/* Forget a sampled block that is freed (the lock held). */
static void
forget_sampled_block(uintptr_t address)
{
    tables_t *t = &sampler.tables;
    if (t->blocks.buckets == NULL) {
        return;  /* stopped */
    }
    uint64_t hash = mix64(address);
    for (node_t *node = index_first(&t->blocks, hash); node != NULL; node = node->next) {
        block_t *block = (block_t *)node;
        if (block->address == address) {
            record_t *record = block->record;
            record->frees++;
            record->free_bytes += block->size;
            sampler.inuse_estimate -= block_weight(block->size, sampler.rate);
            index_remove(&t->blocks, node);
            own_free(block, sizeof(block_t));
            filter_add(address, -1);
            return;
        }
    }
}

static int make_room(void);

static void
remember_block(uintptr_t address, record_t *record, size_t size)
{
    tables_t *t = &sampler.tables;
    block_t *block = own_calloc(1, sizeof(block_t));
    if (block == NULL && make_room()) {
        block = own_calloc(1, sizeof(block_t));
    }
    if (block == NULL) {
        record->frees++;  /* counted as allocated, but it cannot be followed */
        record->free_bytes += size;
        sampler.dropped++;
        return;
    }
    block->node.hash = mix64(address);
    block->address = address;
    block->record = record;
    block->size = size;
    sampler.inuse_estimate += block_weight(size, sampler.rate);
    index_add(&t->blocks, &block->node);
    filter_add(address, +1);
}


/* ---- folding: records with no live block, to make room ------------------------------------ */

static void
fold_record(record_t *record)
{
    record_t *folded = sampler.tables.folded;
    folded->allocs += record->allocs;
    folded->frees += record->frees;
    folded->alloc_bytes += record->alloc_bytes;
    folded->free_bytes += record->free_bytes;
    remove_record(record);
    sampler.folded++;
}

/* Fold the records with no live block that were last sampled before `before`. */
static void
fold_records(uint64_t before)
{
    index_t *records = &sampler.tables.records;
    for (size_t i = 0; i < records->nbuckets; i++) {
        node_t *node = records->buckets[i];
        while (node != NULL) {
            node_t *next = node->next;
            record_t *record = (record_t *)node;
            if (record->stack->kind == STACK_FRAMES && record->allocs == record->frees &&
                    record->last_sample < before) {
                fold_record(record);
            }
            node = next;
        }
    }
}

/* At the bound: fold idle records, those not sampled since the last snapshot first. Amortized:
   a pass runs only after an eighth of the records were made anew since the last one. Whether it
   freed anything. */
static int
make_room(void)
{
    tables_t *t = &sampler.tables;
    if (sampler.records_since_fold < t->records.count / 8 + 16) {
        return 0;
    }
    sampler.records_since_fold = 0;
    size_t before = t->own_bytes;
    fold_records(sampler.samples_at_snapshot);
    if (t->own_bytes > before - before / 4) {
        fold_records(UINT64_MAX);
    }
    sweep_unheld();
    return t->own_bytes < before;
}


/* ---- sampling --------------------------------------------------------------------------------- */

typedef struct {
    PyCodeObject *code;  /* borrowed: the frame holds it while we look */
    int lasti;
} frame_read_t;

/* The frames of this thread, leaf first; nothing is allocated. */
static int
read_frames(PyThreadState *tstate, frame_read_t *frames, int max_frames)
{
    int nframe = 0;
    _PyInterpreterFrame *frame = memprof_current_frame(tstate);
    for (; frame != NULL && nframe < max_frames; frame = frame->previous) {
        PyCodeObject *code = memprof_frame_code(frame);
        if (code != NULL) {
            frames[nframe].code = code;
            frames[nframe].lasti = memprof_frame_lasti(frame);
            nframe++;
        }
    }
    return nframe;
}

/* The label set in this context: the int that the label variable holds, else 0. Allocates
   nothing; an exception being raised is left as it was. */
static uint32_t
read_label(void)
{
    PyObject *variable = sampler.label_variable;
    if (variable == NULL) {
        return 0;
    }
    uint32_t label = 0;
    PyObject *value = memprof_context_value(variable);
    if (value != NULL) {
        if (PyLong_CheckExact(value)) {
            int overflow = 0;
            long number = PyLong_AsLongAndOverflow(value, &overflow);
            if (!overflow && number > 0 && number <= (long)UINT32_MAX) {
                label = (uint32_t)number;
            }
        }
        Py_DECREF(value);
    }
    return label;
}

static Py_hash_t
linetable_hash(PyCodeObject *code)
{
    /* bytes cache their hash: after the first time, a load */
    return code->co_linetable != NULL ? PyObject_Hash(code->co_linetable) : 0;
}

/* The location of a frame: from the cache, else from its names and line (found by walking the
   code's line table, the costly part), then cached. */
static location_t *
location_of(const frame_read_t *frame)
{
    PyCodeObject *code = frame->code;
    frame_cache_t *cache = sampler.tables.frame_cache;
    size_t slot = mix64((uint64_t)(uintptr_t)code ^ ((uint64_t)frame->lasti << 48)) &
                  (FRAME_CACHE_SLOTS - 1);
    frame_cache_t *entry = &cache[slot];
    Py_hash_t lines = linetable_hash(code);
    if (entry->location != NULL && entry->code == code && entry->lasti == frame->lasti &&
            entry->filename == code->co_filename && entry->qualname == code->co_qualname &&
            entry->firstlineno == code->co_firstlineno && entry->linetable_hash == lines) {
        return entry->location;
    }
    function_t *function = intern_function(code);
    if (function == NULL) {
        return NULL;
    }
    int line = PyCode_Addr2Line(code, frame->lasti * (int)sizeof(_Py_CODEUNIT));
    location_t *location = intern_location(function, line);
    if (location != NULL) {
        /* A location is in one slot at most, the one its drop clears: other instructions of its
           line (or another code object of the same names) move it. */
        if (entry->location != NULL) {
            entry->location->cached_at = -1;
        }
        if (location->cached_at >= 0) {
            cache[location->cached_at].location = NULL;
        }
        *entry = (frame_cache_t){code, code->co_filename, code->co_qualname, lines,
                                 frame->lasti, code->co_firstlineno, location};
        location->cached_at = (int32_t)slot;
    }
    return location;
}

/* The stack of the frames read, interned (the lock held); NULL if there is no room for it. What
   was made before the room ran out stays, unheld, until the next sweep. */
static call_stack_t *
stack_of(const frame_read_t *read, int nframe)
{
    location_t *frames[MAX_FRAMES];
    for (int i = 0; i < nframe; i++) {
        frames[i] = location_of(&read[i]);
        if (frames[i] == NULL) {
            return NULL;
        }
    }
    return intern_stack(frames, nframe);
}

/* Record a sampled block (the lock held). */
static void
record_sample(uintptr_t address, size_t size, const frame_read_t *read, int nframe, uint8_t kind,
              uint32_t label, uint64_t thread)
{
    tables_t *t = &sampler.tables;
    /* A block at this address that we still think live was freed where we could not see it. */
    if (__atomic_load_n(&sampler.filter[filter_slot(address)], __ATOMIC_RELAXED)) {
        forget_sampled_block(address);
    }
    call_stack_t *stack = t->special[kind];
    if (kind == STACK_FRAMES) {
        stack = stack_of(read, nframe);
        if (stack == NULL && make_room()) {
            stack = stack_of(read, nframe);
        }
        if (stack != NULL && stack->own) {
            return;  /* the profiler's own work: not the service's memory */
        }
    }
    uint32_t class = size_class(size);
    record_t *record = NULL;
    if (stack != NULL) {
        record = find_record(stack, class, label, thread);
        if (record == NULL) {
            record = new_record(stack, class, label, thread);
            if (record == NULL) {
                stack->refs++;  /* held while room is made: a sweep takes what nothing holds */
                int room = make_room();
                stack->refs--;
                record = room ? new_record(stack, class, label, thread) : NULL;
            }
        }
    }
    if (record == NULL) {
        record = t->table_full;
        sampler.table_full++;
    }
    record->allocs++;
    record->alloc_bytes += size;
    record->last_sample = ++sampler.samples;
    remember_block(address, record, size);
}

/* Put this thread on the list (the lock taken here); its end takes it off. */
static void
list_thread(thread_state_t *t)
{
    t->in_sampler = 1;
    t->ident = (uint64_t)PyThread_get_thread_ident();
    pthread_mutex_lock(&table_lock);
    t->serial = ++thread_serials;
    t->next_thread = threads;
    threads = t;
    t->listed = 1;
    pthread_mutex_unlock(&table_lock);
    pthread_setspecific(thread_end, t);  /* the C library's memory, if any: no hook */
    t->in_sampler = 0;
}

static void
unlist_thread(void *state)
{
    thread_state_t *t = state;
    pthread_mutex_lock(&table_lock);
    for (thread_state_t **link = &threads; *link != NULL; link = &(*link)->next_thread) {
        if (*link == t) {
            *link = t->next_thread;
            break;
        }
    }
    t->listed = -1;  /* its other destructors may still allocate: it stays off the list */
    pthread_mutex_unlock(&table_lock);
}

/* Every listed thread draws its distance afresh at its next allocation (the lock held). A thread
   that is subtracting at this very moment may write its old distance back: it is then one old
   distance late, once. */
static void
redraw_every_thread(void)
{
    for (thread_state_t *t = threads; t != NULL; t = t->next_thread) {
        __atomic_store_n(&t->bytes_until_sample, 0, __ATOMIC_RELAXED);
    }
}

static void
sample_allocation(int domain, void *ptr, size_t size)
{
    thread_state_t *t = &thread_state;
    if (t->in_sampler) {
        return;
    }
    if (t->listed == 0) {
        list_thread(t);
    }
    if (t->probing) {
        t->probe_seen |= domain == PYMEM_DOMAIN_RAW && size == (size_t)t->probing;
        return;
    }
    if (!is_running()) {
        t->bytes_until_sample = IDLE_DISTANCE;
        return;
    }
    size_t rate = sampler.rate;
    uint64_t generation = __atomic_load_n(&sampler.generation, __ATOMIC_ACQUIRE);
    if (t->generation != generation) {
        /* A thread new to this start (or one that ran before a restart): a fresh distance at
           this rate, this allocation its first step. */
        if (t->random_state == 0) {
            seed_random(t);
        }
        t->generation = generation;
        size_t distance = next_sample_distance(t, rate);
        if (size < distance) {
            t->bytes_until_sample = distance - size;
            return;
        }
    }
    t->bytes_until_sample = next_sample_distance(t, rate);
    if (size == 0 || size > sampler.delegated_above[domain]) {
        return;  /* an empty block weighs nothing; a large one is the raw hook's to count */
    }
    t->in_sampler = 1;
    frame_read_t frames[MAX_FRAMES];
    int nframe = 0;
    uint8_t kind = STACK_NO_GIL;
    uint32_t label = 0;
    PyThreadState *tstate = memprof_attached_thread();
    if (tstate != NULL) {
        nframe = read_frames(tstate, frames, sampler.max_frames);
        kind = nframe ? STACK_FRAMES : STACK_NO_FRAMES;
        if (tstate->interp == sampler.owner) {  /* the label variable is its interpreter's */
            label = read_label();
        }
    }
    uint64_t thread = sampler.label_threads ? t->serial : 0;
    pthread_mutex_lock(&table_lock);  /* in_sampler is set: see lock_tables */
    if (is_running() && sampler.generation == generation) {  /* not stopped meanwhile */
        record_sample((uintptr_t)ptr, size, frames, nframe, kind, label, thread);
    }
    pthread_mutex_unlock(&table_lock);
    t->in_sampler = 0;
}

/* Go's mallocgc: `if size < c.nextSample { c.nextSample -= size } else { profilealloc() }`. */
static inline void
count_allocation(int domain, void *ptr, size_t size)
{
    thread_state_t *t = &thread_state;
    if (size < t->bytes_until_sample) {
        t->bytes_until_sample -= size;
        return;
    }
    sample_allocation(domain, ptr, size);
}

static inline void
forget_block(void *ptr)
{
    uintptr_t address = (uintptr_t)ptr;
    if (ptr == NULL || !__atomic_load_n(&sampler.filter[filter_slot(address)], __ATOMIC_RELAXED)) {
        return;
    }
    if (thread_state.in_sampler) {
        return;  /* never taken twice; a block freed here stays counted until its address returns */
    }
    int was = lock_tables();
    forget_sampled_block(address);
    unlock_tables(was);
}


/* ---- the PEP 445 hooks: one set per domain, each calling what it wrapped ------------------- */

/* A raw allocation made inside an OBJ or MEM realloc is that realloc's new block. */
static inline void
note_raw_allocation(int domain)
{
    if (domain == PYMEM_DOMAIN_RAW && thread_state.in_realloc) {
        thread_state.raw_handled = 1;
    }
}

/* The slow paths, apart: the common path then has no frame of its own to set up. */
static __attribute__((noinline)) void *
malloc_and_sample(int domain, size_t size)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    void *ptr = alloc->malloc(alloc->ctx, size);
    if (ptr != NULL) {
        sample_allocation(domain, ptr, size);
    }
    return ptr;
}

static __attribute__((noinline)) void *
calloc_and_sample(int domain, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) {
        return NULL;  /* nelem * elsize would overflow */
    }
    void *ptr = alloc->calloc(alloc->ctx, nelem, elsize);
    if (ptr != NULL) {
        sample_allocation(domain, ptr, nelem * elsize);
    }
    return ptr;
}

/* The countdown is checked before allocating, so that the common case ends in a tail call to
   the wrapped allocator. A failed allocation still counts towards the next sample: rare, and no
   bias. */
static inline void *
hook_malloc(int domain, size_t size)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    thread_state_t *t = &thread_state;
    note_raw_allocation(domain);
    if (size < t->bytes_until_sample) {
        t->bytes_until_sample -= size;
        return alloc->malloc(alloc->ctx, size);
    }
    return malloc_and_sample(domain, size);
}

static inline void *
hook_calloc(int domain, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    thread_state_t *t = &thread_state;
    note_raw_allocation(domain);
    if (elsize == 0 || nelem <= SIZE_MAX / elsize) {  /* else: overflow, refused on the slow path */
        size_t size = nelem * elsize;
        if (size < t->bytes_until_sample) {
            t->bytes_until_sample -= size;
            return alloc->calloc(alloc->ctx, nelem, elsize);
        }
    }
    return calloc_and_sample(domain, nelem, elsize);
}

static inline void *
hook_realloc(int domain, void *ptr, size_t new_size)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    thread_state_t *t = &thread_state;
    int outer = domain != PYMEM_DOMAIN_RAW && !t->in_realloc;
    if (outer) {
        t->in_realloc = 1;
        t->raw_handled = 0;
    }
    void *new_ptr = alloc->realloc(alloc->ctx, ptr, new_size);
    if (outer) {
        t->in_realloc = 0;
    }
    if (new_ptr == NULL) {
        return NULL;  /* failed: the old block is still there, and still ours */
    }
    note_raw_allocation(domain);  /* (its own new block, when pymalloc passed it a realloc) */
    if (outer && t->raw_handled) {
        /* pymalloc moved the block to or within the raw domain, whose hook counted the new one
           (and forgot the old one if it was raw's). A small old block is gone too. */
        if (new_ptr != ptr) {
            forget_block(ptr);
        }
        return new_ptr;
    }
    /* The old block is gone, even where it stays in place: it had another size. The new one
       is an allocation of the new size. */
    forget_block(ptr);
    count_allocation(domain, new_ptr, new_size);
    return new_ptr;
}

static inline void
hook_free(int domain, void *ptr)
{
    PyMemAllocatorEx *alloc = &hooks[domain].wrapped;
    forget_block(ptr);
    alloc->free(alloc->ctx, ptr);
}

/* The context pointer is never read: a thread that reads the allocator while another swaps it
   may pair our functions with the old context. */
#define DOMAIN_HOOKS(NAME, DOMAIN)                                                             \
    static void *NAME##_malloc(void *Py_UNUSED(ctx), size_t size)                              \
    {                                                                                          \
        return hook_malloc(DOMAIN, size);                                                      \
    }                                                                                          \
    static void *NAME##_calloc(void *Py_UNUSED(ctx), size_t nelem, size_t elsize)              \
    {                                                                                          \
        return hook_calloc(DOMAIN, nelem, elsize);                                             \
    }                                                                                          \
    static void *NAME##_realloc(void *Py_UNUSED(ctx), void *ptr, size_t size)                  \
    {                                                                                          \
        return hook_realloc(DOMAIN, ptr, size);                                                \
    }                                                                                          \
    static void NAME##_free(void *Py_UNUSED(ctx), void *ptr)                                   \
    {                                                                                          \
        hook_free(DOMAIN, ptr);                                                                \
    }

DOMAIN_HOOKS(raw, PYMEM_DOMAIN_RAW)
DOMAIN_HOOKS(mem, PYMEM_DOMAIN_MEM)
DOMAIN_HOOKS(obj, PYMEM_DOMAIN_OBJ)

static void
init_hooks(void)
{
    hooks[PYMEM_DOMAIN_RAW].ours = (PyMemAllocatorEx){NULL, raw_malloc, raw_calloc, raw_realloc, raw_free};
    hooks[PYMEM_DOMAIN_MEM].ours = (PyMemAllocatorEx){NULL, mem_malloc, mem_calloc, mem_realloc, mem_free};
    hooks[PYMEM_DOMAIN_OBJ].ours = (PyMemAllocatorEx){NULL, obj_malloc, obj_calloc, obj_realloc, obj_free};
}

static int
hook_is_on_top(int domain)
{
    PyMemAllocatorEx current;
    PyMem_GetAllocator((PyMemAllocatorDomain)domain, &current);
    return current.malloc == hooks[domain].ours.malloc;
}

static void
install_hooks(void)
{
    for (int domain = 0; domain < 3; domain++) {
        hook_t *hook = &hooks[domain];
        if (hook->installed) {
            continue;  /* still in the chain, below whatever wrapped it since */
        }
        PyMem_GetAllocator((PyMemAllocatorDomain)domain, &hook->wrapped);
        PyMem_SetAllocator((PyMemAllocatorDomain)domain, &hook->ours);
        hook->installed = 1;
    }
}

/* Unhook where we are on top. Where something wrapped us after we started (tracemalloc), it
   calls our hooks and will put them back when it stops: they stay, passing everything through.
   `wrapped` is kept: a thread may still be in our hooks. */
static void
uninstall_hooks(void)
{
    for (int domain = 0; domain < 3; domain++) {
        hook_t *hook = &hooks[domain];
        if (hook->installed && hook_is_on_top(domain)) {
            PyMem_SetAllocator((PyMemAllocatorDomain)domain, &hook->wrapped);
            hook->installed = 0;
        }
    }
}

/* The smallest block size that `domain`'s allocator hands to the raw domain (pymalloc: above
   512 bytes), found by asking; SIZE_MAX if it never does (PYTHONMALLOC=malloc, mimalloc). */
static int
hands_to_raw(int domain, size_t size)
{
    thread_state_t *t = &thread_state;
    size_t saved = t->bytes_until_sample;
    t->bytes_until_sample = 0;  /* every hook takes the slow path, where the probe is seen */
    t->probing = (int)size;
    t->probe_seen = 0;
    void *ptr = domain == PYMEM_DOMAIN_OBJ ? PyObject_Malloc(size) : PyMem_Malloc(size);
    int seen = t->probe_seen;
    t->probing = 0;
    domain == PYMEM_DOMAIN_OBJ ? PyObject_Free(ptr) : PyMem_Free(ptr);
    t->bytes_until_sample = saved;
    return ptr != NULL && seen;
}

static size_t
delegation_threshold(int domain)
{
    size_t low = 0, high = 1 << 20;
    if (!hands_to_raw(domain, high)) {
        return SIZE_MAX;
    }
    while (high - low > 1) {  /* low is kept, high is handed over */
        size_t middle = low + (high - low) / 2;
        if (hands_to_raw(domain, middle)) {
            high = middle;
        }
        else {
            low = middle;
        }
    }
    return low;
}


/* ---- the tables' life ------------------------------------------------------------------------- */

static void
free_index(index_t *index)
{
    for (size_t i = 0; i < index->nbuckets; i++) {
        node_t *node = index->buckets[i];
        while (node != NULL) {
            node_t *next = node->next;
            free(node);
            node = next;
        }
    }
    free(index->buckets);
}

/* Free detached tables: nothing in them is a Python object. */
static void
free_tables(tables_t *t)
{
    index_t *indexes[] = {&t->blocks, &t->records, &t->stacks, &t->locations, &t->functions};
    for (size_t i = 0; i < sizeof(indexes) / sizeof(indexes[0]); i++) {
        if (indexes[i]->buckets != NULL) {
            free_index(indexes[i]);
        }
    }
    free(t->dead_functions.ids);
    free(t->dead_locations.ids);
    free(t->dead_stacks.ids);
    free(t->frame_cache);
}

static int
new_tables(void)
{
    tables_t *t = &sampler.tables;
    memset(t, 0, sizeof(*t));
    int failed = index_init(&t->functions) | index_init(&t->locations) |
                 index_init(&t->stacks) | index_init(&t->records) | index_init(&t->blocks);
    t->frame_cache = own_calloc(FRAME_CACHE_SLOTS, sizeof(frame_cache_t));
    failed |= t->frame_cache == NULL;
    for (uint8_t kind = 1; kind < NKINDS && !failed; kind++) {
        t->special[kind] = new_stack(mix64(kind), kind, NULL, 0);
        failed = t->special[kind] == NULL;
        if (!failed) {
            t->special[kind]->refs = 1;  /* held by the tables: never swept */
        }
    }
    if (!failed) {
        t->folded = new_record(t->special[STACK_FOLDED], 0, 0, 0);
        t->table_full = new_record(t->special[STACK_TABLE_FULL], 0, 0, 0);
        failed = t->folded == NULL || t->table_full == NULL;
    }
    if (failed) {
        tables_t detached = *t;
        memset(t, 0, sizeof(*t));
        free_tables(&detached);
        return -1;
    }
    return 0;
}

static void
set_own_files(text_copy_t **files, size_t count)
{
    text_copy_t **old = sampler.own_files;
    size_t nold = sampler.nown_files;
    sampler.own_files = files;
    sampler.nown_files = count;
    for (size_t i = 0; i < nold; i++) {
        free(old[i]);
    }
    free(old);
}


/* ---- the module's functions -------------------------------------------------------------------- */

#define NOT_OWNER "the sampling heap profiler belongs to the interpreter that started it: " \
                  "only that one can stop, restart or read it"

static int
is_owner(void)
{
    return sampler.owner == NULL || sampler.owner == PyInterpreterState_Get();
}

PyDoc_STRVAR(start_doc,
"start(rate, max_frames, max_bytes, label_threads=False, label_variable=None)\n--\n\n"
"Sample one allocation every `rate` bytes on average (1: every one), keeping up to\n"
"`max_frames` frames of each sampled stack and at most `max_bytes` of tables. Each record keeps\n"
"the int that `label_variable` (a contextvars.ContextVar) holds where the block was allocated,\n"
"and with `label_threads` the allocating thread. RuntimeError if it runs already, or if another\n"
"interpreter started it.");

static PyObject *
memprof_start(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"rate", "max_frames", "max_bytes", "label_threads",
                               "label_variable", NULL};
    Py_ssize_t rate, max_bytes = DEFAULT_MAX_BYTES;
    int max_frames, label_threads = 0;
    PyObject *label_variable = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ni|npO:start", keywords, &rate, &max_frames,
                                     &max_bytes, &label_threads, &label_variable)) {
        return NULL;
    }
    if (label_variable != Py_None && !PyContextVar_CheckExact(label_variable)) {
        PyErr_SetString(PyExc_TypeError, "label_variable must be a contextvars.ContextVar");
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
    if (max_bytes < MIN_MAX_BYTES) {
        PyErr_Format(PyExc_ValueError, "max_bytes must be at least %d", MIN_MAX_BYTES);
        return NULL;
    }
    int was = lock_tables();
    const char *refusal = NULL;
    if (sampler.owner != NULL) {  /* running, or being started */
        refusal = sampler.owner == PyInterpreterState_Get()
            ? "the sampling heap profiler is already running"
            : "the sampling heap profiler was started by another interpreter";
    }
    else {
        sampler.max_bytes = (size_t)max_bytes;
        if (new_tables() < 0) {
            refusal = "no memory for the sampler's tables";
        }
    }
    if (refusal == NULL) {
        memset(sampler.filter, 0, sizeof(sampler.filter));
        sampler.rate = (size_t)rate;
        sampler.max_frames = max_frames;
        sampler.label_threads = label_threads;
        sampler.owner = PyInterpreterState_Get();
        if (label_variable != Py_None && label_variable != sampler.label_variable) {
            /* The one before is never released: a thread may still be reading it. */
            sampler.label_variable = Py_NewRef(label_variable);
        }
        sampler.samples = sampler.dropped = sampler.folded = sampler.table_full = 0;
        sampler.samples_at_snapshot = sampler.records_since_fold = 0;
        sampler.inuse_estimate = 0;
        sampler.delegated_above[0] = sampler.delegated_above[1] = SIZE_MAX;
        sampler.delegated_above[2] = SIZE_MAX;
        __atomic_add_fetch(&sampler.generation, 1, __ATOMIC_RELEASE);
    }
    unlock_tables(was);
    if (refusal != NULL) {
        PyErr_SetString(PyExc_RuntimeError, refusal);
        return NULL;
    }
    install_hooks();
    /* Which blocks pymalloc hands to the raw domain, asked with the hooks in place but the
       sampler not yet running; then sampling starts. */
    size_t obj = delegation_threshold(PYMEM_DOMAIN_OBJ);
    size_t mem = delegation_threshold(PYMEM_DOMAIN_MEM);
    was = lock_tables();
    sampler.delegated_above[PYMEM_DOMAIN_OBJ] = obj;
    sampler.delegated_above[PYMEM_DOMAIN_MEM] = mem;
    redraw_every_thread();
    __atomic_store_n(&sampler.running, 1, __ATOMIC_RELEASE);
    unlock_tables(was);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc,
"stop()\n--\n\n"
"Stop sampling and forget every record. Unhooks the allocators unless something (tracemalloc)\n"
"wrapped them since start: then the hooks stay in its chain, passing everything through.");

static PyObject *
memprof_stop(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    int was = lock_tables();
    if (!is_running() || !is_owner()) {
        int owner = is_owner();
        unlock_tables(was);
        if (!owner) {
            PyErr_SetString(PyExc_RuntimeError, NOT_OWNER);
            return NULL;
        }
        Py_RETURN_NONE;
    }
    __atomic_store_n(&sampler.running, 0, __ATOMIC_RELEASE);
    sampler.owner = NULL;
    tables_t detached = sampler.tables;
    memset(&sampler.tables, 0, sizeof(sampler.tables));
    memset(sampler.filter, 0, sizeof(sampler.filter));
    sampler.inuse_estimate = 0;
    unlock_tables(was);
    uninstall_hooks();
    free_tables(&detached);  /* no Python object in them: nothing runs while they go */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(is_running_doc, "is_running()\n--\n\nWhether the sampler is sampling.");

static PyObject *
memprof_is_running(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(is_running());
}

/* ---- counters: copied under the lock, made into a dict after ------------------------------- */

typedef struct {
    int running, max_frames;
    unsigned long long generation, samples, dropped, folded, table_full;
    size_t rate, max_bytes, records, stacks, locations, functions, live_blocks, own_bytes;
    size_t delegated_above;
} counters_t;

static counters_t
read_counters(void)
{
    const tables_t *t = &sampler.tables;
    counters_t c = {
        .running = is_running(),
        .max_frames = sampler.max_frames,
        .generation = sampler.generation,
        .samples = sampler.samples,
        .dropped = sampler.dropped,
        .folded = sampler.folded,
        .table_full = sampler.table_full,
        .rate = sampler.rate,
        .max_bytes = sampler.max_bytes,
        .records = t->records.count,
        .stacks = t->stacks.count,
        .locations = t->locations.count,
        .functions = t->functions.count,
        .live_blocks = t->blocks.count,
        .own_bytes = t->own_bytes ? t->own_bytes + sizeof(sampler.filter) : 0,
        .delegated_above = sampler.delegated_above[PYMEM_DOMAIN_OBJ],
    };
    return c;
}

static PyObject *
counters_dict(const counters_t *c)
{
    return Py_BuildValue(
        "{s:O,s:n,s:i,s:n,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:n,s:n,s:n,s:n,s:L}",
        "running", c->running ? Py_True : Py_False,
        "rate", (Py_ssize_t)c->rate,
        "max_frames", c->max_frames,
        "max_bytes", (Py_ssize_t)c->max_bytes,
        "generation", c->generation,
        "samples", c->samples,
        "dropped", c->dropped,
        "folded", c->folded,
        "table_full", c->table_full,
        "records", (Py_ssize_t)c->records,
        "stacks", (Py_ssize_t)c->stacks,
        "locations", (Py_ssize_t)c->locations,
        "functions", (Py_ssize_t)c->functions,
        "live_blocks", (Py_ssize_t)c->live_blocks,
        "own_bytes", (Py_ssize_t)c->own_bytes,
        "delegated_above",
        c->delegated_above == SIZE_MAX ? -1LL : (long long)c->delegated_above);
}


/* ---- snapshot: copied under the lock, made into Python objects after ------------------------ */

typedef struct {
    char *data;
    size_t size, capacity;
    int failed;
} buffer_t;

static void
put(buffer_t *buffer, const void *bytes, size_t size)
{
    if (buffer->failed || size == 0) {
        return;
    }
    if (buffer->size + size > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 4096;
        while (capacity < buffer->size + size) {
            capacity *= 2;
        }
        char *data = realloc(buffer->data, capacity);  /* the C library's: no hook sees it */
        if (data == NULL) {
            buffer->failed = 1;
            return;
        }
        buffer->data = data;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->size, bytes, size);
    buffer->size += size;
}

static void
put_u32(buffer_t *buffer, uint32_t value)
{
    put(buffer, &value, sizeof(value));
}

/* A record as the snapshot gives it: struct "<IIIIQQQQQ" in Python's terms. */
typedef struct {
    uint32_t stack, size_class, label, kind;
    uint64_t thread, allocs, frees, alloc_bytes, free_bytes;
} record_row_t;

/* The sections of a snapshot, in order: records; the stacks, locations and functions not yet
   reported (all of them after a resync); the ids of reported ones since freed. */
static void
copy_tables(buffer_t *out, int *resync)
{
    tables_t *t = &sampler.tables;
    int all = t->resync;
    *resync = all;
    t->resync = 0;
    index_t *records = &t->records;
    put(out, &records->count, sizeof(size_t));
    for (size_t i = 0; i < records->nbuckets; i++) {
        for (node_t *node = records->buckets[i]; node != NULL; node = node->next) {
            record_t *r = (record_t *)node;
            record_row_t row = {r->stack->id, r->size_class, r->label, r->stack->kind,
                                r->thread, r->allocs, r->frees, r->alloc_bytes, r->free_bytes};
            put(out, &row, sizeof(row));
        }
    }
    size_t stacks_at = out->size;
    put(out, &stacks_at, sizeof(size_t));  /* the section's length, filled in below */
    index_t *stacks = &t->stacks;
    for (size_t i = 0; i < stacks->nbuckets; i++) {
        for (node_t *node = stacks->buckets[i]; node != NULL; node = node->next) {
            call_stack_t *s = (call_stack_t *)node;
            if (s->reported && !all) {
                continue;
            }
            s->reported = 1;
            uint32_t head[3] = {s->id, s->kind, s->nframe};
            put(out, head, sizeof(head));
            for (int f = 0; f < s->nframe; f++) {
                put_u32(out, s->frames[f]->id);
            }
        }
    }
    if (!out->failed) {
        size_t length = out->size - stacks_at - sizeof(size_t);
        memcpy(out->data + stacks_at, &length, sizeof(size_t));
    }
    size_t locations_at = out->size;
    put(out, &locations_at, sizeof(size_t));
    index_t *locations = &t->locations;
    for (size_t i = 0; i < locations->nbuckets; i++) {
        for (node_t *node = locations->buckets[i]; node != NULL; node = node->next) {
            location_t *l = (location_t *)node;
            if (!l->reported || all) {
                l->reported = 1;
                uint32_t row[3] = {l->id, l->function->id, (uint32_t)l->line};
                put(out, row, sizeof(row));
            }
        }
    }
    if (!out->failed) {
        size_t length = out->size - locations_at - sizeof(size_t);
        memcpy(out->data + locations_at, &length, sizeof(size_t));
    }
    index_t *functions = &t->functions;
    for (size_t i = 0; i < functions->nbuckets; i++) {
        for (node_t *node = functions->buckets[i]; node != NULL; node = node->next) {
            function_t *f = (function_t *)node;
            if (!f->reported || all) {
                f->reported = 1;
                uint32_t head[3] = {f->id, (uint32_t)f->firstlineno, f->own};
                put(out, head, sizeof(head));
                put(out, &f->filename, sizeof(text_t));
                put(out, &f->qualname, sizeof(text_t));
                put(out, f->data, text_bytes(f->filename) + text_bytes(f->qualname));
            }
        }
    }
    put_u32(out, 0);
    id_list_t *dead[] = {&t->dead_stacks, &t->dead_locations, &t->dead_functions};
    for (int d = 0; d < 3; d++) {
        size_t size = (all ? 0 : dead[d]->count) * sizeof(uint32_t);
        put(out, &size, sizeof(size_t));
        put(out, dead[d]->ids, size);
        dead[d]->count = 0;
    }
    sampler.samples_at_snapshot = sampler.samples;
    if (out->failed) {
        t->resync = 1;  /* what was marked reported was not: all again next time */
    }
}

/* Reading the buffer back: each take() moves past what it returns. */
static const char *
take(const char **cursor, size_t size)
{
    const char *at = *cursor;
    *cursor += size;
    return at;
}

static uint32_t
take_u32(const char **cursor)
{
    uint32_t value;
    memcpy(&value, take(cursor, sizeof(value)), sizeof(value));
    return value;
}

/* A section of u32s, after its length in bytes. */
static PyObject *
take_ids(const char **cursor)
{
    size_t size;
    memcpy(&size, take(cursor, sizeof(size_t)), sizeof(size_t));
    return PyBytes_FromStringAndSize(take(cursor, size), (Py_ssize_t)size);
}

static PyObject *
take_text(const char **cursor, text_t text)
{
    return PyUnicode_FromKindAndData(text.kind, take(cursor, text_bytes(text)),
                                     (Py_ssize_t)text.length);
}

/* Python objects from the buffer (see snapshot_doc). */
static PyObject *
snapshot_objects(const char *cursor, const counters_t *counters, int resync)
{
    size_t nrecords;
    memcpy(&nrecords, take(&cursor, sizeof(size_t)), sizeof(size_t));
    size_t size = nrecords * sizeof(record_row_t);
    PyObject *records = PyBytes_FromStringAndSize(take(&cursor, size), (Py_ssize_t)size);
    PyObject *stacks = take_ids(&cursor);  /* sections of u32s: handed over whole */
    PyObject *locations = take_ids(&cursor);
    PyObject *functions = PyList_New(0);
    PyObject *result = NULL;
    if (records == NULL || stacks == NULL || locations == NULL || functions == NULL) {
        goto done;
    }
    for (uint32_t id; (id = take_u32(&cursor)) != 0;) {
        uint32_t firstlineno = take_u32(&cursor), own = take_u32(&cursor);
        text_t filename, qualname;
        memcpy(&filename, take(&cursor, sizeof(text_t)), sizeof(text_t));
        memcpy(&qualname, take(&cursor, sizeof(text_t)), sizeof(text_t));
        PyObject *file = take_text(&cursor, filename);
        PyObject *name = take_text(&cursor, qualname);
        PyObject *item = NULL;
        if (file != NULL && name != NULL) {
            item = Py_BuildValue("(IOOiO)", id, file, name, (int)firstlineno,
                                 own ? Py_True : Py_False);
        }
        Py_XDECREF(file);
        Py_XDECREF(name);
        if (item == NULL || PyList_Append(functions, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    PyObject *dead_stacks = take_ids(&cursor);
    PyObject *dead_locations = take_ids(&cursor);
    PyObject *dead_functions = take_ids(&cursor);
    PyObject *stats = counters_dict(counters);
    if (stats != NULL && dead_stacks != NULL && dead_locations != NULL && dead_functions != NULL) {
        result = Py_BuildValue("(OOOOOOOOO)", stats, resync ? Py_True : Py_False, records,
                               stacks, locations, functions, dead_stacks, dead_locations,
                               dead_functions);
    }
    Py_XDECREF(stats);
    Py_XDECREF(dead_stacks);
    Py_XDECREF(dead_locations);
    Py_XDECREF(dead_functions);
done:
    Py_XDECREF(records);
    Py_XDECREF(stacks);
    Py_XDECREF(locations);
    Py_XDECREF(functions);
    return result;
}

PyDoc_STRVAR(snapshot_doc,
"snapshot()\n--\n\n"
"The records now, and what changed in the tables since the last snapshot: a tuple (stats,\n"
"resync, records, stacks, locations, functions, dead_stacks, dead_locations, dead_functions),\n"
"stats as stats() gives them at the same moment.\n"
"records: bytes of struct '<IIIIQQQQQ' rows (stack id, size class, label, stack kind, thread,\n"
"allocs, frees, alloc_bytes, free_bytes). stacks: '<I' numbers (id, kind, frames, location ids\n"
"leaf first), for the stacks not reported before; locations: '<I' numbers (id, function id,\n"
"line); functions: [(id, file name, qualified name, first line, own)]; dead_*: '<I' ids of the\n"
"reported ones since freed. resync: forget what earlier snapshots said (all is reported again).\n"
"None when not running. The tables are copied under the lock; the Python objects are made after\n"
"it is released, and the big sections are bytes for Python to read at its own pace.");

static PyObject *
memprof_snapshot(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    buffer_t buffer = {NULL, 0, 0, 0};
    int resync = 0;
    counters_t counters = {0};
    int was = lock_tables();
    int running = is_running();
    int owned = is_owner();
    if (running && owned) {
        copy_tables(&buffer, &resync);
        counters = read_counters();
    }
    unlock_tables(was);
    if (!owned) {
        PyErr_SetString(PyExc_RuntimeError, NOT_OWNER);
        return NULL;
    }
    PyObject *result;
    if (!running) {
        result = Py_NewRef(Py_None);
    }
    else if (buffer.failed) {
        result = PyErr_NoMemory();
    }
    else {
        result = snapshot_objects(buffer.data, &counters, resync);
    }
    free(buffer.data);
    return result;
}

PyDoc_STRVAR(stats_doc,
"stats()\n--\n\n"
"A dict: running, rate, max_frames, max_bytes, generation, samples, dropped (sampled blocks not\n"
"followed for want of room), folded (records folded to make room), table_full (samples counted\n"
"in the one table-full record, past the cap on own memory), records, stacks, locations,\n"
"functions, live_blocks, own_bytes (the C memory of the tables and the filter), and\n"
"delegated_above (the block size above which pymalloc hands blocks to the raw domain).");

static PyObject *
memprof_stats(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    int was = lock_tables();
    counters_t counters = read_counters();
    unlock_tables(was);
    return counters_dict(&counters);
}

PyDoc_STRVAR(inuse_estimate_doc,
"inuse_estimate()\n--\n\n"
"The bytes that the live sampled blocks stand for (each unsampled as Go's scaleHeapSample does\n"
"for one block): a counter kept as blocks come and go, read without a snapshot. 0 if stopped.");

static PyObject *
memprof_inuse_estimate(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    int was = lock_tables();
    double estimate = is_running() ? sampler.inuse_estimate : 0.0;
    unlock_tables(was);
    return PyLong_FromDouble(estimate > 0 ? estimate : 0.0);
}

PyDoc_STRVAR(hooks_installed_doc,
"hooks_installed()\n--\n\n"
"Whether the hooks are in the allocator chain (sampling or, wrapped, passing through).");

static PyObject *
memprof_hooks_installed(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(hooks[0].installed || hooks[1].installed || hooks[2].installed);
}

PyDoc_STRVAR(set_own_files_doc,
"set_own_files(filenames)\n--\n\n"
"The profiler's own source files: samples whose stack runs through one of them are left out.");

static PyObject *
memprof_set_own_files(PyObject *Py_UNUSED(module), PyObject *filenames)
{
    PyObject *sequence = PySequence_Fast(filenames, "a sequence of file names is needed");
    if (sequence == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    text_copy_t **files = calloc((size_t)count + 1, sizeof(text_copy_t *));
    int failed = files == NULL;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(sequence, i);
        if (!PyUnicode_CheckExact(name)) {
            PyErr_SetString(PyExc_TypeError, "file names must be str");
            failed = -1;
            break;
        }
        text_t text = text_of(name);
        files[i] = malloc(sizeof(text_copy_t) + text_bytes(text));
        failed = files[i] == NULL;
        if (!failed) {
            files[i]->text = text;
            memcpy(files[i]->data, PyUnicode_DATA(name), text_bytes(text));
        }
    }
    Py_DECREF(sequence);
    if (failed) {
        for (Py_ssize_t i = 0; files != NULL && i < count; i++) {
            free(files[i]);
        }
        free(files);
        return failed > 0 ? PyErr_NoMemory() : NULL;
    }
    int was = lock_tables();
    set_own_files(files, (size_t)count);
    unlock_tables(was);
    Py_RETURN_NONE;
}


PyDoc_STRVAR(threads_doc,
"threads()\n--\n\n"
"The threads that allocated since they started, and live: a list of (serial, ident). A record's\n"
"thread is its serial, never reused; the ident (threading's) names it while it lives.");

static PyObject *
memprof_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    size_t count = 0, capacity = 64;
    uint64_t *pairs = NULL;
    int was = lock_tables();
    for (thread_state_t *t = threads; t != NULL; t = t->next_thread) {
        count++;
    }
    capacity = count ? count : 1;
    pairs = malloc(2 * capacity * sizeof(uint64_t));  /* the C library's: no hook */
    count = 0;
    for (thread_state_t *t = threads; pairs != NULL && t != NULL; t = t->next_thread) {
        pairs[2 * count] = t->serial;
        pairs[2 * count + 1] = t->ident;
        count++;
    }
    unlock_tables(was);
    if (pairs == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list != NULL && i < count; i++) {
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)pairs[2 * i],
                                       (unsigned long long)pairs[2 * i + 1]);
        if (pair == NULL || PyList_Append(list, pair) < 0) {
            Py_XDECREF(pair);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(pair);
    }
    free(pairs);
    return list;
}

PyDoc_STRVAR(varints_doc,
"varints(values)\n--\n\n"
"The ints as consecutive protobuf varints (a packed field's payload; negative ones as int64):\n"
"what a profile's samples spend most of their encoding time on, done in one call.");

static PyObject *
memprof_varints(PyObject *Py_UNUSED(module), PyObject *values)
{
    PyObject *sequence = PySequence_Fast(values, "a sequence of ints is needed");
    if (sequence == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject *result = PyBytes_FromStringAndSize(NULL, count * 10);  /* 10: a varint's most */
    if (result == NULL) {
        Py_DECREF(sequence);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result), *start = out;
    for (Py_ssize_t i = 0; i < count; i++) {
        long long number = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sequence, i));
        if (number == -1 && PyErr_Occurred()) {
            Py_DECREF(sequence);
            Py_DECREF(result);
            return NULL;
        }
        uint64_t value = (uint64_t)number;
        while (value >= 0x80) {
            *out++ = (unsigned char)(value | 0x80);
            value >>= 7;
        }
        *out++ = (unsigned char)value;
    }
    Py_DECREF(sequence);
    if (_PyBytes_Resize(&result, out - start) < 0) {
        return NULL;
    }
    return result;
}


/* ---- fork: the child starts clean, whatever the parent's threads were doing ----------------- */

static void
before_fork(void)
{
    pthread_mutex_lock(&table_lock);  /* no thread is in the tables while the child is made */
}

static void
after_fork_in_parent(void)
{
    pthread_mutex_unlock(&table_lock);
}

/* In the child, only the thread that forked lives. What the parent allocated is not the child's:
   the totals restart from what is live, so that allocated stays at least in use. Its own draws,
   and no sampler work in progress. Async-signal-safe: no call but clock_gettime and getpid. */
static void
after_fork_in_child(void)
{
    pthread_mutex_init(&table_lock, NULL);
    threads = thread_state.listed == 1 ? &thread_state : NULL;  /* the others are gone */
    thread_state.next_thread = NULL;
    thread_state.in_sampler = thread_state.probing = thread_state.in_realloc = 0;
    thread_state.generation = 0;  /* a fresh draw at the next allocation */
    seed_random(&thread_state);
    /* A thread of the parent may have taken a snapshot whose news never reached the Python side
       the child inherited: the child's next snapshot tells everything again. */
    sampler.tables.resync = 1;
    index_t *records = &sampler.tables.records;
    for (size_t i = 0; records->buckets != NULL && i < records->nbuckets; i++) {
        for (node_t *node = records->buckets[i]; node != NULL; node = node->next) {
            record_t *record = (record_t *)node;
            record->allocs -= record->frees;
            record->alloc_bytes -= record->free_bytes;
            record->frees = record->free_bytes = 0;
        }
    }
}


/* ---- the module --------------------------------------------------------------------------------- */

static PyMethodDef memprof_methods[] = {
    {"start", (PyCFunction)(void (*)(void))memprof_start, METH_VARARGS | METH_KEYWORDS, start_doc},
    {"stop", memprof_stop, METH_NOARGS, stop_doc},
    {"is_running", memprof_is_running, METH_NOARGS, is_running_doc},
    {"snapshot", memprof_snapshot, METH_NOARGS, snapshot_doc},
    {"stats", memprof_stats, METH_NOARGS, stats_doc},
    {"inuse_estimate", memprof_inuse_estimate, METH_NOARGS, inuse_estimate_doc},
    {"hooks_installed", memprof_hooks_installed, METH_NOARGS, hooks_installed_doc},
    {"set_own_files", memprof_set_own_files, METH_O, set_own_files_doc},
    {"varints", memprof_varints, METH_O, varints_doc},
    {"threads", memprof_threads, METH_NOARGS, threads_doc},
    {NULL, NULL, 0, NULL},
};

static int
memprof_exec(PyObject *module)
{
    static int process_ready = 0;  /* once per process, whichever interpreter imports first */
    if (!process_ready) {
        if (pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) != 0 ||
                pthread_key_create(&thread_end, unlist_thread) != 0) {
            PyErr_SetString(PyExc_ImportError, "pthread_atfork or pthread_key_create failed");
            return -1;
        }
        init_hooks();
        process_ready = 1;
    }
    if (PyModule_AddIntConstant(module, "DEFAULT_RATE", DEFAULT_RATE) < 0 ||
            PyModule_AddIntConstant(module, "DEFAULT_MAX_BYTES", DEFAULT_MAX_BYTES) < 0 ||
            PyModule_AddIntConstant(module, "MIN_MAX_BYTES", MIN_MAX_BYTES) < 0 ||
            PyModule_AddIntConstant(module, "MAX_FRAMES", MAX_FRAMES) < 0 ||
            PyModule_AddIntConstant(module, "RECORD_SIZE", (long)sizeof(record_row_t)) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot memprof_slots[] = {
    {Py_mod_exec, memprof_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* Interpreters that share the GIL may import it; only the one that starts it owns it. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},  /* its state is per thread or behind its own lock */
#endif
    {0, NULL},
};

static struct PyModuleDef memprof_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asgi_pprof._memprof",
    .m_doc = "A sampling heap profiler after Go's runtime.MemProfile (see asgi_pprof.sampling).",
    .m_size = 0,  /* its state is the process's: the allocator hooks are process-wide */
    .m_methods = memprof_methods,
    .m_slots = memprof_slots,
};

PyMODINIT_FUNC
PyInit__memprof(void)
{
    return PyModuleDef_Init(&memprof_module);
}

#else  /* MEMPROF_UNSUPPORTED_REASON */

PyMODINIT_FUNC
PyInit__memprof(void)
{
    PyErr_Format(PyExc_ImportError,
                 "the sampling heap profiler supports " MEMPROF_UNSUPPORTED_REASON
                 " (this is %s); the tracemalloc heap profile is still available",
                 Py_GetVersion());
    return NULL;
}

#endif
