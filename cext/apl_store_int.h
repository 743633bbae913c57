/*
 * apl_store_int.h — the writer's private state and the functions its files
 * share: apl_txn.c (batches and transactions), apl_tree.c (the primary's
 * trees), apl_chain.c (one block chain), apl_alloc.c (allocation,
 * reclamation, recovery), apl_log.c (the change log), apl_apply.c (a
 * secondary's apply), apl_rewind.c (failover: the log a promoted secondary
 * continues, undoing a history past a fork), apl_sums.c (block checksums)
 * and apl_bstore.c (a secondary's lz4 backup blocks).
 *
 * Only the controller process calls anything in these files, from one
 * thread, so the allocator, the retire queue and the batch state are plain
 * process memory. What other processes see is the shared memory this code
 * writes, under the protocol described in apl_layout.h (the steps of a
 * batch: apl_txn.c).
 */
#ifndef APL_STORE_INT_H
#define APL_STORE_INT_H

#include "apl_int.h"

struct bstore;

enum { RT_CHAIN = 1, RT_NUMBER = 2, RT_OBJECT = 3 };

struct retire {
    uint64_t at;       /* reclaimable once every pin is >= at */
    apl_addr addr;     /* RT_CHAIN: head of the chain version to free */
    uint32_t number;   /* RT_NUMBER: block number to free (with its last chain) */
    uint32_t kind;
    uint32_t slots;    /* RT_CHAIN / RT_OBJECT: slots (objects) it holds, counted in `retained` */
};

/* One record (or separator) on its way into a block: its key as the slot
 * and the heap hold it, the first 8 bytes in `prefix` and the rest at `ks`
 * (apl_int.h: APL_KSFX). */
struct rec {
    uint64_t prefix;
    const uint8_t *ks;
    const uint8_t *val;
    uint32_t klen;
    uint32_t vlen;     /* leaf: value bytes; inner: 0 */
    uint32_t aux;      /* leaf: vlen; inner: child number */
};

struct wpath {
    int depth;                      /* inner levels above the leaf chain */
    uint32_t num[APL_MAX_HEIGHT];   /* inner block numbers from the root down */
    uint32_t idx[APL_MAX_HEIGHT];   /* child index taken in each */
    uint32_t leaf;                  /* leaf chain number */
    int rightmost;                  /* every index taken was the last one */
};

struct apl_store {
    apl_view *v;
    uint64_t pending;               /* version being built; 0 when no batch is open */
    uint32_t bsize;
    uint32_t maxb;                  /* blocks allowed in a chain: 1 + max_overflow */
    /* block slots: one stack of free slot indices per segment */
    uint32_t *free_slots[APL_MAX_SEGMENTS];
    uint64_t nfree[APL_MAX_SEGMENTS];
    uint32_t next_seg;
    uint64_t free_total;
    uint64_t reserve;
    int use_reserve;
    /* block numbers */
    uint32_t *free_nums;
    uint64_t nfree_nums;
    uint64_t next_num;              /* numbers >= this were never used */
    /* retire queue, ordered by `at` (a ring) */
    struct retire *rq;
    uint64_t rq_head, rq_len, rq_cap;
    uint64_t retained;              /* slots (objects) its RT_CHAIN / RT_OBJECT entries hold */
    /* readers: the writer's own high-water mark of slots (never lowered by
     * rh_high, which clients can write) and the horizon it published */
    uint32_t rhigh;
    uint64_t horizon;
    /* the last operation */
    struct apl_opinfo op;
    /* scratch for rewrites */
    uint8_t *scratch;
    uint64_t scratch_cap;
    struct rec *recs;
    uint64_t recs_cap;
    /* change log writer */
    uint64_t log_head, log_tail, serial, epoch;
    uint64_t max_record;            /* slot + key + value bytes a leaf record may take */
    int source_set;                 /* apl_set_source called for the open batch */
    struct bstore *bs;              /* lz4 backup blocks (a secondary that serves no reads), or NULL */
    uint64_t max_key;
    /* block checksums (apl_sums.c): the table in meta, and the numbers the
     * open batch gave a new version (each once: dirty_bits) */
    uint64_t *sums;
    uint32_t *dirty;
    uint64_t ndirty, dirty_cap;
    uint8_t *dirty_bits;
    int sums_lost;                  /* the list could not grow: the next publish recomputes all */
    int replacing;                  /* apl_apply_image: a whole new content, the old one may be damaged */
    uint32_t prefer_seg;            /* 1 + the segment alloc_slot takes from first (0: round-robin) */
};

/* ---- small helpers of every writer file ---- */

/* A location entry without APL_ADDR_OFF (the writer's bookkeeping reads
 * a detached device's blocks: their memory is intact until it is renewed). */
static inline apl_addr apl_loc_raw(apl_addr a)
{
    return a == APL_ADDR_NONE ? a : a & ~APL_ADDR_OFF;
}

static inline int apl_loc_off(apl_addr a)
{
    return a != APL_ADDR_NONE && (a & APL_ADDR_OFF);
}

static inline int seg_detached(const apl_store *s, uint32_t seg)
{
    return (int)((s->v->v_sb->sb_detached >> seg) & 1);
}

static inline struct apl_bhdr *head_of(apl_store *s, uint32_t number)
{
    apl_addr a = s->v->v_loc[number];
    return a == APL_ADDR_NONE ? 0 : apl_ptr(s->v, a);
}

static inline struct apl_bhdr *next_of(apl_store *s, const struct apl_bhdr *b)
{
    return b->bh_next == APL_ADDR_NONE ? 0 : apl_ptr(s->v, b->bh_next);
}

static inline apl_addr addr_of(apl_store *s, const struct apl_bhdr *b)
{
    const uint8_t *p = (const uint8_t *)b;
    for (uint32_t i = 0; i < s->v->v_nseg; i++) {
        const uint8_t *base = s->v->v_seg[i];
        if (base && p >= base + s->bsize && p < base + (s->v->v_seg_slots + 1) * (uint64_t)s->bsize)
            return APL_ADDR(i, (uint64_t)(p - base) / s->bsize - 1);
    }
    return APL_ADDR_NONE;
}

/* Make r's key its own: its suffix copied to buf (APL_MAX_KEY bytes), so it
 * stays valid when the scratch or the block it pointed into is rewritten. */
static inline void rec_own_key(struct rec *r, uint8_t *buf)
{
    memcpy(buf, r->ks, APL_KSFX(r->klen));
    r->ks = buf;
}

static inline uint32_t rec_bytes(const struct rec *r)
{
    return SLOT_SIZE + APL_KSFX(r->klen) + r->vlen;
}

/* rec_bytes of a leaf's record from its slot alone (sl_aux: the value length). */
static inline uint32_t slot_bytes(const struct apl_slot *sl)
{
    return SLOT_SIZE + APL_KSFX(sl->sl_klen) + sl->sl_aux;
}

static inline uint32_t blk_room(const struct apl_bhdr *b)
{
    return (uint32_t)b->bh_upper - b->bh_lower;
}

/* ---- block checksums (apl_sums.c) ---- */
APL_INTERNAL int sums_dirty_grow(apl_store *s);
/* The number's current version changed in the open batch (or was rolled back):
 * its checksum is computed again when the batch is published. */
static inline void sums_dirty(apl_store *s, uint32_t n)
{
    if (s->dirty_bits[n >> 3] & (1u << (n & 7)))
        return;
    if (s->ndirty == s->dirty_cap && sums_dirty_grow(s)) {
        s->sums_lost = 1;
        return;
    }
    s->dirty_bits[n >> 3] |= (uint8_t)(1u << (n & 7));
    s->dirty[s->ndirty++] = n;
}
/* Store a number's new current version into the location table (release:
 * readers find it complete) and mark its checksum for the publish. */
static inline void loc_publish(apl_store *s, uint32_t number, apl_addr a)
{
    STORE_REL(&s->v->v_loc[number], a);
    sums_dirty(s, number);
}
/* Mark again the numbers with a block on a detached device (recovery rebuilt
 * the location table from the chains: apl_devices.c). */
APL_INTERNAL void devices_retag(apl_store *s);
/* The checksum of a number's current version (0: not in use). */
APL_INTERNAL uint64_t sum_of(const apl_store *s, uint32_t number);
/* Compute the checksums of the marked numbers (sums_publish: at every
 * publish; sums_flush: after recovery rolled numbers back). */
APL_INTERNAL void sums_publish(apl_store *s);
APL_INTERNAL void sums_flush(apl_store *s);
/* An lz4 backup object's checksum (header but bo_retired, compressed bytes). */
APL_INTERNAL uint64_t obj_sum(const struct apl_bobj *o, uint64_t h);

/* ---- allocation and the retire queue (apl_alloc.c) ---- */
/* Free slots allocation may take (the reserve only while it is switched on). */
APL_INTERNAL uint64_t avail_slots(apl_store *s);
APL_INTERNAL uint64_t avail_nums(apl_store *s);
APL_INTERNAL apl_addr alloc_slot(apl_store *s);
APL_INTERNAL void free_slot(apl_store *s, apl_addr a);
APL_INTERNAL uint32_t alloc_number(apl_store *s);
APL_INTERNAL int retire_push(apl_store *s, uint32_t kind, apl_addr addr, uint32_t number, uint64_t at);

/* ---- one block chain (apl_chain.c) ---- */
APL_INTERNAL uint32_t chain_len(apl_store *s, struct apl_bhdr *h);
APL_INTERNAL void blk_reset(apl_store *s, struct apl_bhdr *b);
APL_INTERNAL void blk_init(apl_store *s, struct apl_bhdr *b, uint32_t magic, uint32_t number,
                           uint32_t file, uint16_t level);
APL_INTERNAL void blk_append(struct apl_bhdr *b, const struct rec *r);
APL_INTERNAL int blk_insert(apl_store *s, struct apl_bhdr *b, uint32_t idx, const struct rec *r);
APL_INTERNAL void blk_remove(apl_store *s, struct apl_bhdr *b, uint32_t idx);
APL_INTERNAL void blk_copy(apl_store *s, struct apl_bhdr *dst, const struct apl_bhdr *src);
APL_INTERNAL struct apl_bhdr *cow(apl_store *s, uint32_t number, int *err);
APL_INTERNAL uint64_t gather(apl_store *s, struct apl_bhdr *h, uint64_t *total);
APL_INTERNAL uint64_t gather_at(apl_store *s, struct apl_bhdr *h, uint32_t at, struct rec *out, uint64_t *total);
APL_INTERNAL uint64_t gather_with(apl_store *s, struct apl_bhdr *h, uint32_t cur_nb, uint64_t p,
                                  const uint8_t *key, uint32_t klen, const uint8_t *val, uint32_t vlen,
                                  int eq, uint64_t *total);
APL_INTERNAL void write_chain(apl_store *s, struct apl_bhdr *head, uint64_t a, const uint64_t *bounds,
                              uint32_t nb, const apl_addr *ovfl);

/* apl_apply.c: one record change in the chain of a block number (never a split;
 * kind APL_CE_DELETE removes, any other upserts), and a file's record count
 * (skipped while `copied` says its meta block is not copied yet); apl_rewind.c
 * uses both to undo */
APL_INTERNAL int apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
                              const uint8_t *val, uint32_t vlen, int delta);
APL_INTERNAL int count_add(apl_store *s, uint32_t file, int64_t delta, const uint8_t *copied, uint64_t nbits);

/* apl_bstore.c: a store whose blocks are lz4 images (sb_flags & APL_SB_COMPRESSED) */
APL_INTERNAL int bs_open(apl_store *s);
APL_INTERNAL void bs_free(apl_store *s);
APL_INTERNAL int bs_recover(apl_store *s, struct apl_recovery *r);
APL_INTERNAL int bs_put_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len);
APL_INTERNAL int64_t bs_get_image(apl_store *s, uint32_t number, uint8_t *out, uint64_t cap);
APL_INTERNAL void bs_release(apl_store *s, apl_addr a);
APL_INTERNAL uint64_t bs_removed_at(apl_store *s, apl_addr a);
/* the checksum of the object at `a`, and the file its image belongs to */
APL_INTERNAL uint64_t bs_sum(const apl_store *s, apl_addr a);
APL_INTERNAL uint32_t bs_file_of(const apl_store *s, apl_addr a);
APL_INTERNAL int bs_stats(apl_store *s, struct apl_stats *st);
/* apply_record / count_add for a compressed store (apl_apply.c dispatches) */
APL_INTERNAL int bs_apply_record(apl_store *s, uint32_t number, int kind, const uint8_t *key, uint32_t klen,
                                 const uint8_t *val, uint32_t vlen, int delta);
APL_INTERNAL int bs_count_add(apl_store *s, uint32_t meta, int64_t delta);

#endif
