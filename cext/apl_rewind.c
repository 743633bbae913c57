/*
 * apl_rewind.c — what a failover changes in the writer (the controller, one
 * thread): the change log of a promoted secondary, which continues the serials
 * of the primary it followed (apl_log_restart), and undoing the history an
 * appliance holds past a fork point — the transactions a new primary never
 * received — from their B logs (apl_undo_entries), as pg_rewind does, in memory.
 *
 * Why the undo is exact block for block ([0122]): two appliances hold the same
 * data exactly when every block number's image (apl_block_image: the records of
 * its chain) is equal. A record change names the block number whose chain holds
 * the record; its B log is the record's image before it. So undoing, newest
 * first, every record change past the fork gives back each chain's records as
 * they were at the fork — for chains whose structure did not change since.
 * A structural change (split, new overflow chain, removal) moves records
 * between numbers and is logged as BLOCK images of the result only; those
 * numbers (and any change whose B log was not kept) are not undone here but
 * named in `copy`, and the caller has them copied from the new primary
 * (apl_apply.c: a copy limited to those numbers), which carries their content
 * whole. Record counts (the meta blocks) are undone from the change kinds for
 * every change, copied or not: the meta blocks are never copied.
 *
 * Runs inside an open batch like any apply, so a failure rolls it back
 * (apl_batch_abort) and readers never see a half-undone state.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

int apl_log_restart(apl_store *s, uint64_t serial)
{
    if (!s->pending)
        return APL_EBATCH;
    /* what the ring holds belongs to another history: nothing of it may be
     * found by serial from now on */
    s->log_tail = s->log_head;
    s->serial = serial;
    return APL_OK;
}

static inline void mark(uint8_t *bits, uint64_t nbits, uint32_t n)
{
    if (n < nbits)
        bits[n >> 3] |= (uint8_t)(1u << (n & 7));
}

static inline int marked(const uint8_t *bits, uint64_t nbits, uint32_t n)
{
    return n >= nbits || (bits[n >> 3] & (1u << (n & 7)));
}

int apl_undo_entries(apl_store *s, const uint8_t *buf, uint64_t len, uint8_t *copy, uint64_t nbits,
                     uint64_t *txns)
{
    if (!s->pending)
        return APL_EBATCH;
    *txns = 0;
    /* first pass: framing, positions, and the numbers to copy instead */
    uint64_t n = 0, cap = 256;
    uint64_t *at = malloc(cap * sizeof(uint64_t));
    if (!at)
        return APL_ENOMEM;
    uint64_t p = 0;
    while (p + sizeof(struct apl_centry) <= len) {
        const struct apl_centry *e = (const struct apl_centry *)(buf + p);
        if (e->ce_len < sizeof(*e) || (e->ce_len & 7) || p + e->ce_len > len ||
            sizeof(*e) + (uint64_t)e->ce_klen + e->ce_alen + e->ce_blen > e->ce_len ||
            e->ce_kind < APL_CE_BEGIN || e->ce_kind > APL_CE_BLOCK) {
            free(at);
            return APL_ECORRUPT;
        }
        if (e->ce_kind == APL_CE_BLOCK || (e->ce_flags & APL_CEF_STRUCT) ||
            ((e->ce_kind == APL_CE_UPDATE || e->ce_kind == APL_CE_DELETE) && (e->ce_flags & APL_CEF_NO_B)))
            mark(copy, nbits, e->ce_block);
        if (e->ce_kind == APL_CE_COMMIT)
            (*txns)++;
        if (n == cap) {
            uint64_t *na = realloc(at, (cap *= 2) * sizeof(uint64_t));
            if (!na) {
                free(at);
                return APL_ENOMEM;
            }
            at = na;
        }
        at[n++] = p;
        p += e->ce_len;
    }
    if (p != len) {
        free(at);
        return APL_ECORRUPT;
    }
    /* second pass, newest first: each change's inverse */
    int rc = APL_OK;
    for (uint64_t i = n; rc == APL_OK && i-- > 0;) {
        const struct apl_centry *e = (const struct apl_centry *)(buf + at[i]);
        const uint8_t *key = (const uint8_t *)(e + 1);
        const uint8_t *b = key + e->ce_klen + e->ce_alen;
        switch (e->ce_kind) {
        case APL_CE_INSERT:
            rc = count_add(s, e->ce_file, -1, 0, 0);
            if (rc == APL_OK && !marked(copy, nbits, e->ce_block))
                rc = apply_record(s, e->ce_block, APL_CE_DELETE, key, e->ce_klen, 0, 0, 0);
            break;
        case APL_CE_DELETE:
            rc = count_add(s, e->ce_file, 1, 0, 0);
            if (rc == APL_OK && !marked(copy, nbits, e->ce_block))
                rc = apply_record(s, e->ce_block, APL_CE_INSERT, key, e->ce_klen, b, e->ce_blen, 0);
            break;
        case APL_CE_UPDATE:
            if (!marked(copy, nbits, e->ce_block))
                rc = apply_record(s, e->ce_block, APL_CE_UPDATE, key, e->ce_klen, b, e->ce_blen, 0);
            break;
        default:   /* BEGIN, COMMIT, CANCEL: no data; BLOCK: copied */
            break;
        }
    }
    free(at);
    return rc;
}
