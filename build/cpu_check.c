/* numa-llama-cpu-check: runs one ggml CPU variant library's own matrix kernels and checks their results.
 *
 * cpu_probe.c executes one instruction per extension; that is a quick filter, not a proof: a machine can grant
 * AMX to a probe and still fault in ggml's AMX kernels. This program loads the variant library itself (as ggml's
 * loader does: dlopen, then its ggml_backend_init), and multiplies real weights through every path the variant
 * can take for a weight: each of its extra buffer types (AMX, CPU_REPACK, ...) for each type it accepts, and the
 * plain CPU buffer, where the llamafile sgemm or ggml's generic path runs; mul_mat and mul_mat_id. Each result is
 * compared with a float64 product of the dequantized weight (ggml-base's own to_float), with test-backend-ops'
 * tolerance for MUL_MAT (normalized mean squared error 5e-4). The cases are repeated with more threads than CPUs
 * until --seconds have passed.
 *
 *   numa-llama-cpu-check [--seconds S] [--threads N] [--out DIR] LIBRARY     exit 0: every case agrees
 *   numa-llama-cpu-check --score LIBRARY...                                   ggml's score of each library
 *
 * stdout: "case NAME nmse X" for each case of the first round (and "skip NAME" where the variant does not take
 * that path), then "ok CASES ROUNDS SECONDS THREADS"; a result out of tolerance prints "fail NAME nmse X" and
 * exits 1. A fault prints "fault SIGNAL LIBRARY+0xOFFSET SYMBOL case NAME" on stderr and dies of that signal, so
 * the caller sees it. --out DIR writes each case's first result to DIR/NAME.f32 for comparison with another
 * variant's. Links ggml-base only: the variant under test brings everything else. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#define K_DIM  512 /* a multiple of QK_K = 256 and of every block size */
#define ROWS   128 /* a multiple of AMX's 2*TILE_N and of repack's interleave */
#define N_EXP  4
#define N_USED 2
#define TOL    5e-4

static volatile const char * g_case = "(loading the library)";

static void put(const char * s) {
    ssize_t rc = write(2, s, strlen(s));
    (void) rc;
}

static void on_fault(int sig, siginfo_t * info, void * uctx) {
    void * ip = info->si_addr;
#if defined(__x86_64__) && defined(REG_RIP)
    ip = (void *) ((ucontext_t *) uctx)->uc_mcontext.gregs[REG_RIP];
#else
    (void) uctx;
#endif
    char    line[1024];
    Dl_info dl;
    memset(&dl, 0, sizeof(dl));
    const int found = dladdr(ip, &dl);
    const char * name = sig == SIGILL ? "SIGILL" : sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" :
                        sig == SIGFPE ? "SIGFPE" : sig == SIGABRT ? "SIGABRT" : "SIG?";
    snprintf(line, sizeof(line), "fault %s %s+0x%zx %s case %s\n", name,
             found && dl.dli_fname ? dl.dli_fname : "?",
             (size_t) ((char *) ip - (found ? (char *) dl.dli_fbase : (char *) 0)),
             found && dl.dli_sname ? dl.dli_sname : "?", (const char *) g_case);
    put(line);
    signal(sig, SIG_DFL);
    raise(sig);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

static uint64_t g_rng;

static float next_uniform(void) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float) ((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

struct check_case {
    char                   name[96];
    int                    id; /* 0: mul_mat, 1: mul_mat_id */
    struct ggml_context *  ctx_w, *ctx_g;
    ggml_backend_buffer_t  buf_w, buf_g;
    struct ggml_tensor *   w, *x, *ids, *y;
    struct ggml_cgraph *   gf;
    float *                ref;
    float *                out;
    int64_t                n_out;
};

static void free_case(struct check_case * c) {
    if (c->buf_g) {
        ggml_backend_buffer_free(c->buf_g);
    }
    if (c->buf_w) {
        ggml_backend_buffer_free(c->buf_w);
    }
    if (c->ctx_g) {
        ggml_free(c->ctx_g);
    }
    if (c->ctx_w) {
        ggml_free(c->ctx_w);
    }
    free(c->ref);
    free(c->out);
    memset(c, 0, sizeof(*c));
}

/* 1: ready, 0: the variant does not take this path (freed), -1: error (message printed) */
static int make_case(struct check_case * c, ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft,
                     enum ggml_type type, int id, int cols, uint64_t seed) {
    memset(c, 0, sizeof(*c));
    c->id = id;
    snprintf(c->name, sizeof(c->name), "%s-%s-%s-%d", ggml_backend_buft_name(buft), id ? "mul_mat_id" : "mul_mat",
             ggml_type_name(type), cols);
    for (char * p = c->name; *p; ++p) {
        if (*p == ' ' || *p == '/') {
            *p = '_';
        }
    }
    g_case = c->name;
    const int64_t n_mat = id ? N_EXP : 1;
    struct ggml_init_params pw = { ggml_tensor_overhead() * 2, NULL, true };
    c->ctx_w = ggml_init(pw);
    c->w     = ggml_new_tensor_3d(c->ctx_w, type, K_DIM, ROWS, n_mat);
    ggml_set_name(c->w, "weight");
    c->buf_w = ggml_backend_alloc_ctx_tensors_from_buft(c->ctx_w, buft);
    if (c->buf_w == NULL) {
        fprintf(stderr, "cannot allocate %s\n", c->name);
        return -1;
    }
    ggml_backend_buffer_set_usage(c->buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    struct ggml_init_params pg = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), NULL, true };
    c->ctx_g = ggml_init(pg);
    if (id) {
        /* each of `cols` tokens uses N_USED of the N_EXP experts, each with its own column */
        c->x   = ggml_new_tensor_3d(c->ctx_g, GGML_TYPE_F32, K_DIM, N_USED, cols);
        c->ids = ggml_new_tensor_2d(c->ctx_g, GGML_TYPE_I32, N_USED, cols);
        c->y   = ggml_mul_mat_id(c->ctx_g, c->w, c->x, c->ids);
    } else {
        c->x = ggml_new_tensor_2d(c->ctx_g, GGML_TYPE_F32, K_DIM, cols);
        c->y = ggml_mul_mat(c->ctx_g, c->w, c->x);
    }
    if (!ggml_backend_dev_supports_op(dev, c->y)) {
        free_case(c);
        return 0;
    }
    c->gf = ggml_new_graph(c->ctx_g);
    ggml_build_forward_expand(c->gf, c->y);
    c->buf_g = ggml_backend_alloc_ctx_tensors_from_buft(c->ctx_g, ggml_backend_dev_buffer_type(dev));
    if (c->buf_g == NULL) {
        fprintf(stderr, "cannot allocate the activations of %s\n", c->name);
        return -1;
    }

    /* seeded data: the weight quantized by ggml-base, then dequantized by it for the reference */
    g_rng = seed;
    const int64_t n_w = K_DIM * ROWS * n_mat;
    float *       wf  = malloc(sizeof(float) * n_w);
    float *       wd  = malloc(sizeof(float) * n_w);
    for (int64_t i = 0; i < n_w; ++i) {
        wf[i] = next_uniform();
    }
    void * q = malloc(ggml_nbytes(c->w));
    ggml_quantize_chunk(type, wf, q, 0, ROWS * n_mat, K_DIM, NULL);
    const struct ggml_type_traits * tt = ggml_get_type_traits(type);
    if (type == GGML_TYPE_F32) {
        memcpy(wd, q, sizeof(float) * n_w);
    } else {
        tt->to_float(q, wd, n_w);
    }
    const int64_t n_x = ggml_nelements(c->x);
    float *       xf  = malloc(sizeof(float) * n_x);
    for (int64_t i = 0; i < n_x; ++i) {
        xf[i] = next_uniform();
    }
    int32_t * idv = NULL;
    if (id) {
        idv = malloc(sizeof(int32_t) * N_USED * cols);
        for (int t = 0; t < cols; ++t) {
            for (int u = 0; u < N_USED; ++u) {
                idv[t * N_USED + u] = (t + u * 3 + 1) % N_EXP; /* distinct per token: 1,0 / 2,1 / ... */
            }
        }
    }
    ggml_backend_tensor_set(c->w, q, 0, ggml_nbytes(c->w)); /* repack / AMX convert the weight here */
    ggml_backend_tensor_set(c->x, xf, 0, ggml_nbytes(c->x));
    if (id) {
        ggml_backend_tensor_set(c->ids, idv, 0, ggml_nbytes(c->ids));
    }

    c->n_out = ggml_nelements(c->y);
    c->ref   = malloc(sizeof(float) * c->n_out);
    c->out   = malloc(sizeof(float) * c->n_out);
    const int n_slots = id ? N_USED : 1;
    for (int t = 0; t < cols; ++t) {
        for (int u = 0; u < n_slots; ++u) {
            const int     e  = id ? idv[t * N_USED + u] : 0;
            const float * xv = xf + ((int64_t) t * n_slots + u) * K_DIM;
            for (int64_t r = 0; r < ROWS; ++r) {
                const float * wr  = wd + ((int64_t) e * ROWS + r) * K_DIM;
                double        acc = 0.0;
                for (int64_t k = 0; k < K_DIM; ++k) {
                    acc += (double) wr[k] * (double) xv[k];
                }
                c->ref[((int64_t) t * n_slots + u) * ROWS + r] = (float) acc;
            }
        }
    }
    free(wf);
    free(wd);
    free(q);
    free(xf);
    free(idv);
    return 1;
}

static double nmse(const float * a, const float * ref, int64_t n) {
    double err = 0.0, sig = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double d = (double) a[i] - (double) ref[i];
        err += d * d;
        sig += (double) ref[i] * (double) ref[i];
        if (!isfinite(a[i])) {
            return INFINITY;
        }
    }
    return sig > 0 ? err / sig : err;
}

static int score_mode(int argc, char ** argv) {
    for (int i = 0; i < argc; ++i) {
        void * h = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
        if (h == NULL) {
            printf("score -1 %s\n", argv[i]);
            fprintf(stderr, "%s\n", dlerror());
            continue;
        }
        int (*score)(void) = (int (*)(void)) dlsym(h, "ggml_backend_score");
        printf("score %d %s\n", score ? score() : 0, argv[i]);
    }
    return 0;
}

int main(int argc, char ** argv) {
    double       seconds   = 1.0;
    int          n_threads = 0;
    const char * out_dir   = NULL;
    int          i         = 1;
    for (; i < argc && argv[i][0] == '-'; ++i) {
        if (strcmp(argv[i], "--score") == 0) {
            return score_mode(argc - i - 1, argv + i + 1);
        } else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            n_threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out_dir = argv[++i];
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (i + 1 != argc) {
        fprintf(stderr, "usage: %s [--seconds S] [--threads N] [--out DIR] LIBRARY\n", argv[0]);
        return 2;
    }
    const char * library = argv[i];
    if (n_threads <= 0) {
        const long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads        = 2 * (int) (n_cpu > 0 ? n_cpu : 1);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags     = SA_SIGINFO;
    const int sigs[] = { SIGILL, SIGSEGV, SIGBUS, SIGFPE, SIGABRT };
    for (size_t s = 0; s < sizeof(sigs) / sizeof(sigs[0]); ++s) {
        sigaction(sigs[s], &sa, NULL);
    }

    void * h = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        fprintf(stderr, "cannot load %s: %s\n", library, dlerror());
        return 2;
    }
    ggml_backend_reg_t (*init)(void) = (ggml_backend_reg_t (*)(void)) dlsym(h, "ggml_backend_init");
    if (init == NULL) {
        fprintf(stderr, "%s has no ggml_backend_init: not a GGML_BACKEND_DL backend\n", library);
        return 2;
    }
    g_case                 = "(ggml_backend_init)";
    ggml_backend_reg_t reg = init();
    if (reg == NULL || ggml_backend_reg_dev_count(reg) < 1) {
        fprintf(stderr, "%s registers no device\n", library);
        return 2;
    }
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    g_case                 = "(ggml_backend_dev_init)";
    ggml_backend_t backend = ggml_backend_dev_init(dev, NULL);
    ggml_backend_set_n_threads_t set_threads =
        (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (backend == NULL || set_threads == NULL) {
        fprintf(stderr, "%s: cannot start its CPU backend\n", library);
        return 2;
    }
    set_threads(backend, n_threads);

    /* the buffer types: the variant's extra ones (each may take some types), then the plain CPU one */
    ggml_backend_buffer_type_t bufts[8];
    int                        n_bufts = 0;
    ggml_backend_dev_get_extra_bufts_t get_extra =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    g_case = "(extra buffer types)";
    if (get_extra) {
        for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b && n_bufts < 7; ++b) {
            bufts[n_bufts++] = *b;
        }
    }
    bufts[n_bufts++] = ggml_backend_dev_buffer_type(dev);

    static const enum ggml_type mm_types[] = {
        GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1,   GGML_TYPE_Q5_0,
        GGML_TYPE_Q8_0, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K,   GGML_TYPE_Q6_K,
        GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS,
    };
    static const enum ggml_type id_types[] = {
        GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_IQ4_NL,
    };
    static const int mm_cols[] = { 1, 3, 32 }; /* a decode step, a short batch, a batch the tiled kernels take */
    static const int id_cols[] = { 1, 8 };
    const int        n_mm      = sizeof(mm_types) / sizeof(mm_types[0]);
    const int        n_id      = sizeof(id_types) / sizeof(id_types[0]);
    const int        max_cases = n_bufts * (n_mm * 3 + n_id * 2);
    struct check_case * cases  = calloc((size_t) max_cases, sizeof(*cases));
    int                 n      = 0;
    uint64_t            seed   = 0x6e756d61u;
    for (int b = 0; b < n_bufts; ++b) {
        for (int op = 0; op < 2; ++op) {
            const int n_types = op ? n_id : n_mm;
            for (int t = 0; t < n_types; ++t) {
                for (int k = 0; k < (op ? 2 : 3); ++k) {
                    const enum ggml_type type = op ? id_types[t] : mm_types[t];
                    const int            cols = op ? id_cols[k] : mm_cols[k];
                    const int rc = make_case(&cases[n], dev, bufts[b], type, op, cols, seed++);
                    if (rc < 0) {
                        return 2;
                    }
                    if (rc == 0) {
                        printf("skip %s-%s-%s-%d\n", ggml_backend_buft_name(bufts[b]), op ? "mul_mat_id" : "mul_mat",
                               ggml_type_name(type), cols);
                        continue;
                    }
                    ++n;
                }
            }
        }
    }

    const double t0     = now_s();
    int          rounds = 0;
    do {
        for (int c = 0; c < n; ++c) {
            g_case = cases[c].name;
            if (ggml_backend_graph_compute(backend, cases[c].gf) != GGML_STATUS_SUCCESS) {
                printf("fail %s compute failed\n", cases[c].name);
                return 1;
            }
            ggml_backend_tensor_get(cases[c].y, cases[c].out, 0, sizeof(float) * cases[c].n_out);
            const double e = nmse(cases[c].out, cases[c].ref, cases[c].n_out);
            if (rounds == 0) {
                printf("case %s nmse %.3g\n", cases[c].name, e);
                if (out_dir) {
                    char path[512];
                    snprintf(path, sizeof(path), "%s/%s.f32", out_dir, cases[c].name);
                    FILE * f = fopen(path, "wb");
                    if (f == NULL || fwrite(cases[c].out, sizeof(float), cases[c].n_out, f) != (size_t) cases[c].n_out) {
                        fprintf(stderr, "cannot write %s: %s\n", path, strerror(errno));
                        return 2;
                    }
                    fclose(f);
                }
            }
            if (!(e <= TOL)) {
                printf("fail %s nmse %.3g (round %d; tolerance %g)\n", cases[c].name, e, rounds + 1, TOL);
                return 1;
            }
        }
        ++rounds;
        fflush(stdout);
    } while (now_s() - t0 < seconds);
    printf("ok %d %d %.2f %d\n", n, rounds, now_s() - t0, n_threads);
    g_case = "(teardown)";
    for (int c = 0; c < n; ++c) {
        free_case(&cases[c]);
    }
    free(cases);
    ggml_backend_free(backend);
    return 0;
}
