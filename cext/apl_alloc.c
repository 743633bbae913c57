/*
 * apl_alloc.c — what the writer frees, and when (the controller, one
 * thread): the free slot stacks and the free block numbers, the retire
 * queue, the oldest pin and the horizon, reclamation, the sweep of dead
 * readers' slots, crash recovery and aborting a batch (the same argument),
 * the writer's handle and its statistics. The whole freeing argument lives
 * here; the pin protocol it relies on is described in apl_layout.h.
 *
 * Shared: the reader slots (each reader writes its own pin; the controller
 * scans them and clears a dead owner's by CAS), sb_horizon and the location
 * table (the controller writes both). The free lists and the retire queue
 * are this process's memory. A version superseded at X is freed once every
 * pin is >= X: the scan takes a full fence first and postpones when a slot
 * is PENDING, and before anything is freed sb_horizon is raised to the bound
 * (release, full fence), so a pin below it (wiped or forged) fails its reads
 * rather than read reused memory.
 *
 * Crash recovery (apl_store_recover) needs nothing but the shared memory: every
 * block version newer than G is rolled back (its number's location entry is
 * set back to bh_prev), and the free lists and retire queue are rebuilt by
 * walking each number's version chain down to the first version that every
 * pin can see — everything older is free. That is sound because the oldest pin
 * never decreases (apl_layout.h), so nothing older was ever handed to a reader
 * that is still reading, and nothing kept has been reused.
 */

#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

/* ------------------------------------------------------------------ */
/* Allocation                                                          */
/* ------------------------------------------------------------------ */

uint64_t avail_slots(apl_store *s)
{
    if (s->use_reserve)
        return s->free_total;
    return s->free_total > s->reserve ? s->free_total - s->reserve : 0;
}

uint64_t avail_nums(apl_store *s)
{
    return s->nfree_nums + (s->v->v_max_blocks - s->next_num);
}

apl_addr alloc_slot(apl_store *s)
{
    if (!avail_slots(s))
        return APL_ADDR_NONE;
    uint32_t n = s->v->v_nseg;
    if (s->prefer_seg) {
        uint32_t seg = s->prefer_seg - 1;
        if (s->nfree[seg] && !seg_detached(s, seg)) {
            s->free_total--;
            return APL_ADDR(seg, s->free_slots[seg][--s->nfree[seg]]);
        }
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t seg = (s->next_seg + k) % n;
        if (s->nfree[seg] && s->v->v_seg[seg] && !seg_detached(s, seg)) {
            s->next_seg = seg + 1;
            s->free_total--;
            return APL_ADDR(seg, s->free_slots[seg][--s->nfree[seg]]);
        }
    }
    return APL_ADDR_NONE;
}

void free_slot(apl_store *s, apl_addr a)
{
    uint32_t seg = APL_ADDR_SEG(a);
    s->free_slots[seg][s->nfree[seg]++] = (uint32_t)APL_ADDR_SLOT(a);
    if (!seg_detached(s, seg))    /* a detached device's slots count again once it is renewed */
        s->free_total++;
}

static void free_chain(apl_store *s, apl_addr a)
{
    int guard = 0;
    while (a != APL_ADDR_NONE && guard++ < 64) {
        struct apl_bhdr *b = apl_ptr(s->v, a);
        apl_addr nx = b ? b->bh_next : APL_ADDR_NONE;
        free_slot(s, a);
        a = nx;
    }
}

uint32_t alloc_number(apl_store *s)
{
    if (s->nfree_nums)
        return s->free_nums[--s->nfree_nums];
    if (s->next_num < s->v->v_max_blocks)
        return (uint32_t)s->next_num++;
    return APL_NO_BLOCK;
}

int retire_push(apl_store *s, uint32_t kind, apl_addr addr, uint32_t number, uint64_t at)
{
    if (s->rq_len == s->rq_cap) {
        uint64_t ncap = s->rq_cap ? s->rq_cap * 2 : 1024;
        struct retire *nq = malloc(ncap * sizeof(*nq));
        if (!nq)
            return APL_ENOMEM;
        for (uint64_t i = 0; i < s->rq_len; i++)
            nq[i] = s->rq[(s->rq_head + i) % s->rq_cap];
        free(s->rq);
        s->rq = nq;
        s->rq_cap = ncap;
        s->rq_head = 0;
    }
    struct retire *r = &s->rq[(s->rq_head + s->rq_len) % s->rq_cap];
    r->at = at;
    r->addr = addr;
    r->number = number;
    r->kind = kind;
    r->slots = kind == RT_OBJECT ? 1 : kind == RT_CHAIN && !s->bs ? chain_len(s, apl_ptr(s->v, addr)) : 0;
    s->retained += r->slots;
    s->rq_len++;
    return APL_OK;
}

/* ------------------------------------------------------------------ */
/* Readers: oldest pin, sweeping, reclamation                          */
/* ------------------------------------------------------------------ */

/* Slots to scan: up to the writer's own high-water mark, which learns from
 * rh_high but is never lowered by it (a client may write rh_high). */
static uint32_t readers_high(apl_store *s)
{
    uint32_t high = LOAD_ACQ(&s->v->v_rhdr->rh_high);
    if (high > s->v->v_nreaders)
        high = s->v->v_nreaders;
    if (high > s->rhigh)
        s->rhigh = high;
    return s->rhigh;
}

/* Smallest pinned version, or the current version when nothing is pinned;
 * never below the horizon (a pin under it reads nothing: apl_layout.h).
 * *busy when some reader is between PENDING and its pin. */
static uint64_t oldest_pin(apl_store *s, int *busy, uint64_t *active)
{
    FENCE();
    uint64_t g = LOAD_ACQ(&s->v->v_sb->sb_version);
    uint64_t oldest = g;
    *busy = 0;
    if (active)
        *active = 0;
    if (!s->v->v_readers)
        return oldest;
    uint32_t high = readers_high(s);
    for (uint32_t i = 0; i < high; i++) {
        uint64_t pin = LOAD_ACQ(&s->v->v_readers[i].rs_pin);
        if (pin == APL_PIN_PENDING) {
            *busy = 1;
            continue;
        }
        if (pin && active)
            (*active)++;
        if (pin && pin < oldest)
            oldest = pin;
    }
    return oldest < s->horizon ? s->horizon : oldest;
}

/* Clear a slot held by `pid`: only the winner of the CAS pid -> BUSY writes
 * it (a claimer may take the slot the moment rs_pid is 0 again). */
static int clear_slot(apl_store *s, struct apl_reader *r, uint32_t pid)
{
    uint32_t expect = pid;
    if (pid != APL_PID_BUSY &&
        !__atomic_compare_exchange_n(&r->rs_pid, &expect, APL_PID_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    STORE_REL(&r->rs_pin, APL_PIN_IDLE);
    STORE_RLX(&r->rs_view, 0);
    STORE_REL(&r->rs_pid, 0);
    (void)s;
    return 1;
}

int64_t apl_sweep_readers(apl_store *s)
{
    if (!s->v->v_readers)
        return 0;
    int64_t cleared = 0;
    uint32_t high = readers_high(s);
    for (uint32_t i = 0; i < high; i++) {
        struct apl_reader *r = &s->v->v_readers[i];
        uint32_t pid = LOAD_ACQ(&r->rs_pid);
        /* BUSY is only ever set by a controller clearing the slot: one that
         * stopped half-way (only one controller runs at a time) */
        if (!pid || (pid != APL_PID_BUSY && !apl_pid_gone(pid, LOAD_RLX(&r->rs_start))))
            continue;
        cleared += clear_slot(s, r, pid);
    }
    return cleared;
}

int64_t apl_readers_list(apl_store *s, struct apl_slotinfo *out, uint32_t cap)
{
    if (!s->v->v_readers)
        return 0;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->v->v_nreaders && n < cap; i++) {
        struct apl_reader *r = &s->v->v_readers[i];
        uint32_t pid = LOAD_ACQ(&r->rs_pid);
        if (!pid)
            continue;
        if (i + 1 > s->rhigh)
            s->rhigh = i + 1;
        struct apl_slotinfo *o = &out[n++];
        o->slot = i;
        o->pid = pid;
        o->start = LOAD_RLX(&r->rs_start);
        o->gen = LOAD_RLX(&r->rs_gen);
        o->pin = LOAD_RLX(&r->rs_pin);
        o->since_ns = LOAD_RLX(&r->rs_since_ns);
        o->kind = LOAD_RLX(&r->rs_kind);
        o->owned = s->v->v_rown[i].ro_pid == pid && s->v->v_rown[i].ro_start == o->start;
    }
    return n;
}

int apl_reader_own(apl_store *s, uint32_t slot, uint32_t pid, uint64_t start)
{
    if (!s->v->v_readers || slot >= s->v->v_nreaders)
        return APL_EINVAL;
    s->v->v_rown[slot].ro_start = start;
    s->v->v_rown[slot].ro_pid = pid;
    return APL_OK;
}

int apl_reader_clear(apl_store *s, uint32_t slot, uint32_t pid, uint64_t gen)
{
    if (!s->v->v_readers || slot >= s->v->v_nreaders || !pid)
        return APL_EINVAL;
    struct apl_reader *r = &s->v->v_readers[slot];
    if (LOAD_ACQ(&r->rs_gen) != gen)
        return 0;
    int cleared = clear_slot(s, r, pid);
    if (cleared)
        s->v->v_rown[slot].ro_pid = 0;
    return cleared;
}

/* The version at which block `number` was removed (its head's bh_retired, or
 * a backup object's bo_retired); 0 when it is live, UINT64_MAX when not in use. */
static uint64_t removed_at(apl_store *s, uint32_t number)
{
    apl_addr a = apl_loc_raw(s->v->v_loc[number]);
    if (a == APL_ADDR_NONE)
        return UINT64_MAX;
    if (s->bs)
        return bs_removed_at(s, a);
    struct apl_bhdr *h = apl_ptr(s->v, a);
    return h ? h->bh_retired : UINT64_MAX;
}

int64_t apl_reclaim(apl_store *s)
{
    if (s->v->v_readers)
        readers_high(s);  /* learn every slot claimed so far, whatever rh_high says later */
    if (s->pending || !s->rq_len)
        return 0;
    int busy;
    uint64_t oldest = oldest_pin(s, &busy, 0);
    if (busy)
        return 0;
    if (oldest > s->horizon && s->rq[s->rq_head].at <= oldest) {
        /* before anything is freed: a pin below `oldest` (wiped or forged,
         * an honest one never is) fails its reads from now on */
        s->horizon = oldest;
        STORE_REL(&s->v->v_sb->sb_horizon, oldest);
        FENCE();
    }
    int64_t freed = 0;
    while (s->rq_len) {
        struct retire *r = &s->rq[s->rq_head];
        if (r->at > oldest)
            break;
        s->retained -= r->slots;
        if (r->kind == RT_CHAIN || r->kind == RT_OBJECT) {
            if (s->bs)
                bs_release(s, r->addr);
            else
                free_chain(s, r->addr);
            freed++;
        } else if (removed_at(s, r->number) == r->at) {
            /* The number is still removed by this very removal. It may have
             * come back since: a secondary re-creates a number as soon as its
             * primary reuses it, and the primary reuses a freed number at once
             * while this store's reclaim can lag (a snapshot pins it, or the
             * removal and the reuse arrived in one apply). Then its head is a
             * live block (bh_retired 0, or a later removal's version) and this
             * entry is stale: dropping the number would lose that block. */
            apl_addr a = apl_loc_raw(s->v->v_loc[r->number]);
            STORE_REL(&s->v->v_loc[r->number], APL_ADDR_NONE);
            if (s->bs)
                bs_release(s, a);
            else
                free_chain(s, a);
            s->free_nums[s->nfree_nums++] = r->number;
            freed++;
        }
        s->rq_head = (s->rq_head + 1) % s->rq_cap;
        s->rq_len--;
    }
    return freed;
}

/* ------------------------------------------------------------------ */
/* Opening and recovery                                                */
/* ------------------------------------------------------------------ */

apl_store *apl_store_new(apl_view *v, uint64_t reserve_slots)
{
    apl_store *s = calloc(1, sizeof(*s));
    if (!s)
        return 0;
    s->v = v;
    s->bsize = v->v_bsize;
    s->maxb = 1 + v->v_sb->sb_max_overflow;
    s->reserve = reserve_slots;
    s->epoch = v->v_sb->sb_epoch;
    s->max_record = (s->bsize - HDR_SIZE) / 2;
    s->max_key = (s->bsize - HDR_SIZE) / 4 - SLOT_SIZE;
    if (s->max_key > APL_MAX_KEY)
        s->max_key = APL_MAX_KEY;
    /* a chain, a new record and a sibling chain (apl_tree.c, share_with_sibling);
     * records: those of all three twice (in place and combined) */
    s->scratch_cap = (uint64_t)(2 * s->maxb + 3) * s->bsize;
    s->scratch = malloc(s->scratch_cap);
    s->recs_cap = 2 * (s->scratch_cap / SLOT_SIZE) + 16;
    s->recs = malloc(s->recs_cap * sizeof(struct rec));
    s->free_nums = malloc(v->v_max_blocks * sizeof(uint32_t));
    s->sums = (uint64_t *)(v->v_meta + v->v_sb->sb_sums_off);
    s->dirty_bits = calloc((v->v_max_blocks + 7) / 8, 1);
    int ok = s->scratch && s->recs && s->free_nums && s->dirty_bits && sums_dirty_grow(s) == APL_OK;
    if (ok && (v->v_flags & APL_SB_COMPRESSED))
        ok = bs_open(s) == APL_OK;
    for (uint32_t i = 0; ok && !s->bs && i < v->v_nseg; i++)
        ok = (s->free_slots[i] = malloc(v->v_seg_slots * sizeof(uint32_t))) != 0;
    if (!ok) {
        apl_store_free(s);
        return 0;
    }
    return s;
}

void apl_store_free(apl_store *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < APL_MAX_SEGMENTS; i++)
        free(s->free_slots[i]);
    bs_free(s);
    free(s->free_nums);
    free(s->dirty);
    free(s->dirty_bits);
    free(s->scratch);
    free(s->recs);
    free(s->rq);
    free(s);
}

void apl_store_use_reserve(apl_store *s, int on)
{
    s->use_reserve = on ? 1 : 0;
}

static int cmp_retire(const void *a, const void *b)
{
    const struct retire *x = a, *y = b;
    return (x->at > y->at) - (x->at < y->at);
}

static inline void mark(uint8_t **used, apl_addr a)
{
    used[APL_ADDR_SEG(a)][APL_ADDR_SLOT(a) >> 3] |= (uint8_t)(1u << (APL_ADDR_SLOT(a) & 7));
}

static int mark_chain(apl_store *s, uint8_t **used, apl_addr a, uint64_t *count)
{
    int guard = 0;
    while (a != APL_ADDR_NONE) {
        struct apl_bhdr *b = apl_ptr(s->v, a);
        if (!b || guard++ > 64)
            return APL_ECORRUPT;
        mark(used, a);
        (*count)++;
        a = b->bh_next;
    }
    return APL_OK;
}

int apl_store_recover(apl_store *s, struct apl_recovery *r)
{
    apl_view *v = s->v;
    struct apl_super *sb = v->v_sb;
    memset(r, 0, sizeof(*r));
    s->pending = 0;
    s->rq_head = s->rq_len = 0;
    uint64_t g = sb->sb_version;
    const struct apl_pub *pb = &sb->sb_pub[g & 1];
    if (g && pb->pb_version != g)
        return APL_ECORRUPT;
    s->log_head = g ? pb->pb_log_head : 0;
    s->log_tail = g ? pb->pb_log_tail : 0;
    /* the interrupted batch may have dropped entries past the published head
     * (log_make_room); nothing valid lies beyond the head */
    if (s->log_tail > s->log_head)
        s->log_tail = s->log_head;
    s->serial = g ? pb->pb_serial : 0;
    s->epoch = sb->sb_epoch;
    s->retained = 0;
    s->horizon = sb->sb_horizon;
    r->readers_cleared = (uint64_t)apl_sweep_readers(s);
    if (s->bs) {
        /* bs_recover keeps no old version: nothing below G is readable now */
        s->horizon = g;
        STORE_REL(&sb->sb_horizon, g);
        FENCE();
        int brc = bs_recover(s, r);
        r->log_head = s->log_head;
        if (brc == APL_OK)
            sums_flush(s);
        return brc;
    }
    /* a reader between PENDING and its pin will pin the current version; a
     * pin below the horizon (forged, or wiped and written back) is taken as
     * the horizon: versions older than it may have been freed and reused, so
     * the chains are walked back no further */
    int busy;
    uint64_t oldest = oldest_pin(s, &busy, 0);

    uint8_t *used[APL_MAX_SEGMENTS] = {0};
    uint64_t bytes = (v->v_seg_slots + 7) / 8;
    int rc = APL_OK;
    for (uint32_t i = 0; i < v->v_nseg; i++)
        if (!(used[i] = calloc(1, bytes)))
            rc = APL_ENOMEM;
    uint64_t max_used = 0;
    s->nfree_nums = 0;
    for (uint64_t num = 0; rc == APL_OK && num < v->v_max_blocks; num++) {
        apl_addr a = apl_loc_raw(v->v_loc[num]);
        if (a == APL_ADDR_NONE)
            continue;
        /* roll back versions the crash left unpublished (a detached
         * device's marks are set again below, devices_retag) */
        apl_addr a0 = v->v_loc[num];
        while (a != APL_ADDR_NONE) {
            struct apl_bhdr *h = apl_ptr(v, a);
            if (!h) {
                rc = APL_ECORRUPT;
                break;
            }
            if (h->bh_version <= g)
                break;
            if ((rc = mark_chain(s, used, a, &r->slots_used)) ||
                (rc = retire_push(s, RT_CHAIN, a, (uint32_t)num, g + 1)))
                break;
            r->rolled_back++;
            a = h->bh_prev;
        }
        if (rc)
            break;
        if (a != a0)
            loc_publish(s, (uint32_t)num, a);   /* (its checksum too: sums_flush below) */
        if (a == APL_ADDR_NONE)
            continue;
        struct apl_bhdr *h = apl_ptr(v, a);
        if (h->bh_retired > g)
            h->bh_retired = 0;
        if ((rc = mark_chain(s, used, a, &r->slots_used)))
            break;
        r->blocks_live++;
        max_used = num + 1;
        if (h->bh_retired && (rc = retire_push(s, RT_NUMBER, APL_ADDR_NONE, (uint32_t)num, h->bh_retired)))
            break;
        /* older versions some reader may still see */
        struct apl_bhdr *cur = h;
        while (cur->bh_version > oldest && cur->bh_prev != APL_ADDR_NONE) {
            apl_addr pa = cur->bh_prev;
            struct apl_bhdr *pv = apl_ptr(v, pa);
            if (!pv || pv->bh_version >= cur->bh_version) {
                rc = APL_ECORRUPT;
                break;
            }
            if ((rc = mark_chain(s, used, pa, &r->slots_used)) ||
                (rc = retire_push(s, RT_CHAIN, pa, (uint32_t)num, cur->bh_version)))
                break;
            r->versions_kept++;
            cur = pv;
        }
        if (rc)
            break;
    }
    if (rc == APL_OK) {
        s->next_num = max_used;
        for (uint64_t num = max_used; num-- > 0;)
            if (v->v_loc[num] == APL_ADDR_NONE)
                s->free_nums[s->nfree_nums++] = (uint32_t)num;
        s->free_total = 0;
        for (uint32_t i = 0; i < v->v_nseg; i++) {
            s->nfree[i] = 0;
            if (!v->v_seg[i])
                continue;
            for (uint64_t sl = v->v_seg_slots; sl-- > 0;)
                if (!(used[i][sl >> 3] & (1u << (sl & 7))))
                    s->free_slots[i][s->nfree[i]++] = (uint32_t)sl;
            if (!seg_detached(s, i))
                s->free_total += s->nfree[i];
        }
        /* the retire queue must be ordered by `at` */
        if (s->rq_len) {
            struct retire *tmp = malloc(s->rq_len * sizeof(*tmp));
            if (!tmp) {
                rc = APL_ENOMEM;
            } else {
                for (uint64_t i = 0; i < s->rq_len; i++)
                    tmp[i] = s->rq[(s->rq_head + i) % s->rq_cap];
                qsort(tmp, s->rq_len, sizeof(*tmp), cmp_retire);
                memcpy(s->rq, tmp, s->rq_len * sizeof(*tmp));
                s->rq_head = 0;
                free(tmp);
            }
        }
    }
    for (uint32_t i = 0; i < v->v_nseg; i++)
        free(used[i]);
    r->log_head = s->log_head;
    if (rc == APL_OK)
        devices_retag(s);
    if (rc == APL_OK)
        sums_flush(s);   /* the numbers rolled back, and those an aborted batch had marked */
    return rc;
}

/*
 * apl_batch_abort: give up the open batch; nothing of it is ever published.
 * This is crash recovery (apl_store_recover) run in-process over the same
 * memory, sound for the same reasons, none of which needs a process to die:
 *  - nobody has seen the batch. Readers pin published versions only (<= G)
 *    and step over newer block versions through bh_prev; the change log is
 *    read only up to the published head. Undoing a location entry is one
 *    release store back to the newest version <= G.
 *  - a reader that loaded one of the batch's location entries before that
 *    store holds a pin <= G, so it follows bh_prev away from the batch's
 *    version; recovery retires that version at G + 1, so its slots stay
 *    intact until every pin has passed G + 1, after the next publish.
 *  - the slot free lists, the number list and the retire queue are rebuilt
 *    from shared memory alone (what each location entry reaches down to the
 *    oldest pin), so whatever the batch allocated, retired or half-wrote is
 *    accounted for, whichever step it failed at.
 *  - the log's head and serial go back to the published ones; its tail
 *    stays where the batch moved it (log_make_room publishes the tail before
 *    it overwrites anything).
 * What recovery cannot read from shared memory is reset here: the reserve
 * switch and the batch's source serial (apl_set_source). The cost is one
 * pass over the location table and the slots: an error path, not a hot one.
 */
int apl_batch_abort(apl_store *s, struct apl_recovery *r)
{
    if (!s->pending)
        return APL_EBATCH;
    s->use_reserve = 0;
    s->source_set = 0;
    return apl_store_recover(s, r);
}

int apl_store_stats(apl_store *s, struct apl_stats *st)
{
    memset(st, 0, sizeof(*st));
    apl_view *v = s->v;
    st->version = v->v_sb->sb_version;
    st->slots_total = v->v_seg_slots * v->v_nseg;
    st->slots_free = s->free_total;
    st->blocks_used = s->next_num - s->nfree_nums;
    st->max_blocks = v->v_max_blocks;
    st->retire_pending = s->rq_len;
    int busy;
    uint64_t active;
    uint64_t oldest = oldest_pin(s, &busy, &active);
    st->oldest_pin = active ? oldest : 0;
    st->readers_active = active;
    st->retained = s->retained;
    st->horizon = s->horizon;
    st->log_head = s->log_head;
    st->log_tail = s->log_tail;
    st->log_size = v->v_log_size;
    st->serial = s->serial;
    for (uint32_t i = 0; i < v->v_nseg; i++)
        st->seg_free[i] = s->nfree[i];
    if (s->bs)
        bs_stats(s, st);
    return APL_OK;
}
