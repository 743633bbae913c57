/*
 * apl_readers.c — the reader side's process state: views over mapped
 * segments and the registry of live views, the thread records and the
 * close protocol (apl_view_close waits for the reads inside a view), reader
 * slots (claiming, per-call pins, snapshots) and whether a slot's owner
 * still lives (apl_pid_start, apl_pid_gone). The reads themselves are in
 * apl_read.c and apl_log.c; each enters its view through view_enter
 * (apl_int.h), which reads this file's thread record.
 *
 * Reader slots (see apl_layout.h for the pin protocol and why it is safe):
 *   - per-call slots: one per (thread, view), cached in thread-local storage,
 *     pinned and unpinned inside each apl_get/apl_scan/apl_find call, so a
 *     call's reads see one committed version and nothing outlives the call;
 *   - snapshot slots: one per open snapshot (apl_snap_open/close), pinned for
 *     the snapshot's life.
 * A slot is claimed by CAS on rs_pid (0 -> our pid, or a dead owner's pid ->
 * ours); only the CAS winner writes the rest of it. A thread's cached slots
 * are released when it exits (pthread key destructor), a view's when it is
 * closed, and a dead process's by whoever notices (apl_pid_gone). After
 * fork() the child forgets the parent's cached slots and thread records
 * (pthread_atfork): they belong to the parent's pid and threads.
 *
 * Thread records (closing under reads, apl_layout.h): shared between the
 * threads of this process; each thread writes only its own in_view, the
 * closer reads them all under views_lock; the list itself changes only under
 * views_lock (a thread's first read, its exit, fork).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <unistd.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>

#include "apl_int.h"

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Views and the registry of live views                                */
/* ------------------------------------------------------------------ */

static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t next_view_id = 1;
#define MAX_LIVE_VIEWS 256
static apl_view *live_views[MAX_LIVE_VIEWS];

#define TLS_SLOTS 8
struct tls_ent {
    uint64_t view_id;
    struct apl_reader *slot;
    uint64_t gen;                  /* our claim's token (rs_gen) */
};
static __thread struct tls_ent tls_cache[TLS_SLOTS];
static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;

/* This thread's record (struct rd_thread: apl_int.h) */
__thread struct rd_thread tls_rd;
static struct rd_thread *rd_threads;     /* under views_lock */
/* 0 once membarrier(PRIVATE_EXPEDITED) is registered: the closer fences for us */
int rd_need_fence = 1;
/* this process's pid and start time (set again in a forked child) */
static uint32_t proc_pid;
static uint64_t proc_start;

static int view_is_live(uint64_t id)
{
    for (int i = 0; i < MAX_LIVE_VIEWS; i++)
        if (live_views[i] && live_views[i]->v_id == id)
            return 1;
    return 0;
}

static void release_slot(struct apl_reader *r)
{
    STORE_REL(&r->rs_pin, APL_PIN_IDLE);
    STORE_REL(&r->rs_view, 0);
    STORE_REL(&r->rs_pid, 0);
}

static void rd_unlink(struct rd_thread *t)
{
    for (struct rd_thread **p = &rd_threads; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            break;
        }
    t->registered = 0;
}

/* Thread exit: give back this thread's per-call slots of views still mapped. */
static void tls_destructor(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&views_lock);
    for (int i = 0; i < TLS_SLOTS; i++) {
        if (tls_cache[i].view_id && view_is_live(tls_cache[i].view_id))
            release_slot(tls_cache[i].slot);
        tls_cache[i].view_id = 0;
    }
    if (tls_rd.registered)
        rd_unlink(&tls_rd);
    pthread_mutex_unlock(&views_lock);
}

static void membarrier_register(void)
{
    rd_need_fence = syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0;
}

/* In a forked child the cached slots are the parent's and the other threads
 * do not exist: forget both. */
static void tls_atfork_child(void)
{
    memset(tls_cache, 0, sizeof(tls_cache));
    rd_threads = 0;
    if (tls_rd.registered) {
        tls_rd.next = 0;
        rd_threads = &tls_rd;
    }
    tls_rd.in_view = 0;
    pthread_mutex_init(&views_lock, 0);
    proc_pid = (uint32_t)getpid();
    proc_start = apl_pid_start(proc_pid);
    membarrier_register();
}

static void tls_init(void)
{
    pthread_key_create(&tls_key, tls_destructor);
    pthread_atfork(0, 0, tls_atfork_child);
    proc_pid = (uint32_t)getpid();
    proc_start = apl_pid_start(proc_pid);
    membarrier_register();
}

void rd_register(void)
{
    pthread_mutex_lock(&views_lock);
    tls_rd.next = rd_threads;
    rd_threads = &tls_rd;
    tls_rd.registered = 1;
    pthread_mutex_unlock(&views_lock);
    pthread_setspecific(tls_key, (void *)1); /* arm the destructor */
}

int apl_view_open(apl_view *v, uint8_t *meta, uint64_t meta_size,
                  uint8_t *readers, uint64_t readers_size,
                  uint8_t **segs, uint32_t nsegs, uint64_t seg_size)
{
    int rc = apl_check_meta(meta, meta_size);
    if (rc)
        return rc;
    const struct apl_super *sb = (const struct apl_super *)meta;
    if (nsegs != sb->sb_nsegments || nsegs > APL_MAX_SEGMENTS)
        return APL_EGEOMETRY;
    if (readers && (rc = apl_check_readers(readers, readers_size, sb->sb_instance)))
        return rc;
    if (readers && ((const struct apl_rhdr *)readers)->rh_nslots != sb->sb_nreaders)
        return APL_EGEOMETRY;
    memset(v, 0, sizeof(*v));
    v->v_meta = meta;
    v->v_sb = (struct apl_super *)meta;
    v->v_files = (struct apl_file *)(meta + sb->sb_files_off);
    v->v_rown = (struct apl_rown *)(meta + sb->sb_rown_off);
    v->v_loc = (uint64_t *)(meta + sb->sb_loc_off);
    v->v_log = meta + sb->sb_log_off;
    v->v_log_size = sb->sb_log_size;
    v->v_max_blocks = sb->sb_max_blocks;
    v->v_nfiles = sb->sb_nfiles;
    v->v_bsize = sb->sb_block_size;
    v->v_nseg = nsegs;
    v->v_flags = sb->sb_flags;
    v->v_seg_slots = sb->sb_segment_slots;
    uint64_t slot = (sb->sb_flags & APL_SB_COMPRESSED) ? sb->sb_page_size : v->v_bsize;
    if (!slot || (v->v_seg_slots + 1) * slot > seg_size)
        return APL_EGEOMETRY;
    for (uint32_t i = 0; i < nsegs; i++) {
        if (segs[i] && (rc = apl_check_device(segs[i], seg_size, sb->sb_instance, i)))
            return rc;
        v->v_seg[i] = segs[i];
    }
    if (readers) {
        v->v_rhdr = (struct apl_rhdr *)readers;
        v->v_readers = (struct apl_reader *)(readers + sizeof(struct apl_rhdr));
        v->v_nreaders = sb->sb_nreaders;
    }
    pthread_once(&tls_once, tls_init);
    pthread_mutex_lock(&views_lock);
    v->v_id = next_view_id++;
    int placed = 0;
    for (int i = 0; i < MAX_LIVE_VIEWS && !placed; i++)
        if (!live_views[i]) {
            live_views[i] = v;
            placed = 1;
        }
    pthread_mutex_unlock(&views_lock);
    return placed ? APL_OK : APL_ENOMEM;
}

void apl_view_close(apl_view *v)
{
    if (v->v_closed)
        return;
    STORE_RLX(&v->v_closed, 1);
    if (rd_need_fence || syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0)
        FENCE();
    /* wait for the reads other threads are inside (a read never waits, so
     * this ends); views_lock is not held while yielding: a read may take it */
    for (;;) {
        int busy = 0;
        pthread_mutex_lock(&views_lock);
        for (struct rd_thread *t = rd_threads; t && !busy; t = t->next)
            busy = t != &tls_rd && LOAD_ACQ(&t->in_view) == v->v_id;
        pthread_mutex_unlock(&views_lock);
        if (!busy)
            break;
        sched_yield();
    }
    pthread_mutex_lock(&views_lock);
    for (int i = 0; i < MAX_LIVE_VIEWS; i++)
        if (live_views[i] == v)
            live_views[i] = 0;
    if (v->v_readers) {
        uint32_t high = LOAD_ACQ(&v->v_rhdr->rh_high);
        for (uint32_t i = 0; i < high && i < v->v_nreaders; i++) {
            struct apl_reader *r = &v->v_readers[i];
            if (r->rs_pid == proc_pid && r->rs_view == v->v_id)
                release_slot(r);
        }
    }
    for (int i = 0; i < TLS_SLOTS; i++)
        if (tls_cache[i].view_id == v->v_id)
            tls_cache[i].view_id = 0;
    pthread_mutex_unlock(&views_lock);
    /* nothing mapped is reachable from a closed view: every entry point
     * checks v_closed (view_enter) before it touches a segment */
    v->v_id = 0;
    v->v_readers = 0;
    v->v_rhdr = 0;
    v->v_nreaders = 0;
}

int apl_view_set_segment(apl_view *v, uint32_t index, uint8_t *mem)
{
    if (index >= v->v_nseg)
        return APL_EINVAL;
    v->v_seg[index] = mem;
    return APL_OK;
}

uint64_t apl_committed(apl_view *v)
{
    if (view_enter(v))
        return 0;
    uint64_t g = apl_now_version(v);
    view_exit();
    return g;
}

/* ------------------------------------------------------------------ */
/* Reader slots and pins                                               */
/* ------------------------------------------------------------------ */

uint64_t apl_pid_start(uint32_t pid)
{
    char path[48], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* "pid (comm) state ..." — comm may hold spaces and parentheses: the
     * fields that follow start after its last ')'; starttime is field 22 */
    char *p = strrchr(buf, ')');
    if (!p)
        return 0;
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return field == 22 ? strtoull(p, 0, 10) : 0;
}

int apl_pid_gone(uint32_t pid, uint64_t start)
{
    if (pid == 0 || pid > APL_PID_MAX)
        return 1;
    if (kill((pid_t)pid, 0) == -1 && errno == ESRCH)
        return 1;
    if (start) {
        uint64_t now = apl_pid_start(pid);
        if (now && now != start)
            return 1;  /* the pid names another process now */
    }
    return 0;
}

static struct apl_reader *claim_slot(apl_view *v, uint32_t kind, uint64_t *token)
{
    if (!v->v_readers)
        return 0;
    uint32_t pid = proc_pid;
    uint32_t tid = (uint32_t)syscall(SYS_gettid);
    uint32_t n = v->v_nreaders;
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < n; i++) {
            struct apl_reader *r = &v->v_readers[i];
            uint32_t owner = LOAD_RLX(&r->rs_pid);
            uint32_t expect = owner;
            if (owner) {
                /* second pass: a dead process's slot is taken over by CAS; the
                 * winner alone writes the slot (a loser must not touch a pin
                 * that may already be someone else's) */
                if (pass == 0 || owner == pid || owner == APL_PID_BUSY ||
                    !apl_pid_gone(owner, LOAD_RLX(&r->rs_start)))
                    continue;
            }
            if (!__atomic_compare_exchange_n(&r->rs_pid, &expect, pid, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                continue;
            STORE_RLX(&r->rs_pin, APL_PIN_IDLE);
            r->rs_tid = tid;
            r->rs_view = v->v_id;
            r->rs_kind = kind;
            r->rs_since_ns = 0;
            r->rs_start = proc_start;
            uint64_t gen = r->rs_gen + 1;
            STORE_REL(&r->rs_gen, gen);
            *token = gen;
            uint32_t high = LOAD_RLX(&v->v_rhdr->rh_high);
            while (high < i + 1 &&
                   !__atomic_compare_exchange_n(&v->v_rhdr->rh_high, &high, i + 1, 0,
                                                __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                ;
            return r;
        }
    }
    return 0;
}

static inline uint64_t pin_latest(apl_view *v, struct apl_reader *r)
{
    STORE_RLX(&r->rs_pin, APL_PIN_PENDING);
    FENCE();
    uint64_t ver = LOAD_ACQ(&v->v_sb->sb_version);
    STORE_REL(&r->rs_pin, ver);
    return ver;
}

/* Inside view_enter: this thread's per-call slot of v, pinned at the latest version. */
struct apl_reader *apl_op_pin(apl_view *v, uint64_t *version)
{
    struct apl_reader *r = 0;
    int free_i = -1;
    for (int i = 0; i < TLS_SLOTS; i++) {
        if (tls_cache[i].view_id == v->v_id) {
            r = tls_cache[i].slot;
            if (LOAD_RLX(&r->rs_pid) != proc_pid || LOAD_RLX(&r->rs_gen) != tls_cache[i].gen) {
                /* the controller cleared it (or it was overwritten): not ours any more */
                tls_cache[i].view_id = 0;
                r = 0;
                free_i = i;
            }
            break;
        }
        if (!tls_cache[i].view_id && free_i < 0)
            free_i = i;
    }
    if (!r) {
        uint64_t gen;
        r = claim_slot(v, 1, &gen);
        if (!r)
            return 0;
        if (free_i < 0) {
            /* cache full: give the first entry's slot back, if its view still lives */
            pthread_mutex_lock(&views_lock);
            if (view_is_live(tls_cache[0].view_id))
                release_slot(tls_cache[0].slot);
            pthread_mutex_unlock(&views_lock);
            free_i = 0;
        }
        tls_cache[free_i].view_id = v->v_id;
        tls_cache[free_i].slot = r;
        tls_cache[free_i].gen = gen;
        pthread_setspecific(tls_key, (void *)1); /* arm the destructor */
    }
    *version = pin_latest(v, r);
    return r;
}

int apl_snap_open(apl_view *v, uint32_t *slot, uint64_t *gen, uint64_t *version)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    struct apl_reader *r = claim_slot(v, 2, gen);
    if (!r) {
        view_exit();
        return APL_EREADERS;
    }
    *version = pin_latest(v, r);
    r->rs_since_ns = now_ns();
    *slot = (uint32_t)(r - v->v_readers);
    view_exit();
    return APL_OK;
}

int apl_snap_close(apl_view *v, uint32_t slot, uint64_t gen)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    if (!v->v_readers || slot >= v->v_nreaders) {
        view_exit();
        return APL_EINVAL;
    }
    struct apl_reader *r = &v->v_readers[slot];
    /* only our own claim: after fork, or once the controller cleared it, the
     * slot is someone else's */
    if (r->rs_pid != proc_pid || r->rs_view != v->v_id || r->rs_gen != gen)
        rc = APL_EINVAL;
    else
        release_slot(r);
    view_exit();
    return rc;
}
