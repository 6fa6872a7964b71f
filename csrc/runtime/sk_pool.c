/*
 * The thread pool: par_run(nt, n, fn, ctx) runs fn(ctx, i) for the items i in [0, n) on nt threads (the
 * caller is thread 0). Items are pre-assigned: thread t owns the contiguous range [n*t/nt, n*(t+1)/nt), so a kernel that
 * numbers its items part-major gives every thread the same rows (and weights, which stay in that core's
 * cache) call after call; a thread that finishes its own range takes items from the others' (front to
 * back), so a late or slowed thread costs nothing but its share.
 *
 * Workers are persistent pthreads. After a job they spin for sk_settings.spin_ns (SPARSEKIT_SPIN_US,
 * default 100 us; set_threading) before sleeping on a condition variable: the next layer of a model, or
 * the next call of a model run back to back, finds them awake (a wake-up from sleep is slow, and OpenMP
 * regions with OMP_WAIT_POLICY=PASSIVE paid it on every region). The caller never
 * waits for a sleeping worker to wake: it waits for the items to be done, and does them itself if the
 * worker is not there yet.
 *
 * Protocol, built so that a job of a few microseconds costs the fewest cache-line trips between cores
 * (batch-1 layers at 98% sparsity run 3-20 us): the caller writes the job into one cache line (a
 * seqlock: g_job.seq odd while it is written) with plain stores and goes straight to its own items; a
 * spinning worker gets the whole job with one line transfer. Each thread's range has one claim counter
 * that only grows: job items are numbered from g_job.base, the count of all items of earlier jobs, so
 * item i of thread t's range is counter value base + i, claimed by compare-and-swap (the first claim of
 * a job jumps the counter up to its range), and nobody writes the other threads' lines to set a job
 * up. A late worker still holding an older job finds every counter past that job's ranges and touches
 * nothing: a job is finished only when all its items are claimed and done, so no one runs a stale
 * item. The caller claims its first item before it publishes the job. A thread done with its own range
 * waits up to STEAL_AFTER_NS for the job to end before it takes items from another range. Each worker
 * counts the items it finished in its own line; the caller sums those against its snapshot from the
 * previous job. Sleeping uses the Dekker pattern between g_job.seq and g_sleeping: the caller reads
 * g_sleeping right after publishing (plain read: wakes sleepers at once) and again after a fence once
 * it has run its items (catches a worker that went to sleep at that very moment). Calls from several
 * Python threads at once: the one that does not get g_dispatch runs its items serially. Without
 * pthreads (MSVC) OpenMP runs the items, without either one thread does.
 */
/* clock_gettime, sched_yield, sysconf(_SC_NPROCESSORS_ONLN) under -std=c99 (the other sources get
 * this from Python.h's pyconfig.h) */
#define _GNU_SOURCE 1
#include "sk_runtime.h"

#if SK_POOL
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#define YIELD_AFTER_NS 5000
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

int max_procs(void) {
#if SK_POOL
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
#elif defined(_OPENMP)
    return omp_get_num_procs();
#else
    return 1;
#endif
}

int clamp_threads(int t) {
#if SK_POOL || defined(_OPENMP)
    return t < 1 ? 1 : t > POOL_MAX ? POOL_MAX : t;
#else
    (void)t;
    return 1;
#endif
}

static inline void cpu_relax(void) {
#if SK_X86
    __builtin_ia32_pause();
#endif
}

#if SK_POOL
typedef struct {
    uint64_t seq; /* 2 * generation; odd while the caller writes the job */
    item_fn fn;
    void *ctx;
    int64_t n;
    int64_t nt;
    uint64_t base; /* items of all earlier jobs: claim counters of this job start here */
    char pad[16];
} job_t;

typedef struct {
    uint64_t word; /* claim counter of thread t's range: base + the next item (grows only) */
    char pad[56];
} claim_t;

typedef struct {
    uint64_t done; /* items this worker finished, over all jobs (only the worker writes it) */
    char pad[56];
} done_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_dispatch = PTHREAD_MUTEX_INITIALIZER;
static int g_nworkers = 0;
static int g_sleeping = 0; /* atomic */
static job_t g_job __attribute__((aligned(64)));
static claim_t g_claim[POOL_MAX] __attribute__((aligned(64)));
static done_t g_done[POOL_MAX] __attribute__((aligned(64)));
static uint64_t g_done_seen[POOL_MAX]; /* the caller's (g_dispatch holder's) snapshot of g_done */

#define LD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define LDA(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LDR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* the next item of range [start, end) of the job whose items are numbered from `base`, from claim
 * counter *w, or -1 when there is none (the range is done, or the counter belongs to a newer job).
 * *mine: the caller may take every item, it is the range's owner or the first to claim in it; other
 * thieves leave the last item to whoever works the range: taking it costs more than it saves (its
 * weights are in the other core's cache, and with a few us per job the thief would finish later than
 * the owner), and the owner is there, working. */
static inline int64_t claim(uint64_t *w, uint64_t base, int64_t start, int64_t end, int *mine) {
    uint64_t cur = LDR(w);
    const uint64_t lo = base + (uint64_t)start, hi = base + (uint64_t)end;
    for (;;) {
        const int started = cur >= lo;
        const uint64_t c = started ? cur : lo;
        if (c >= hi || (started && !*mine && c + 1 >= hi)) return -1;
        if (__atomic_compare_exchange_n(w, &cur, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            if (!started) *mine = 1;
            return (int64_t)(c - base);
        }
    }
}

typedef struct {
    uint64_t base;
    item_fn fn;
    void *ctx;
    int64_t n;
    int nt;
    uint64_t seq;
} jobsnap_t;

/* A thread that has run its own range waits up to this long for the job to end before it takes items
 * from another thread's range. Looking at another thread's claim counter moves that line out of its
 * owner's cache, and the owner's first claim of the next job then waits for it (a cache-line trip each
 * way); in a balanced job the other thread ends within a fraction of this. */
#define STEAL_AFTER_NS 2000

/* the job is over: for the caller, every item done; for a worker, a newer job published */
static int job_over(const jobsnap_t *j, int tid, int64_t own_done) {
    if (tid > 0) return LDA(&g_job.seq) != j->seq;
    int64_t total = own_done;
    for (int t = 1; t < j->nt; t++) total += (int64_t)(LDA(&g_done[t].done) - g_done_seen[t]);
    return total >= j->n;
}

/* run items of job j as thread tid: its own range first (from item `first` when the caller claimed it
 * before publishing the job), then, if the job is not over within STEAL_AFTER_NS (at once without
 * `wait`), the others'.
 * Returns how many. A worker adds what it did to its count after each range, not after each item: a
 * store per item would wait, at the next claim (a locked instruction), for the line the caller polls
 * to come back; and the caller learns that the worker's own range is done before the worker goes
 * looking for items to take. */
static int64_t run_items(const jobsnap_t *j, int tid, int64_t first, int wait) {
    int64_t done = 0, told = 0;
    for (int r = 0; r < j->nt; r++) {
        const int t = (tid + r) % j->nt;
        const int64_t start = j->n * t / j->nt, end = j->n * (t + 1) / j->nt;
        int mine = r == 0;
        if (r == 1 && wait) {
            const int64_t t0 = now_ns();
            int spins = 0, over = 0;
            while (!(over = job_over(j, tid, done))) {
                cpu_relax();
                if (++spins == 8) {
                    spins = 0;
                    if (now_ns() - t0 > STEAL_AFTER_NS) break;
                }
            }
            if (over) break;
        }
        if (r == 0 && first >= 0) {
            j->fn(j->ctx, first, tid);
            done++;
        }
        for (;;) {
            const int64_t i = claim(&g_claim[t].word, j->base, start, end, &mine);
            if (i < 0) break;
            j->fn(j->ctx, i, tid);
            done++;
        }
        if (tid > 0 && done > told) {
            STR(&g_done[tid].done, LDR(&g_done[tid].done) + (uint64_t)(done - told));
            told = done;
        }
    }
    return done;
}

static void wake_sleepers(void) {
    pthread_mutex_lock(&g_mu);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

/* a consistent copy of the published job, or 0 while one is being written */
static int snap_job(jobsnap_t *j, uint64_t seq) {
    if (seq & 1) return 0;
    j->fn = LDR(&g_job.fn);
    j->ctx = LDR(&g_job.ctx);
    j->n = LDR(&g_job.n);
    j->nt = (int)LDR(&g_job.nt);
    j->base = LDR(&g_job.base);
    j->seq = seq;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return LDR(&g_job.seq) == seq;
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint64_t seen = LDA(&g_job.seq) & ~(uint64_t)1;
    for (;;) {
        uint64_t s = LDA(&g_job.seq);
        jobsnap_t j;
        if (s == seen || (s & 1)) {
            const int64_t t0 = now_ns();
            int spins = 0;
            while ((s = LDA(&g_job.seq)) == seen || (s & 1)) {
                cpu_relax();
                if (++spins == 32) {
                    spins = 0;
                    const int64_t dt = now_ns() - t0;
                    if (dt > sk_settings.spin_ns) break;
                    /* after a few us, spin with yields: should the scheduler have put this worker on
                     * the caller's core (another process holding the other one), the caller runs */
                    if (dt > YIELD_AFTER_NS) sched_yield();
                }
            }
            if (s == seen || (s & 1)) {
                pthread_mutex_lock(&g_mu);
                ADD(&g_sleeping, 1);
                while ((s = LD(&g_job.seq)) == seen || (s & 1)) pthread_cond_wait(&g_cv, &g_mu);
                ADD(&g_sleeping, -1);
                pthread_mutex_unlock(&g_mu);
            }
        }
        if (!snap_job(&j, s)) continue; /* rewritten meanwhile: look again */
        seen = s;
        if (tid < j.nt) run_items(&j, tid, -1, 1);
    }
    return NULL;
}

static void pool_atfork_child(void) { /* the workers do not exist in a forked child */
    pthread_mutex_t mi = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t ci = PTHREAD_COND_INITIALIZER;
    g_mu = mi;
    g_dispatch = mi;
    g_cv = ci;
    g_nworkers = 0;
    g_sleeping = 0;
    memset(g_done_seen, 0, sizeof g_done_seen);
    memset(g_done, 0, sizeof g_done);
    g_job.seq &= ~(uint64_t)1; /* a job being written by another thread of the parent is gone */
}

/* start workers 1..want-1; returns how many threads (with the caller) are available */
static int pool_grow(int want) {
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, pool_atfork_child);
        atfork_done = 1;
    }
    while (g_nworkers + 1 < want) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 1 << 20);
        const int rc = pthread_create(&th, &at, worker_main, (void *)(intptr_t)(g_nworkers + 1));
        pthread_attr_destroy(&at);
        if (rc != 0) break;
        g_nworkers++;
    }
    return g_nworkers + 1;
}

/* one job on nt > 1 threads (g_dispatch held) */
static void pool_job(int nt, int64_t n, item_fn fn, void *ctx) {
    const uint64_t seq = LDR(&g_job.seq) + 2; /* even: the caller never leaves it odd */
    const uint64_t base = LDR(&g_job.base) + (uint64_t)LDR(&g_job.n);
    /* the caller's first item is claimed before the job is published: that claim (a locked instruction)
     * then finds nothing in the store buffer to wait for, and the job's stores drain while it runs */
    int mine = 1;
    const int64_t first = claim(&g_claim[0].word, base, 0, n / nt, &mine);
    STR(&g_job.seq, seq - 1);
    STR(&g_job.fn, fn);
    STR(&g_job.ctx, ctx);
    STR(&g_job.n, n);
    STR(&g_job.nt, (int64_t)nt);
    STR(&g_job.base, base);
    STR(&g_job.seq, seq);
    const jobsnap_t j = {base, fn, ctx, n, nt, seq};
    /* Dekker with a worker going to sleep (it adds itself to g_sleeping, then looks at g_job.seq): a
     * plain read here may miss one that is going to sleep right now, so it is read again after a fence
     * once the caller's own range is done; the worker joins late then, it is not lost */
    int woke = 0;
    if (LDR(&g_sleeping) > 0) {
        wake_sleepers();
        woke = 1;
    }
    /* a worker it had to wake arrives much later: take its items now rather than wait for it */
    int64_t done = run_items(&j, 0, first, !woke);
    if (!woke) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (LDR(&g_sleeping) > 0) wake_sleepers();
    }
    /* wait for the items the workers claimed; yield after a few us (a worker may share this core) */
    const int64_t t0 = now_ns();
    int spins = 0;
    for (;;) {
        int64_t total = done;
        for (int t = 1; t < nt; t++) total += (int64_t)(LDA(&g_done[t].done) - g_done_seen[t]);
        if (total >= n) break;
        cpu_relax();
        if (++spins == 32) {
            spins = 0;
            if (now_ns() - t0 > YIELD_AFTER_NS) sched_yield();
        }
    }
    for (int t = 1; t < nt; t++) g_done_seen[t] = LDR(&g_done[t].done);
}
#endif /* SK_POOL */

void par_run(int nt, int64_t n, item_fn fn, void *ctx) {
    if (n <= 0) return;
    if (nt > n) nt = (int)n;
#if SK_POOL
    if (nt > 1 && pthread_mutex_trylock(&g_dispatch) == 0) {
        const int have = pool_grow(nt);
        if (have < nt) nt = have;
        if (nt > 1) {
            pool_job(nt, n, fn, ctx);
            pthread_mutex_unlock(&g_dispatch);
            return;
        }
        pthread_mutex_unlock(&g_dispatch);
    }
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#elif defined(_OPENMP)
    if (nt > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t i = 0; i < n; i++) fn(ctx, i, omp_get_thread_num());
        return;
    }
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#else
    (void)nt;
    for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
#endif
}
