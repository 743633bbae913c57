/*
 * apl_view.c — the reader side: geometry and formatting of fresh segments,
 * views over mapped segments, reader slots and pins, lookups, scans,
 * snapshots, block images, and reading the change log.
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

uint32_t apl_format_number(void) { return APL_FORMAT; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Geometry and formatting                                             */
/* ------------------------------------------------------------------ */

int apl_geometry(struct apl_geometry *g)
{
    if (g->block_size < APL_MIN_BLOCK || g->block_size > APL_MAX_BLOCK ||
        (g->block_size & (g->block_size - 1)))
        return APL_EINVAL;
    if (g->nsegments < 1 || g->nsegments > APL_MAX_SEGMENTS)
        return APL_EINVAL;
    if (g->nfiles < 1 || g->nfiles > APL_MAX_FILES || g->nreaders < 1 || g->nreaders > 1u << 20)
        return APL_EINVAL;
    if (g->log_size < (64u << 10) || (g->log_size & 7) || g->max_overflow > 8)
        return APL_EINVAL;
    if (g->compressed) {
        /* devices cut into pages that hold lz4 objects; numbers as the primary has them */
        g->page_size = 65536;
        if ((uint64_t)(g->max_overflow + 2) * g->block_size + 64 > g->page_size)
            return APL_EINVAL;
        if (g->segment_size / g->page_size < 2 || g->max_blocks_in < 16)
            return APL_EINVAL;
        g->segment_slots = g->segment_size / g->page_size - 1;
        g->max_blocks = g->max_blocks_in;
    } else {
        g->page_size = 0;
        if (g->segment_size / g->block_size < 9)
            return APL_EINVAL;
        g->segment_slots = g->segment_size / g->block_size - 1;
        if (g->segment_slots > APL_ADDR_SLOT(APL_ADDR_NONE - 1))
            return APL_EINVAL;
        g->max_blocks = g->segment_slots * g->nsegments;
    }
    if (g->max_blocks >= APL_NO_BLOCK)
        return APL_EINVAL;
    if (g->layout_len > (16u << 20))
        return APL_EINVAL;
    g->files_off = APL_PAGE;
    g->layout_off = g->files_off + (uint64_t)g->nfiles * sizeof(struct apl_file);
    g->rown_off = APL_ALIGN(g->layout_off + g->layout_len, APL_PAGE);
    g->loc_off = APL_ALIGN(g->rown_off + (uint64_t)g->nreaders * sizeof(struct apl_rown), APL_PAGE);
    g->log_off = APL_ALIGN(g->loc_off + g->max_blocks * sizeof(apl_addr), APL_PAGE);
    g->meta_size = APL_ALIGN(g->log_off + g->log_size, APL_PAGE);
    g->readers_size = APL_ALIGN(sizeof(struct apl_rhdr) + (uint64_t)g->nreaders * sizeof(struct apl_reader), APL_PAGE);
    return APL_OK;
}

int apl_format_meta(uint8_t *meta, const struct apl_geometry *g, uint64_t instance,
                    uint64_t schema_hash, uint64_t created_ns)
{
    struct apl_super *sb = (struct apl_super *)meta;
    memset(meta, 0, g->loc_off);
    memset(meta + g->loc_off, 0xFF, g->max_blocks * sizeof(apl_addr));
    sb->sb_format = APL_FORMAT;
    sb->sb_instance = instance;
    sb->sb_created_ns = created_ns;
    sb->sb_schema_hash = schema_hash;
    sb->sb_block_size = g->block_size;
    sb->sb_nsegments = g->nsegments;
    sb->sb_segment_slots = g->segment_slots;
    sb->sb_max_blocks = g->max_blocks;
    sb->sb_nfiles = g->nfiles;
    sb->sb_max_overflow = g->max_overflow;
    sb->sb_nreaders = g->nreaders;
    sb->sb_files_off = g->files_off;
    sb->sb_layout_off = g->layout_len ? g->layout_off : 0;
    sb->sb_layout_len = g->layout_len;
    sb->sb_rown_off = g->rown_off;
    sb->sb_loc_off = g->loc_off;
    sb->sb_log_off = g->log_off;
    sb->sb_log_size = g->log_size;
    sb->sb_meta_size = g->meta_size;
    sb->sb_flags = g->compressed ? APL_SB_COMPRESSED : 0;
    sb->sb_page_size = g->page_size;
    sb->sb_nclasses = g->compressed ? APL_BCLASSES : 0;
    sb->sb_version = 0;
    sb->sb_epoch = 1;
    sb->sb_txn_next = 1;
    /* the magic last: a half-formatted segment is not an appliance segment */
    STORE_REL(&sb->sb_magic, APL_MAGIC_META);
    return APL_OK;
}

int apl_format_readers(uint8_t *mem, const struct apl_geometry *g, uint64_t instance)
{
    struct apl_rhdr *h = (struct apl_rhdr *)mem;
    memset(mem, 0, g->readers_size);
    h->rh_format = APL_FORMAT;
    h->rh_instance = instance;
    h->rh_nslots = g->nreaders;
    STORE_REL(&h->rh_magic, APL_MAGIC_READERS);
    return APL_OK;
}

int apl_format_device(uint8_t *mem, const struct apl_geometry *g, uint64_t instance, uint32_t index)
{
    struct apl_seghdr *h = (struct apl_seghdr *)mem;
    memset(mem, 0, g->block_size);
    h->sg_format = APL_FORMAT;
    h->sg_instance = instance;
    h->sg_index = index;
    h->sg_block_size = g->compressed ? g->page_size : g->block_size;
    h->sg_slots = g->segment_slots;
    STORE_REL(&h->sg_magic, APL_MAGIC_DEVICE);
    return APL_OK;
}

int apl_check_meta(const uint8_t *meta, uint64_t size)
{
    const struct apl_super *sb = (const struct apl_super *)meta;
    if (size < sizeof(*sb) || sb->sb_magic != APL_MAGIC_META)
        return APL_EMAGIC;
    if (sb->sb_format != APL_FORMAT)
        return APL_EVERSION;
    if (sb->sb_meta_size > size || sb->sb_log_off + sb->sb_log_size > size ||
        sb->sb_loc_off + sb->sb_max_blocks * sizeof(apl_addr) > sb->sb_log_off ||
        sb->sb_files_off + (uint64_t)sb->sb_nfiles * sizeof(struct apl_file) > sb->sb_rown_off ||
        (sb->sb_layout_len && (sb->sb_layout_off < sb->sb_files_off ||
                               sb->sb_layout_off + sb->sb_layout_len > sb->sb_rown_off)) ||
        sb->sb_rown_off + (uint64_t)sb->sb_nreaders * sizeof(struct apl_rown) > sb->sb_loc_off)
        return APL_EGEOMETRY;
    return APL_OK;
}

int apl_check_readers(const uint8_t *mem, uint64_t size, uint64_t instance)
{
    const struct apl_rhdr *h = (const struct apl_rhdr *)mem;
    if (size < sizeof(*h) || h->rh_magic != APL_MAGIC_READERS)
        return APL_EMAGIC;
    if (h->rh_format != APL_FORMAT)
        return APL_EVERSION;
    if (h->rh_instance != instance ||
        sizeof(*h) + (uint64_t)h->rh_nslots * sizeof(struct apl_reader) > size)
        return APL_EGEOMETRY;
    return APL_OK;
}

int apl_check_device(const uint8_t *mem, uint64_t size, uint64_t instance, uint32_t index)
{
    const struct apl_seghdr *h = (const struct apl_seghdr *)mem;
    if (size < sizeof(*h) || h->sg_magic != APL_MAGIC_DEVICE)
        return APL_EMAGIC;
    if (h->sg_format != APL_FORMAT)
        return APL_EVERSION;
    if (h->sg_instance != instance || h->sg_index != index ||
        (h->sg_slots + 1) * (uint64_t)h->sg_block_size > size)
        return APL_EGEOMETRY;
    return APL_OK;
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

/* This thread's record: which view a read of it is inside (0 = none). */
struct rd_thread {
    volatile uint64_t in_view;
    struct rd_thread *next;
    int registered;
};
static __thread struct rd_thread tls_rd;
static struct rd_thread *rd_threads;     /* under views_lock */
/* 0 once membarrier(PRIVATE_EXPEDITED) is registered: the closer fences for us */
static int rd_need_fence = 1;
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

static void rd_register(void)
{
    pthread_mutex_lock(&views_lock);
    tls_rd.next = rd_threads;
    rd_threads = &tls_rd;
    tls_rd.registered = 1;
    pthread_mutex_unlock(&views_lock);
    pthread_setspecific(tls_key, (void *)1); /* arm the destructor */
}

/* Enter a read of view v: announce it, then check that v is not closed
 * (Dekker with apl_view_close: one of the two sees the other). Nothing
 * mapped may be touched before this returns APL_OK. */
static inline int view_enter(apl_view *v)
{
    if (__builtin_expect(!tls_rd.registered, 0))
        rd_register();
    STORE_RLX(&tls_rd.in_view, v->v_id);
    if (rd_need_fence)
        FENCE();
    else
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (LOAD_RLX(&v->v_closed)) {
        STORE_REL(&tls_rd.in_view, 0);
        return APL_ECLOSED;
    }
    return APL_OK;
}

static inline void view_exit(void)
{
    STORE_REL(&tls_rd.in_view, 0);
}

/* A read's result, unless its version was freed meanwhile: reused memory is
 * written only after sb_horizon passed the versions it held (apl_reclaim), so
 * a read that saw any of it sees the horizon past its version here. */
static inline int64_t horizon_checked(const apl_view *v, uint64_t ver, int64_t rc)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD_ACQ(&v->v_sb->sb_horizon) > ver)
        return APL_ESNAPSHOT;
    return rc;
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

/* ------------------------------------------------------------------ */
/* Lookups                                                             */
/* ------------------------------------------------------------------ */

struct apl_bhdr *apl_descend(const apl_view *v, uint32_t file, uint64_t version,
                             uint64_t p, const uint8_t *k, uint32_t n)
{
    if (file >= v->v_nfiles)
        return 0;
    uint32_t num = v->v_files[file].fl_root;
    for (uint32_t depth = 0; depth < APL_MAX_HEIGHT; depth++) {
        struct apl_bhdr *b = apl_resolve(v, num, version);
        if (!b)
            return 0;
        if (b->bh_level == 0)
            return b->bh_magic == APL_BLK_LEAF ? b : 0;
        if (b->bh_magic != APL_BLK_INNR || b->bh_nslots == 0)
            return 0;
        num = apl_slots(b)[apl_child_index(b, p, k, n)].sl_aux;
    }
    return 0;
}

/* A slot's record, bounds-checked against the block. */
static inline int slot_ok(const apl_view *v, const struct apl_slot *s)
{
    return (uint32_t)s->sl_off + s->sl_klen + s->sl_aux <= v->v_bsize && s->sl_off >= HDR_SIZE;
}

static int64_t get_at(apl_view *v, uint32_t file, uint64_t ver, const uint8_t *key,
                      uint32_t klen, uint8_t *out, uint64_t cap)
{
    uint64_t p = apl_prefix(key, klen);
    struct apl_bhdr *b = apl_descend(v, file, ver, p, key, klen);
    if (!b)
        return APL_ECORRUPT;
    uint32_t ci;
    b = apl_chain_block(v, b, p, key, klen, &ci);
    int eq;
    uint32_t i = apl_lower_bound(b, p, key, klen, &eq);
    if (!eq)
        return APL_NOTFOUND;
    const struct apl_slot *s = &apl_slots(b)[i];
    if (!slot_ok(v, s))
        return APL_ECORRUPT;
    uint32_t vlen = s->sl_aux;
    if (vlen > cap) {
        if (cap >= 8) {
            uint64_t need = vlen;
            memcpy(out, &need, 8);
        }
        return APL_EBUFSIZE;
    }
    memcpy(out, (const uint8_t *)b + s->sl_off + s->sl_klen, vlen);
    return vlen;
}

/* Begin a read at `version`, or (0) at the latest under this thread's
 * per-call pin (*r, else NULL): view_enter first, so nothing mapped is touched
 * on a closed view. */
static inline int read_begin(apl_view *v, uint64_t version, uint64_t *ver, struct apl_reader **r)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    *r = 0;
    *ver = version;
    if (!version && !(*r = apl_op_pin(v, ver))) {
        view_exit();
        return APL_EREADERS;
    }
    return APL_OK;
}

/* End it: the result, checked against the horizon while still pinned. */
static inline int64_t read_end(apl_view *v, uint64_t ver, struct apl_reader *r, int64_t rc)
{
    rc = horizon_checked(v, ver, rc);
    if (r)
        apl_op_unpin(r);
    view_exit();
    return rc;
}

int64_t apl_get(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen,
                uint64_t version, uint8_t *out, uint64_t cap)
{
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (klen > APL_MAX_KEY)
        return APL_EKEY;
    if (file >= v->v_nfiles)
        return APL_EFILE;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, get_at(v, file, ver, key, klen, out, cap));
}

/* Integer keys: 8 bytes big-endian with the sign bit flipped (memcmp order = numeric order). */
int64_t apl_get_i64(apl_view *v, uint32_t file, int64_t key, uint64_t version,
                    uint8_t *out, uint64_t cap)
{
    uint64_t be = __builtin_bswap64((uint64_t)key ^ 0x8000000000000000ull);
    return apl_get(v, file, (const uint8_t *)&be, 8, version, out, cap);
}

int64_t apl_count(apl_view *v, uint32_t file, uint64_t version)
{
    if (file >= v->v_nfiles)
        return APL_EFILE;
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    if (v->v_flags & APL_SB_COMPRESSED) {
        uint8_t img[64];
        int64_t n = apl_bobj_image(v, v->v_files[file].fl_meta, ver, img, sizeof img);
        uint64_t c;
        if (n >= 28) {
            memcpy(&c, img + 20, 8);
            rc = (int64_t)c;
        } else {
            rc = APL_ECORRUPT;
        }
    } else {
        struct apl_bhdr *m = apl_resolve(v, v->v_files[file].fl_meta, ver);
        rc = (m && m->bh_magic == APL_BLK_META) ? (int64_t)m->bh_count : APL_ECORRUPT;
    }
    return read_end(v, ver, r, rc);
}

/* ------------------------------------------------------------------ */
/* Ordered iteration over one file at one version                      */
/* ------------------------------------------------------------------ */

struct iter {
    const apl_view *v;
    uint64_t ver;
    int depth;                         /* number of inner levels on the path */
    struct { struct apl_bhdr *b; uint32_t i; } path[APL_MAX_HEIGHT];
    struct apl_bhdr *blk;              /* current block of the leaf chain */
    uint32_t idx;                      /* next slot in blk */
    uint32_t hops;                     /* overflow blocks followed in this chain */
    int err;
};

/* Descend to the leftmost leaf below block `num`, pushing the path. */
static int iter_down(struct iter *it, uint32_t num)
{
    for (;;) {
        struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
        if (!b)
            return it->err = APL_ECORRUPT;
        if (b->bh_level == 0) {
            it->blk = b;
            it->idx = 0;
            it->hops = 0;
            return 0;
        }
        if (b->bh_nslots == 0 || it->depth >= (int)APL_MAX_HEIGHT)
            return it->err = APL_ECORRUPT;
        it->path[it->depth].b = b;
        it->path[it->depth].i = 0;
        it->depth++;
        num = apl_slots(b)[0].sl_aux;
    }
}

/* Position at the first record >= key (> key when !incl). */
static int iter_seek(struct iter *it, uint32_t file, const uint8_t *k, uint32_t n, int incl)
{
    uint64_t p = apl_prefix(k, n);
    uint32_t num = it->v->v_files[file].fl_root;
    it->depth = 0;
    it->err = 0;
    for (;;) {
        struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
        if (!b)
            return it->err = APL_ECORRUPT;
        if (b->bh_level == 0)
            break;
        if (b->bh_nslots == 0 || it->depth >= (int)APL_MAX_HEIGHT)
            return it->err = APL_ECORRUPT;
        uint32_t ci = apl_child_index(b, p, k, n);
        it->path[it->depth].b = b;
        it->path[it->depth].i = ci;
        it->depth++;
        num = apl_slots(b)[ci].sl_aux;
    }
    struct apl_bhdr *b = apl_resolve(it->v, num, it->ver);
    if (!b)
        return it->err = APL_ECORRUPT;
    uint32_t ci;
    b = apl_chain_block(it->v, b, p, k, n, &ci);
    it->hops = ci;
    int eq;
    uint32_t i = apl_lower_bound(b, p, k, n, &eq);
    if (eq && !incl)
        i++;
    it->blk = b;
    it->idx = i;
    return 0;
}

/* Next record, or 0 at the end. */
static const struct apl_slot *iter_next(struct iter *it, struct apl_bhdr **owner)
{
    for (;;) {
        if (it->err)
            return 0;
        if (it->idx < it->blk->bh_nslots) {
            const struct apl_slot *s = &apl_slots(it->blk)[it->idx++];
            if (!slot_ok(it->v, s)) {
                it->err = APL_ECORRUPT;
                return 0;
            }
            *owner = it->blk;
            return s;
        }
        if (it->blk->bh_next != APL_ADDR_NONE) {
            struct apl_bhdr *nx = apl_ptr(it->v, it->blk->bh_next);
            if (!nx || ++it->hops > 64) {
                it->err = APL_ECORRUPT;
                return 0;
            }
            it->blk = nx;
            it->idx = 0;
            continue;
        }
        /* end of the chain: climb to the next child */
        while (it->depth > 0 && it->path[it->depth - 1].i + 1 >= it->path[it->depth - 1].b->bh_nslots)
            it->depth--;
        if (it->depth == 0)
            return 0;
        struct apl_bhdr *pb = it->path[it->depth - 1].b;
        uint32_t ni = ++it->path[it->depth - 1].i;
        if (iter_down(it, apl_slots(pb)[ni].sl_aux))
            return 0;
    }
}

static int64_t scan_at(apl_view *v, uint32_t file, uint64_t ver,
                       const uint8_t *lo, uint32_t lolen, int lo_incl,
                       const uint8_t *hi, uint32_t hilen, uint32_t what,
                       uint8_t *out, uint64_t cap, uint64_t *count,
                       uint8_t *resume, uint32_t *resume_len, int *more)
{
    struct iter it = {.v = v, .ver = ver};
    if (iter_seek(&it, file, lo, lolen, lo_incl))
        return it.err;
    uint64_t hp = hilen != APL_NO_BOUND ? apl_prefix(hi, hilen) : 0;
    uint64_t used = 0, n = 0;
    *more = 0;
    struct apl_bhdr *b;
    const struct apl_slot *s;
    while ((s = iter_next(&it, &b))) {
        const uint8_t *k = apl_slot_key(b, s);
        if (hilen != APL_NO_BOUND && apl_keycmp(s->sl_prefix, k, s->sl_klen, hp, hi, hilen) >= 0)
            break;
        uint64_t need = what == APL_SCAN_KEYS ? 2u + s->sl_klen : s->sl_aux;
        if (used + need > cap) {
            if (n == 0) {
                if (cap >= 8)
                    memcpy(out, &need, 8);
                return APL_EBUFSIZE;
            }
            *more = 1;
            break;
        }
        if (what == APL_SCAN_KEYS) {
            uint16_t kl = s->sl_klen;
            memcpy(out + used, &kl, 2);
            memcpy(out + used + 2, k, kl);
        } else {
            memcpy(out + used, k + s->sl_klen, s->sl_aux);
        }
        used += need;
        n++;
        memcpy(resume, k, s->sl_klen);
        *resume_len = s->sl_klen;
    }
    if (it.err)
        return it.err;
    *count = n;
    return (int64_t)used;
}

int64_t apl_scan(apl_view *v, uint32_t file,
                 const uint8_t *lo, uint32_t lolen, int lo_incl,
                 const uint8_t *hi, uint32_t hilen,
                 uint64_t version, uint32_t what, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more)
{
    if (file >= v->v_nfiles)
        return APL_EFILE;
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (lolen > APL_MAX_KEY || (hilen != APL_NO_BOUND && hilen > APL_MAX_KEY))
        return APL_EKEY;
    if (what != APL_SCAN_VALUES && what != APL_SCAN_KEYS)
        return APL_EINVAL;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, scan_at(v, file, ver, lo, lolen, lo_incl, hi, hilen, what, out, cap,
                                       count, resume, resume_len, more));
}

static int64_t find_at(apl_view *v, uint32_t index, uint32_t table, uint64_t ver,
                       const uint8_t *prefix, uint32_t plen,
                       const uint8_t *after, uint32_t afterlen,
                       uint8_t *out, uint64_t cap, uint64_t *count,
                       uint8_t *resume, uint32_t *resume_len, int *more)
{
    struct iter it = {.v = v, .ver = ver};
    int rc = afterlen ? iter_seek(&it, index, after, afterlen, 0)
                      : iter_seek(&it, index, prefix, plen, 1);
    if (rc)
        return rc;
    uint64_t used = 0, n = 0;
    *more = 0;
    struct apl_bhdr *b;
    const struct apl_slot *s;
    while ((s = iter_next(&it, &b))) {
        const uint8_t *k = apl_slot_key(b, s);
        if (s->sl_klen < plen || memcmp(k, prefix, plen) != 0)
            break;
        int64_t got = get_at(v, table, ver, k + plen, s->sl_klen - plen, out + used, cap - used);
        if (got == APL_EBUFSIZE) {
            if (n == 0)
                return APL_EBUFSIZE; /* get_at stored the length needed */
            *more = 1;
            break;
        }
        if (got < 0)
            return got == APL_NOTFOUND ? APL_ECORRUPT : got;
        used += (uint64_t)got;
        n++;
        memcpy(resume, k, s->sl_klen);
        *resume_len = s->sl_klen;
    }
    if (it.err)
        return it.err;
    *count = n;
    return (int64_t)used;
}

int64_t apl_find(apl_view *v, uint32_t index, uint32_t table,
                 const uint8_t *prefix, uint32_t plen,
                 const uint8_t *after, uint32_t afterlen,
                 uint64_t version, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more)
{
    if (index >= v->v_nfiles || table >= v->v_nfiles)
        return APL_EFILE;
    if (v->v_flags & APL_SB_COMPRESSED)
        return APL_ENOREAD;
    if (plen > APL_MAX_KEY || afterlen > APL_MAX_KEY)
        return APL_EKEY;
    uint64_t ver;
    struct apl_reader *r;
    int rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, find_at(v, index, table, ver, prefix, plen, after, afterlen, out, cap,
                                       count, resume, resume_len, more));
}

/* ------------------------------------------------------------------ */
/* Block images                                                        */
/* ------------------------------------------------------------------ */

#define PUT(T, x) do { T _x = (T)(x); if (used + sizeof(T) > cap) return APL_EBUFSIZE; \
                       memcpy(out + used, &_x, sizeof(T)); used += sizeof(T); } while (0)
#define PUTB(p, n) do { if (used + (n) > cap) return APL_EBUFSIZE; \
                        memcpy(out + used, (p), (n)); used += (n); } while (0)

int64_t apl_image(const apl_view *v, struct apl_bhdr *b, uint8_t *out, uint64_t cap)
{
    uint64_t used = 0;
    uint32_t nrec = 0, nb = 0;
    /* a chain has at most 1 + max_overflow (<= 9) blocks: a longer walk (reused
     * memory under a wiped pin) stops here; the horizon check then reports it */
    for (struct apl_bhdr *c = b; c && nb < 64; c = c->bh_next != APL_ADDR_NONE ? apl_ptr(v, c->bh_next) : 0, nb++)
        nrec += c->bh_nslots;
    if (nb == 64)
        return APL_ECORRUPT;
    PUT(uint32_t, b->bh_number);
    PUT(uint32_t, b->bh_magic);
    PUT(uint32_t, b->bh_file);
    PUT(uint16_t, b->bh_level);
    PUT(uint16_t, 0);
    PUT(uint32_t, nrec);
    if (b->bh_magic == APL_BLK_META) {
        PUT(uint64_t, b->bh_count);
        return (int64_t)used;
    }
    nb = 0;
    for (struct apl_bhdr *c = b; c && nb < 64; c = c->bh_next != APL_ADDR_NONE ? apl_ptr(v, c->bh_next) : 0, nb++) {
        const struct apl_slot *s = apl_slots(c);
        for (uint32_t i = 0; i < c->bh_nslots; i++) {
            uint32_t vlen = c->bh_level ? 0 : s[i].sl_aux;
            if ((uint32_t)s[i].sl_off + s[i].sl_klen + vlen > v->v_bsize)
                return APL_ECORRUPT;
            PUT(uint16_t, s[i].sl_klen);
            PUT(uint32_t, s[i].sl_aux);
            PUTB(apl_slot_key(c, &s[i]), s[i].sl_klen);
            if (vlen)
                PUTB(apl_slot_key(c, &s[i]) + s[i].sl_klen, vlen);
        }
    }
    return (int64_t)used;
}

int64_t apl_block_image(apl_view *v, uint32_t number, uint64_t version, uint8_t *out, uint64_t cap)
{
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    if (v->v_flags & APL_SB_COMPRESSED) {
        rc = apl_bobj_image(v, number, ver, out, cap);
    } else {
        struct apl_bhdr *b = apl_resolve_in_use(v, number, ver);
        rc = b ? apl_image(v, b, out, cap) : APL_NOTFOUND;
    }
    return read_end(v, ver, r, rc);
}

int apl_block_checksum(apl_view *v, uint32_t number, uint64_t version, uint64_t *sum)
{
    uint64_t cap = (uint64_t)v->v_bsize * 16 + 64;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return APL_ENOMEM;
    int64_t n = apl_block_image(v, number, version, buf, cap);
    if (n == APL_NOTFOUND) {
        *sum = 0;
        n = 0;
    } else if (n >= 0) {
        *sum = apl_fnv(0xcbf29ce484222325ull, buf, (uint64_t)n);
    }
    free(buf);
    return n < 0 ? (int)n : APL_OK;
}

uint64_t apl_block_limit(apl_view *v)
{
    if (view_enter(v))
        return 0;
    uint64_t n = v->v_max_blocks;
    while (n > 0 && LOAD_RLX(&v->v_loc[n - 1]) == APL_ADDR_NONE)
        n--;
    view_exit();
    return n;
}

/* ------------------------------------------------------------------ */
/* Change log reading                                                  */
/* ------------------------------------------------------------------ */

static int log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t g = LOAD_ACQ(&v->v_sb->sb_version);
        const struct apl_pub *pb = &v->v_sb->sb_pub[g & 1];
        uint64_t h = LOAD_ACQ(&pb->pb_log_head);
        uint64_t t = LOAD_ACQ(&pb->pb_log_tail);
        uint64_t s = LOAD_ACQ(&pb->pb_serial);
        FENCE();
        if (LOAD_ACQ(&pb->pb_version) == g && LOAD_ACQ(&v->v_sb->sb_version) == g) {
            *head = h;
            *tail = t;
            *version = g;
            *serial = s;
            return APL_OK;
        }
    }
    return APL_ECORRUPT;
}

int apl_log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_bounds(v, head, tail, version, serial);
    view_exit();
    return rc;
}

/*
 * Reading entries the writer may be overwriting (log_make_room publishes the
 * new tail, then a release fence, then overwrites): take the header once into
 * *h and use nothing but that copy (a compiler barrier keeps the compiler from
 * reading the shared header again); copy what it describes; then a full fence
 * and the bounds again. An entry from before the tail is APL_ELOGFULL, never
 * trusted: the copy may mix two entries. A header that fails its checks while
 * its position is still retained is corruption.
 */
static inline void entry_header(struct apl_centry *h, const struct apl_centry *e)
{
    memcpy(h, e, sizeof *h);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The error for a header that failed its checks at log position pos. */
static int entry_bad(apl_view *v, uint64_t pos)
{
    uint64_t head, tail, ver, serial;
    FENCE();
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    return rc ? rc : pos < tail ? APL_ELOGFULL : APL_ECORRUPT;
}

static int64_t log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap)
{
    uint64_t head, tail, ver, serial;
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    if (rc)
        return rc;
    uint64_t size = v->v_log_size;
    for (;;) {
        if (*pos >= head)
            return 0;
        if (*pos < tail)
            return APL_ELOGFULL;
        uint64_t off = *pos % size;
        if (size - off < sizeof(struct apl_centry)) {
            *pos += size - off;
            continue;
        }
        struct apl_centry h;
        entry_header(&h, (const struct apl_centry *)(v->v_log + off));
        uint32_t len = h.ce_len;
        if (len < sizeof(h) || (len & 7) || len > size - off)
            return entry_bad(v, *pos);
        if (h.ce_kind == APL_CE_PAD) {
            *pos += len;
            continue;
        }
        if (len > cap) {
            if (cap >= 8) {
                uint64_t need = len;
                memcpy(out, &need, 8);
            }
            return APL_EBUFSIZE;
        }
        memcpy(out, &h, sizeof h);
        memcpy(out + sizeof h, v->v_log + off + sizeof h, len - sizeof h);
        /* the copy is valid only if the writer did not overwrite it meanwhile */
        FENCE();
        if ((rc = log_bounds(v, &head, &tail, &ver, &serial)))
            return rc;
        if (*pos < tail)
            return APL_ELOGFULL;
        *pos += len;
        return len;
    }
}

int64_t apl_log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap)
{
    int64_t rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_read(v, pos, out, cap);
    view_exit();
    return rc;
}

/*
 * Copy whole entries from log position *pos (up to the published head) into
 * `out` for the replication stream, advancing *pos. With APL_EXPORT_DELTA an
 * UPDATE's A image becomes only its changed part when that is smaller
 * (u32 offset, u32 replaced length, new bytes; flag APL_CEF_DELTA, [0116]);
 * with APL_EXPORT_NO_B the B image is left out (flag APL_CEF_NO_B).
 * Entries with a serial above max_serial (unless 0) are left for later.
 * Returns bytes written (0: nothing new), APL_ELOGFULL when *pos was
 * overwritten, APL_EBUFSIZE when not even the first entry fits.
 */
static int64_t log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                          uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count)
{
    uint64_t head, tail, ver, serial;
    int rc = log_bounds(v, &head, &tail, &ver, &serial);
    if (rc)
        return rc;
    uint64_t size = v->v_log_size, used = 0, n = 0, p = *pos;
    uint64_t start = p;
    *first_serial = *last_serial = 0;
    if (p < tail)
        return APL_ELOGFULL;
    while (p < head) {
        uint64_t off = p % size;
        if (size - off < sizeof(struct apl_centry)) {
            p += size - off;
            continue;
        }
        struct apl_centry h;
        entry_header(&h, (const struct apl_centry *)(v->v_log + off));
        uint32_t len = h.ce_len;
        if (len < sizeof(h) || (len & 7) || len > size - off ||
            sizeof(h) + (uint64_t)h.ce_klen + h.ce_alen + h.ce_blen > len)
            return entry_bad(v, p);
        if (h.ce_kind == APL_CE_PAD) {
            p += len;
            continue;
        }
        if (max_serial && h.ce_serial > max_serial)
            break;
        const uint8_t *key = v->v_log + off + sizeof(h);
        const uint8_t *a = key + h.ce_klen, *b = a + h.ce_alen;
        uint32_t klen = h.ce_klen, alen = h.ce_alen, blen = h.ce_blen, flags = h.ce_flags;
        uint32_t doff = 0, drep = 0, dnew = 0;
        int delta = 0;
        if ((opts & APL_EXPORT_DELTA) && h.ce_kind == APL_CE_UPDATE && alen && blen) {
            uint32_t m = alen < blen ? alen : blen, pre = 0, suf = 0;
            while (pre < m && a[pre] == b[pre])
                pre++;
            while (suf < m - pre && a[alen - 1 - suf] == b[blen - 1 - suf])
                suf++;
            doff = pre;
            drep = blen - pre - suf;
            dnew = alen - pre - suf;
            if (8 + dnew < alen)
                delta = 1;
        }
        uint32_t out_alen = delta ? 8 + dnew : alen;
        uint32_t out_blen = (opts & APL_EXPORT_NO_B) ? 0 : blen;
        uint64_t elen = APL_ALIGN(sizeof(h) + (uint64_t)klen + out_alen + out_blen, 8);
        if (used + elen > cap) {
            if (n == 0) {
                if (cap >= 8)
                    memcpy(out, &elen, 8);
                return APL_EBUFSIZE;
            }
            break;
        }
        struct apl_centry *o = (struct apl_centry *)(out + used);
        memcpy(o, &h, sizeof(h));
        uint8_t *q = (uint8_t *)(o + 1);
        memcpy(q, key, klen);
        q += klen;
        if (delta) {
            memcpy(q, &doff, 4);
            memcpy(q + 4, &drep, 4);
            memcpy(q + 8, a + doff, dnew);
            flags |= APL_CEF_DELTA;
        } else {
            memcpy(q, a, alen);
        }
        q += out_alen;
        if (out_blen)
            memcpy(q, b, out_blen);
        else if (blen)
            flags |= APL_CEF_NO_B;
        q += out_blen;
        memset(q, 0, (out + used + elen) - q);
        o->ce_len = (uint32_t)elen;
        o->ce_alen = out_alen;
        o->ce_blen = out_blen;
        o->ce_flags = (uint16_t)flags;
        if (!n)
            *first_serial = h.ce_serial;
        *last_serial = h.ce_serial;
        n++;
        used += elen;
        p += len;
    }
    /* valid only if the writer did not overwrite what we copied */
    FENCE();
    if ((rc = log_bounds(v, &head, &tail, &ver, &serial)))
        return rc;
    if (start < tail)
        return APL_ELOGFULL;
    *pos = p;
    *count = n;
    return (int64_t)used;
}

int64_t apl_log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                       uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count)
{
    int64_t rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_export(v, pos, out, cap, opts, max_serial, first_serial, last_serial, count);
    view_exit();
    return rc;
}

/* Position of the entry with this serial; APL_NOTFOUND when it is past the
 * head, APL_ELOGFULL when it is no longer retained. */
static int log_seek(apl_view *v, uint64_t serial, uint64_t *pos)
{
    uint64_t head, tail, ver, last;
    int rc = log_bounds(v, &head, &tail, &ver, &last);
    if (rc)
        return rc;
    if (serial > last)
        return APL_NOTFOUND;
    uint64_t size = v->v_log_size, p = tail;
    while (p < head) {
        uint64_t off = p % size;
        if (size - off < sizeof(struct apl_centry)) {
            p += size - off;
            continue;
        }
        struct apl_centry h;
        entry_header(&h, (const struct apl_centry *)(v->v_log + off));
        if (h.ce_len < sizeof(h) || (h.ce_len & 7) || h.ce_len > size - off)
            return entry_bad(v, p);
        if (h.ce_kind != APL_CE_PAD) {
            if (h.ce_serial == serial) {
                *pos = p;
                FENCE();
                if ((rc = log_bounds(v, &head, &tail, &ver, &last)))
                    return rc;
                return p < tail ? APL_ELOGFULL : APL_OK;
            }
            if (h.ce_serial > serial)
                return APL_ELOGFULL;
        }
        p += h.ce_len;
    }
    return APL_ELOGFULL;
}

int apl_log_seek(apl_view *v, uint64_t serial, uint64_t *pos)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    rc = log_seek(v, serial, pos);
    view_exit();
    return rc;
}

/*
 * Block images of numbers [start, limit) at a pinned version, for a copy:
 * records of (u32 number, u32 length, image) back to back. A number not in
 * use at that version gets length 0: the secondary removes it and counts it
 * as copied, so a block the primary creates under that number later is
 * applied from the log, not dropped as "the copy will carry it" (the copy
 * has passed it). Stops before `cap` would overflow or at `limit`; *next is
 * the number to continue from. Returns bytes written.
 */
static int64_t block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                            uint8_t *out, uint64_t cap, uint32_t *next)
{
    uint64_t used = 0;
    uint32_t n = start;
    if (limit > v->v_max_blocks)
        limit = (uint32_t)v->v_max_blocks;
    for (; n < limit; n++) {
        if (used + 8 > cap)
            break;
        int64_t len;
        if (v->v_flags & APL_SB_COMPRESSED) {
            len = apl_bobj_image(v, n, version, out + used + 8, cap - used - 8);
        } else {
            struct apl_bhdr *b = apl_resolve_in_use(v, n, version);
            len = b ? apl_image(v, b, out + used + 8, cap - used - 8) : APL_NOTFOUND;
        }
        if (len == APL_NOTFOUND)
            len = 0;
        if (len == APL_EBUFSIZE) {
            if (used == 0)
                return APL_EBUFSIZE;
            break;
        }
        if (len < 0)
            return len;
        uint32_t num = n, l32 = (uint32_t)len;
        memcpy(out + used, &num, 4);
        memcpy(out + used + 4, &l32, 4);
        used += 8 + (uint64_t)len;
    }
    *next = n;
    return (int64_t)used;
}

int64_t apl_block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                         uint8_t *out, uint64_t cap, uint32_t *next)
{
    uint64_t ver;
    struct apl_reader *r;
    int64_t rc = read_begin(v, version, &ver, &r);
    if (rc)
        return rc;
    return read_end(v, ver, r, block_images(v, start, limit, ver, out, cap, next));
}
