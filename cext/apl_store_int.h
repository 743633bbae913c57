/*
 * apl_store_int.h — the writer's private state, shared by the two writer
 * files: apl_store.c (block chains) and apl_bstore.c (a secondary's lz4
 * backup blocks). Controller process only; one thread.
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

struct rec {
    uint64_t prefix;
    const uint8_t *k;
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
};

int retire_push(apl_store *s, uint32_t kind, apl_addr addr, uint32_t number, uint64_t at);

/* apl_bstore.c: a store whose blocks are lz4 images (sb_flags & APL_SB_COMPRESSED) */
int bs_open(apl_store *s);
void bs_free(apl_store *s);
int bs_recover(apl_store *s, struct apl_recovery *r);
int bs_put_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len);
int64_t bs_get_image(apl_store *s, uint32_t number, uint8_t *out, uint64_t cap);
void bs_release(apl_store *s, apl_addr a);
uint64_t bs_removed_at(apl_store *s, apl_addr a);
int bs_stats(apl_store *s, struct apl_stats *st);

#endif
