"""cffi (API mode, out of line) build of ``numa_llama._native``: the kernel's answers and the series' hooks.

``setup.py`` names this file in ``cffi_modules``; it can also be run by hand
(``python numa_llama/_native_build.py``) to build the module in place.

Two halves, kept apart on purpose:

* **the kernel oracle**: ``move_pages(2)`` as a query, ``get_mempolicy(2)``,
  ``getcpu(2)`` and the process's affinity, as raw syscalls (no libnuma). It
  does not depend on the series: it is what the series is checked against.
* **the series' C API**: the ``ggml_backend_cpu_numa_*`` hooks, typed by the
  series' own ``ggml-cpu/ggml-cpu-numa.h`` (the compiler checks every struct
  and signature against it), reached in the libraries that ``llama_cpp`` already
  loaded: ``dlopen(RTLD_NOLOAD)`` fails rather than load a second copy.
  Beside them, a small weight harness on ggml's own API (a weight in a
  WEIGHTS buffer multiplied by the CPU backend), so placement can be tested
  on any shape and type without a model file.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
GGML_INCLUDE = ROOT / "vendor" / "llama-cpp-python" / "vendor" / "llama.cpp" / "ggml" / "include"

CDEF = """
#define GGML_CPU_NUMA_MAX_SLABS 64
#define GGML_BACKEND_CPU_NUMA_NOT_PLACED_NO ...
#define GGML_BACKEND_CPU_NUMA_NOT_PLACED_VIRTUAL ...
#define GGML_BACKEND_CPU_NUMA_NOT_PLACED_POLICY ...
#define GGML_BACKEND_CPU_NUMA_NOT_PLACED_ONE_NODE ...

struct ggml_backend_cpu_numa_split {
    int     n_slabs;
    int     node[64];
    int64_t row_begin[65];
};

struct ggml_backend_cpu_numa_placement {
    const char * name;
    const void * data;
    size_t       nbytes;
    size_t       row_bytes;
    size_t       matrix_bytes;
    int64_t      n_rows;
    int64_t      n_matrices;
    size_t       page_bytes;
    struct ggml_backend_cpu_numa_split split;
};

struct ggml_backend_cpu_numa_stats {
    int64_t tensors;
    int64_t pages;
    int64_t pages_in_place;
    int64_t pages_moved;
    int64_t pages_failed;
    int64_t pages_boundary;
    int64_t failed_eacces;
    int64_t failed_ebusy;
    int64_t failed_enomem;
    int64_t failed_cpuset;
    int64_t failed_other;
    int64_t virtual_nodes;
    int64_t not_placed;
    int64_t place_ns;
    int64_t tensors_not_local;
    int64_t huge_pages_split;
    int64_t products_local;
};

struct ggml_backend_cpu_numa_barrier_stats {
    int64_t waits;
    int64_t wait_ns;
};

/* the kernel: each returns 0 (or a count) on success, -errno on failure */
long nl_move_pages_query(unsigned long count, void ** pages, int * status);
long nl_move_pages_query_pid(int pid, unsigned long count, void ** pages, int * status);
long nl_move_pages_to(unsigned long count, void ** pages, const int * nodes, int * status);
long nl_get_mempolicy(int * mode, unsigned long * nodemask, unsigned long maxnode, void * addr, unsigned long flags);
long nl_getcpu(unsigned int * cpu, unsigned int * node);
long nl_affinity(int * cpus, int max_cpus);
long nl_page_size(void);

/* read bandwidth: threads pinned to cpus[] stream buffers bound to mem_node (-1: no binding); see nl_stream_read */
long nl_stream_read(const int * cpus, int n_cpus, int mem_node, size_t bytes_per_thread, int passes,
                    double * seconds, char * err, size_t err_len);

/* the series, in the library llama_cpp loaded: nl_bind first (0, or -1 with a message in err) */
int  nl_bind(const char * library, char * err, size_t err_len);
int  nl_has_hook(const char * name);
int  nl_numa_layout(int n_threads, int * thread_node);
int  nl_numa_split_of(int type, int64_t ne0, int64_t ne1, uintptr_t data, struct ggml_backend_cpu_numa_split * split);
int  nl_numa_plan(int n_threads, int n_nodes, const int * node_id, const double * weight, int64_t n_rows,
                  size_t row_bytes, size_t data, size_t page_bytes, int * threads,
                  struct ggml_backend_cpu_numa_split * split);
int  nl_numa_placement(size_t i, struct ggml_backend_cpu_numa_placement * placement);
int  nl_numa_stats(struct ggml_backend_cpu_numa_stats * stats);
int  nl_numa_barrier_stats(int n, struct ggml_backend_cpu_numa_barrier_stats * stats, bool reset);

/* ggml's own facts about a type */
int64_t nl_type_block(int type);
size_t  nl_row_bytes(int type, int64_t ne0);
const char * nl_type_name(int type);

/* the weights a graph's matrix products read: a ggml_backend_sched_eval_callback that records src0 of every
   MUL_MAT and MUL_MAT_ID (each weight once, by address) and asks for nothing, so the graph runs unsplit */
bool nl_matmul_weights_cb(void * tensor, bool ask, void * user_data); /* a struct ggml_tensor * */
void nl_matmul_weights_reset(void);
int  nl_matmul_weight(size_t i, char * name, size_t name_len, uintptr_t * data, int64_t * ne, size_t * nb);

/* the weight harness */
struct nl_weight;
struct nl_weight * nl_weight_new(const char * name, int type, int64_t ne0, int64_t ne1, int64_t ne2,
                                 const char * buffer_type, char * err, size_t err_len);
int nl_numa_not_local(size_t i, const char ** name, const char ** buffer_type);
int nl_numa_unit_nodes(const struct ggml_backend_cpu_numa_placement * placements, size_t n, size_t unit_addr,
                       size_t unit, size_t page, int * node);
int      nl_weight_set(struct nl_weight * w, const void * bytes, size_t n);
int      nl_weight_mul(struct nl_weight * w, int n_threads, int n_cols, const float * x, float * out, char * err,
                       size_t err_len);
uintptr_t nl_weight_data(struct nl_weight * w);
size_t   nl_weight_nbytes(struct nl_weight * w);
size_t   nl_weight_row_bytes(struct nl_weight * w);
size_t   nl_weight_matrix_bytes(struct nl_weight * w);
void     nl_weight_free(struct nl_weight * w);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-cpu/ggml-cpu-numa.h" /* the hooks' types: private to the CPU backend, not in ggml-cpu.h */
#include "ggml-backend-impl.h" /* struct ggml_backend_buffer_type: nl_buffer_type's stand-in extra buffer */

static long nl_ret(long rv) { return rv < 0 ? -errno : rv; }

long nl_move_pages_query(unsigned long count, void ** pages, int * status) {
    /* nodes == NULL: move nothing, report the node of each page in status (or -errno for that page) */
    return nl_ret(syscall(SYS_move_pages, 0, count, pages, NULL, status, 0));
}

long nl_move_pages_query_pid(int pid, unsigned long count, void ** pages, int * status) {
    /* another process's pages (an RPC worker's): the caller needs the right to read it (same user, or root) */
    return nl_ret(syscall(SYS_move_pages, pid, count, pages, NULL, status, 0));
}

long nl_move_pages_to(unsigned long count, void ** pages, const int * nodes, int * status) {
    /* MPOL_MF_MOVE: this process's private pages only, as llama.cpp's placement moves them */
    return nl_ret(syscall(SYS_move_pages, 0, count, pages, nodes, status, 1 << 1));
}

long nl_get_mempolicy(int * mode, unsigned long * nodemask, unsigned long maxnode, void * addr, unsigned long flags) {
    return nl_ret(syscall(SYS_get_mempolicy, mode, nodemask, maxnode, addr, flags));
}

long nl_getcpu(unsigned int * cpu, unsigned int * node) {
    return nl_ret(syscall(SYS_getcpu, cpu, node, NULL));
}

long nl_affinity(int * cpus, int max_cpus) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) {
        return -errno;
    }
    long n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < max_cpus; ++c) {
        if (CPU_ISSET(c, &set)) {
            cpus[n++] = c;
        }
    }
    return n;
}

long nl_page_size(void) { return sysconf(_SC_PAGESIZE); }

/* -- read bandwidth ------------------------------------------------------------------------------------------ */

typedef uint64_t nl_v2 __attribute__((vector_size(16)));

struct nl_stream {
    const int *       cpus;
    int               mem_node;
    size_t            bytes;
    int               passes;
    int               ready; /* threads with their buffer faulted in (or failed) */
    int               go;    /* set once every started thread is ready, or to stop them */
    int               error; /* the first -errno of any thread, or 0 */
    const char *      what;
    volatile uint64_t sink;
};

struct nl_stream_thread {
    struct nl_stream * s;
    int                i;
    struct timespec    end;
};

static void nl_stream_fail(struct nl_stream * s, int e, const char * what) {
    int none = 0;
    if (__atomic_compare_exchange_n(&s->error, &none, e, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        s->what = what;
    }
}

static void * nl_stream_main(void * arg) {
    struct nl_stream_thread * t   = (struct nl_stream_thread *) arg;
    struct nl_stream *        s   = t->s;
    uint64_t *                buf = NULL;
    cpu_set_t                 set;
    CPU_ZERO(&set);
    CPU_SET(s->cpus[t->i], &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        nl_stream_fail(s, -errno, "sched_setaffinity");
    } else {
        void * p = mmap(NULL, s->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            nl_stream_fail(s, -errno, "mmap");
        } else {
            buf = (uint64_t *) p;
            /* base pages: each one is on the bound node, whatever THP is set to */
            madvise(p, s->bytes, MADV_NOHUGEPAGE);
            if (s->mem_node >= 0) {
                unsigned long mask[16] = { 0 };
                mask[s->mem_node / 64] = 1UL << (s->mem_node % 64);
                /* MPOL_BIND (2) before the first touch: every page is allocated on mem_node */
                if (syscall(SYS_mbind, p, s->bytes, 2, mask, 1024UL, 0U) != 0) {
                    nl_stream_fail(s, -errno, "mbind");
                }
            }
            if (__atomic_load_n(&s->error, __ATOMIC_SEQ_CST) == 0) {
                memset(p, 1, s->bytes); /* fault every page in, where the policy says */
                if (s->mem_node >= 0) {
                    /* ask the kernel where 64 pages spread over the buffer are: a cell is what it says it is */
                    void *       pages[64];
                    int          status[64];
                    const size_t page = (size_t) sysconf(_SC_PAGESIZE), n_pages = s->bytes / page;
                    const int    n    = n_pages < 64 ? (int) n_pages : 64;
                    for (int k = 0; k < n; ++k) {
                        pages[k] = (char *) p + (n_pages - 1) * k / (n > 1 ? n - 1 : 1) * page;
                    }
                    if (syscall(SYS_move_pages, 0, (unsigned long) n, pages, NULL, status, 0) != 0) {
                        nl_stream_fail(s, -errno, "move_pages");
                    } else {
                        for (int k = 0; k < n; ++k) {
                            if (status[k] != s->mem_node) {
                                nl_stream_fail(s, -EFAULT, "a page bound to the node is not on it (move_pages)");
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    __atomic_add_fetch(&s->ready, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&s->go, __ATOMIC_ACQUIRE)) {
        sched_yield();
    }
    /* 16-byte loads (SSE2 on x86-64, NEON on arm64), 4 independent sums: the loads, not the adds, set the pace */
    nl_v2 a = { 0, 0 }, b = a, c = a, d = a;
    if (buf != NULL && __atomic_load_n(&s->error, __ATOMIC_SEQ_CST) == 0) {
        const nl_v2 * v = (const nl_v2 *) buf;
        const size_t  n = s->bytes / sizeof(nl_v2) / 8 * 8;
        for (int pass = 0; pass < s->passes; ++pass) {
            for (size_t k = 0; k < n; k += 8) {
                a += v[k] + v[k + 4];
                b += v[k + 1] + v[k + 5];
                c += v[k + 2] + v[k + 6];
                d += v[k + 3] + v[k + 7];
            }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t->end);
    a += b + c + d;
    __atomic_add_fetch(&s->sink, a[0] + a[1], __ATOMIC_RELAXED);
    if (buf != NULL) {
        munmap(buf, s->bytes);
    }
    return NULL;
}

static double nl_seconds(struct timespec t) { return (double) t.tv_sec + 1e-9 * (double) t.tv_nsec; }

long nl_stream_read(const int * cpus, int n_cpus, int mem_node, size_t bytes_per_thread, int passes,
                    double * seconds, char * err, size_t err_len) {
    /* every thread faults its own buffer in on mem_node; once all are ready they read theirs `passes` times.
       *seconds: from the start signal to the last thread's end */
    if (n_cpus < 1 || bytes_per_thread < 4096 || passes < 1 || mem_node >= 1024) {
        snprintf(err, err_len, "needs at least one CPU, one page and one pass, and a node below 1024");
        return -EINVAL;
    }
    struct nl_stream s;
    memset(&s, 0, sizeof(s));
    s.cpus     = cpus;
    s.mem_node = mem_node;
    s.bytes    = bytes_per_thread;
    s.passes   = passes;
    pthread_t *               th = (pthread_t *) calloc((size_t) n_cpus, sizeof(pthread_t));
    struct nl_stream_thread * ts = (struct nl_stream_thread *) calloc((size_t) n_cpus, sizeof(*ts));
    int                       started = 0;
    if (th == NULL || ts == NULL) {
        nl_stream_fail(&s, -ENOMEM, "calloc");
    }
    for (int i = 0; i < n_cpus && s.error == 0; ++i) {
        ts[i].s = &s;
        ts[i].i = i;
        int rc  = pthread_create(&th[i], NULL, nl_stream_main, &ts[i]);
        if (rc != 0) {
            nl_stream_fail(&s, -rc, "pthread_create");
            break;
        }
        started++;
    }
    while (__atomic_load_n(&s.ready, __ATOMIC_SEQ_CST) < started) {
        sched_yield();
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    __atomic_store_n(&s.go, 1, __ATOMIC_RELEASE);
    double end = nl_seconds(t0);
    for (int i = 0; i < started; ++i) {
        pthread_join(th[i], NULL);
        if (nl_seconds(ts[i].end) > end) {
            end = nl_seconds(ts[i].end);
        }
    }
    free(th);
    free(ts);
    if (s.error != 0) {
        snprintf(err, err_len, "%s: %s", s.what, strerror(-s.error));
        return s.error;
    }
    *seconds = end - nl_seconds(t0);
    return 0;
}

/* -- the series, in the libraries llama_cpp loaded ---------------------------------------------------------- */

#define NL_SYMBOLS(X)                                                                                             \
    X(ggml_backend_dev_by_type) X(ggml_backend_dev_backend_reg) X(ggml_backend_reg_get_proc_address)             \
    X(ggml_backend_dev_init) X(ggml_backend_dev_buffer_type) X(ggml_backend_free) X(ggml_backend_graph_compute)  \
    X(ggml_backend_alloc_ctx_tensors_from_buft) X(ggml_backend_buffer_set_usage) X(ggml_backend_buffer_free)     \
    X(ggml_backend_tensor_set) X(ggml_backend_tensor_get) X(ggml_init) X(ggml_free) X(ggml_new_tensor_3d)        \
    X(ggml_set_name) X(ggml_mul_mat) X(ggml_new_graph) X(ggml_build_forward_expand) X(ggml_nbytes)               \
    X(ggml_row_size) X(ggml_blck_size) X(ggml_type_name) X(ggml_tensor_overhead) X(ggml_graph_overhead)

#define NL_DECLARE(name) static __typeof__(name) * p_##name;
NL_SYMBOLS(NL_DECLARE)

static ggml_backend_reg_t                    g_cpu_reg;
static ggml_backend_dev_t                    g_cpu_dev;
static ggml_backend_set_n_threads_t          p_set_n_threads;
static ggml_backend_cpu_numa_layout_t        p_layout;
static ggml_backend_cpu_numa_split_t         p_split;
static ggml_backend_cpu_numa_plan_t          p_plan;
static ggml_backend_cpu_numa_placement_t     p_placement;
static ggml_backend_cpu_numa_stats_t         p_stats;
static ggml_backend_cpu_numa_not_local_t     p_not_local;
static ggml_backend_cpu_numa_unit_nodes_t    p_unit_nodes;
static ggml_backend_cpu_numa_barrier_stats_t p_barrier_stats;

static void nl_err(char * err, size_t len, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

int nl_bind(const char * library, char * err, size_t err_len) {
    /* RTLD_NOLOAD: the library llama_cpp loaded, or nothing; never a second copy with its own state */
    void * h = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        nl_err(err, err_len, "%s is not loaded in this process (import llama_cpp first): %s", library, dlerror());
        return -1;
    }
#define NL_RESOLVE(name)                                                                                          \
    p_##name = (__typeof__(name) *) dlsym(h, #name);                                                            \
    if (p_##name == NULL) {                                                                                       \
        nl_err(err, err_len, "%s (and the libraries it links) has no symbol %s", library, #name);               \
        return -1;                                                                                                \
    }
    NL_SYMBOLS(NL_RESOLVE)
    g_cpu_dev = p_ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (g_cpu_dev == NULL) {
        nl_err(err, err_len, "no CPU backend is registered in %s (a GGML_BACKEND_DL build whose CPU library was "
                             "not found?)", library);
        return -1;
    }
    g_cpu_reg       = p_ggml_backend_dev_backend_reg(g_cpu_dev);
    p_set_n_threads =
        (ggml_backend_set_n_threads_t) p_ggml_backend_reg_get_proc_address(g_cpu_reg, "ggml_backend_set_n_threads");
#define NL_HOOK(var, name) var = (__typeof__(var)) p_ggml_backend_reg_get_proc_address(g_cpu_reg, name);
    NL_HOOK(p_layout, "ggml_backend_cpu_numa_layout")
    NL_HOOK(p_split, "ggml_backend_cpu_numa_split")
    NL_HOOK(p_plan, "ggml_backend_cpu_numa_plan")
    NL_HOOK(p_placement, "ggml_backend_cpu_numa_placement")
    NL_HOOK(p_stats, "ggml_backend_cpu_numa_stats")
    NL_HOOK(p_not_local, "ggml_backend_cpu_numa_not_local")
    NL_HOOK(p_unit_nodes, "ggml_backend_cpu_numa_unit_nodes")
    NL_HOOK(p_barrier_stats, "ggml_backend_cpu_numa_barrier_stats")
    return 0;
}

int nl_has_hook(const char * name) {
    return g_cpu_reg != NULL && p_ggml_backend_reg_get_proc_address(g_cpu_reg, name) != NULL;
}

/* each returns -ENOSYS where the loaded CPU backend lacks the hook */
int nl_numa_layout(int n_threads, int * thread_node) {
    return p_layout ? p_layout(n_threads, thread_node) : -ENOSYS;
}

int nl_numa_split_of(int type, int64_t ne0, int64_t ne1, uintptr_t data, struct ggml_backend_cpu_numa_split * split) {
    if (!p_split) {
        return -ENOSYS;
    }
    /* a tensor header only: the plan reads ne, nb, data and (for the page size) the buffer */
    struct ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.type  = (enum ggml_type) type;
    t.ne[0] = ne0;
    t.ne[1] = ne1;
    t.ne[2] = t.ne[3] = 1;
    t.nb[1] = p_ggml_row_size(t.type, ne0);
    t.nb[2] = t.nb[3] = t.nb[1] * ne1;
    t.data  = (void *) data;
    p_split(&t, split);
    return 0;
}

int nl_numa_plan(int n_threads, int n_nodes, const int * node_id, const double * weight, int64_t n_rows,
                 size_t row_bytes, size_t data, size_t page_bytes, int * threads,
                 struct ggml_backend_cpu_numa_split * split) {
    if (!p_plan) {
        return -ENOSYS;
    }
    p_plan(n_threads, n_nodes, node_id, weight, n_rows, row_bytes, data, page_bytes, threads, split);
    return 0;
}

int nl_numa_placement(size_t i, struct ggml_backend_cpu_numa_placement * placement) {
    return p_placement ? (p_placement(i, placement) ? 1 : 0) : -ENOSYS;
}

int nl_numa_stats(struct ggml_backend_cpu_numa_stats * stats) {
    if (!p_stats) {
        return -ENOSYS;
    }
    p_stats(stats);
    return 0;
}

int nl_numa_not_local(size_t i, const char ** name, const char ** buffer_type) {
    return p_not_local ? (p_not_local(i, name, buffer_type) ? 1 : 0) : -ENOSYS;
}

int nl_numa_unit_nodes(const struct ggml_backend_cpu_numa_placement * placements, size_t n, size_t unit_addr,
                       size_t unit, size_t page, int * node) {
    return p_unit_nodes ? (p_unit_nodes(placements, n, unit_addr, unit, page, node) ? 1 : 0) : -ENOSYS;
}

int nl_numa_barrier_stats(int n, struct ggml_backend_cpu_numa_barrier_stats * stats, bool reset) {
    return p_barrier_stats ? p_barrier_stats(n, stats, reset) : -ENOSYS;
}

int64_t nl_type_block(int type) { return p_ggml_blck_size((enum ggml_type) type); }

size_t nl_row_bytes(int type, int64_t ne0) { return p_ggml_row_size((enum ggml_type) type, ne0); }

const char * nl_type_name(int type) { return p_ggml_type_name((enum ggml_type) type); }

/* -- the weight harness -------------------------------------------------------------------------------------- */

struct nl_weight {
    struct ggml_context *  ctx;
    ggml_backend_buffer_t  buf;
    ggml_backend_t         backend;
    struct ggml_tensor *   w;
};

void nl_weight_free(struct nl_weight * w) {
    if (w == NULL) {
        return;
    }
    if (w->backend) {
        p_ggml_backend_free(w->backend);
    }
    if (w->buf) {
        p_ggml_backend_buffer_free(w->buf);
    }
    if (w->ctx) {
        p_ggml_free(w->ctx);
    }
    free(w);
}

/* a host buffer type named by the caller, with the CPU buffer type's functions: a stand-in for an extra buffer
   (AMX, KleidiAI) whose kernels do not follow the split plan, on machines that have none */
static struct ggml_backend_buffer_type nl_named_buft;
static char                           nl_named_buft_name[64];

static const char * nl_named_buft_get_name(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return nl_named_buft_name;
}

static ggml_backend_buffer_type_t nl_buffer_type(const char * name) {
    ggml_backend_buffer_type_t cpu = p_ggml_backend_dev_buffer_type(g_cpu_dev);
    if (name == NULL) {
        return cpu;
    }
    nl_named_buft                = *cpu;
    nl_named_buft.iface.get_name = nl_named_buft_get_name;
    snprintf(nl_named_buft_name, sizeof(nl_named_buft_name), "%s", name);
    return &nl_named_buft;
}

struct nl_weight * nl_weight_new(const char * name, int type, int64_t ne0, int64_t ne1, int64_t ne2,
                                 const char * buffer_type, char * err, size_t err_len) {
    if (g_cpu_dev == NULL) {
        nl_err(err, err_len, "nl_bind has not been called");
        return NULL;
    }
    struct nl_weight * w = calloc(1, sizeof(*w));
    struct ggml_init_params params = { p_ggml_tensor_overhead() * 4, NULL, true };
    w->ctx = p_ggml_init(params);
    w->w   = p_ggml_new_tensor_3d(w->ctx, (enum ggml_type) type, ne0, ne1, ne2);
    p_ggml_set_name(w->w, name);
    /* the CPU buffer type, marked WEIGHTS: what llama.cpp does with a model's tensors */
    w->buf = p_ggml_backend_alloc_ctx_tensors_from_buft(w->ctx, nl_buffer_type(buffer_type));
    if (w->buf == NULL) {
        nl_err(err, err_len, "cannot allocate %zu bytes for %s", p_ggml_nbytes(w->w), name);
        nl_weight_free(w);
        return NULL;
    }
    p_ggml_backend_buffer_set_usage(w->buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    w->backend = p_ggml_backend_dev_init(g_cpu_dev, NULL);
    if (w->backend == NULL) {
        nl_err(err, err_len, "cannot start the CPU backend");
        nl_weight_free(w);
        return NULL;
    }
    return w;
}

int nl_weight_set(struct nl_weight * w, const void * bytes, size_t n) {
    if (n != p_ggml_nbytes(w->w)) {
        return -EINVAL;
    }
    p_ggml_backend_tensor_set(w->w, bytes, 0, n);
    return 0;
}

int nl_weight_mul(struct nl_weight * w, int n_threads, int n_cols, const float * x, float * out, char * err,
                  size_t err_len) {
    /* out = w x for x of n_cols columns (per matrix): a graph of one mul_mat, computed by the CPU backend, which
       under --numa migrate places w before it multiplies (the path a model's weights take) */
    const int64_t ne0 = w->w->ne[0], ne1 = w->w->ne[1], ne2 = w->w->ne[2];
    struct ggml_init_params params = { p_ggml_tensor_overhead() * 8 + p_ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = p_ggml_init(params);
    struct ggml_tensor * xt = p_ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, n_cols, ne2);
    struct ggml_tensor * yt = p_ggml_mul_mat(ctx, w->w, xt);
    struct ggml_cgraph * gf = p_ggml_new_graph(ctx);
    p_ggml_build_forward_expand(gf, yt);
    ggml_backend_buffer_t buf =
        p_ggml_backend_alloc_ctx_tensors_from_buft(ctx, p_ggml_backend_dev_buffer_type(g_cpu_dev));
    if (buf == NULL) {
        nl_err(err, err_len, "cannot allocate the activations");
        p_ggml_free(ctx);
        return -ENOMEM;
    }
    p_ggml_backend_tensor_set(xt, x, 0, p_ggml_nbytes(xt));
    if (p_set_n_threads) {
        p_set_n_threads(w->backend, n_threads);
    }
    const enum ggml_status st = p_ggml_backend_graph_compute(w->backend, gf);
    if (st == GGML_STATUS_SUCCESS) {
        p_ggml_backend_tensor_get(yt, out, 0, (size_t) ne1 * n_cols * ne2 * sizeof(float));
    } else {
        nl_err(err, err_len, "graph compute failed (status %d)", (int) st);
    }
    p_ggml_backend_buffer_free(buf);
    p_ggml_free(ctx);
    return st == GGML_STATUS_SUCCESS ? 0 : -EIO;
}

#define NL_MM_MAX 8192
static struct {
    char      name[GGML_MAX_NAME];
    uintptr_t data;
    int64_t   ne[4];
    size_t    nb[4];
} g_mm[NL_MM_MAX];
static size_t g_mm_n;
static int    g_mm_overflow;

bool nl_matmul_weights_cb(void * tensor, bool ask, void * user_data) {
    const struct ggml_tensor * t = tensor;
    (void) user_data;
    if (!ask || (t->op != GGML_OP_MUL_MAT && t->op != GGML_OP_MUL_MAT_ID) || t->src[0] == NULL) {
        return false;
    }
    const struct ggml_tensor * w = t->src[0];
    for (size_t i = 0; i < g_mm_n; i++) {
        if (g_mm[i].data == (uintptr_t) w->data) {
            return false;
        }
    }
    if (g_mm_n == NL_MM_MAX) {
        g_mm_overflow = 1;
        return false;
    }
    snprintf(g_mm[g_mm_n].name, sizeof g_mm[g_mm_n].name, "%s", w->name);
    g_mm[g_mm_n].data = (uintptr_t) w->data;
    for (int k = 0; k < 4; k++) {
        g_mm[g_mm_n].ne[k] = w->ne[k];
        g_mm[g_mm_n].nb[k] = w->nb[k];
    }
    g_mm_n++;
    return false;
}

void nl_matmul_weights_reset(void) {
    g_mm_n        = 0;
    g_mm_overflow = 0;
}

/* 1 and the i-th weight, 0 past the end, -EOVERFLOW if more weights were seen than recorded */
int nl_matmul_weight(size_t i, char * name, size_t name_len, uintptr_t * data, int64_t * ne, size_t * nb) {
    if (g_mm_overflow) {
        return -EOVERFLOW;
    }
    if (i >= g_mm_n) {
        return 0;
    }
    snprintf(name, name_len, "%s", g_mm[i].name);
    *data = g_mm[i].data;
    for (int k = 0; k < 4; k++) {
        ne[k] = g_mm[i].ne[k];
        nb[k] = g_mm[i].nb[k];
    }
    return 1;
}

uintptr_t nl_weight_data(struct nl_weight * w) { return (uintptr_t) w->w->data; }

size_t nl_weight_nbytes(struct nl_weight * w) { return p_ggml_nbytes(w->w); }

size_t nl_weight_row_bytes(struct nl_weight * w) { return w->w->nb[1]; }

size_t nl_weight_matrix_bytes(struct nl_weight * w) { return w->w->nb[2]; }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "numa_llama._native",
    SOURCE,
    include_dirs=[str(GGML_INCLUDE), str(GGML_INCLUDE.parent / "src")],
    libraries=["dl", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
