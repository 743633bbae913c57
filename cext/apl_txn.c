/*
 * apl_txn.c — batches and whole transactions (the controller, one thread):
 * opening a batch, applying and logging one transaction in it
 * (apl_commit_txn: BEGIN with the T log, each step with its change entry and
 * the BLOCK images of structural changes, then COMMIT; or, when a step
 * fails, the undo from B images and CANCEL), publishing the batch, and the
 * appliance's epoch, serial and transaction numbers (apl_store_resume: where a
 * store rebuilt from durability files continues).
 *
 * A batch, and where each of its steps is done:
 *
 *   batch_begin          pending = G + 1                    (here)
 *   put / delete ...     copy-on-write of each chain the first time the batch
 *                        touches it (cow()); later changes in the same batch
 *                        edit the copy in place. Copies are stored into the
 *                        location table only once fully written (release).
 *                        (apl_tree.c, apl_chain.c)
 *   log_append ...       change-log entries of the batch's transactions
 *                        (apl_log.c)
 *   batch_publish        sb_pub[V & 1] = log bounds; sb_version = V (release)
 *                        (here)
 *   reclaim              free old versions once every pin has passed them
 *                        (apl_alloc.c)
 *
 * Publishing is the only step readers see: sb_pub[V & 1] is written first
 * (its pb_version zeroed, then set last), then sb_version = V (release), so
 * a reader that loads G finds the log bounds of G beside it
 * (apl_log_bounds checks pb_version == G).
 */

#define _GNU_SOURCE
#include <stdlib.h>

#include "apl_store_int.h"

/* ------------------------------------------------------------------ */
/* Batches                                                             */
/* ------------------------------------------------------------------ */

int apl_batch_begin(apl_store *s)
{
    if (s->pending)
        return APL_EINVAL;
    s->pending = s->v->v_sb->sb_version + 1;
    return APL_OK;
}

int apl_batch_publish(apl_store *s, uint64_t time_ns, uint64_t last_txn)
{
    if (!s->pending)
        return APL_EBATCH;
    struct apl_super *sb = s->v->v_sb;
    uint64_t v = s->pending;
    struct apl_pub *pb = &sb->sb_pub[v & 1];
    sums_publish(s);   /* the checksums of what the batch changed (apl_sums.c) */
    STORE_RLX(&pb->pb_version, 0);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    pb->pb_log_head = s->log_head;
    pb->pb_log_tail = s->log_tail;
    pb->pb_serial = s->serial;
    if (last_txn)
        pb->pb_txn = last_txn;
    else
        pb->pb_txn = sb->sb_pub[(v - 1) & 1].pb_txn;
    pb->pb_time_ns = time_ns;
    if (!s->source_set) {  /* carry the applied primary serial over (secondaries) */
        pb->pb_source_serial = sb->sb_pub[(v - 1) & 1].pb_source_serial;
        pb->pb_source_instance = sb->sb_pub[(v - 1) & 1].pb_source_instance;
    }
    s->source_set = 0;
    STORE_REL(&pb->pb_version, v);
    STORE_REL(&sb->sb_version, v);
    FENCE();
    s->pending = 0;
    return APL_OK;
}

void apl_store_set_epoch(apl_store *s, uint64_t epoch)
{
    s->epoch = epoch;
    STORE_REL(&s->v->v_sb->sb_epoch, epoch);
}

int apl_store_resume(apl_store *s, uint64_t serial, uint64_t txn_next)
{
    if (!s->pending)
        return APL_EBATCH;
    if (serial < s->serial)
        return APL_EINVAL;
    s->serial = serial;   /* published with the open batch (pb_serial); the next entry is serial + 1 */
    if (txn_next > s->v->v_sb->sb_txn_next)
        STORE_REL(&s->v->v_sb->sb_txn_next, txn_next);
    return APL_OK;
}

uint64_t apl_next_txn(apl_store *s)
{
    uint64_t t = s->v->v_sb->sb_txn_next;
    STORE_REL(&s->v->v_sb->sb_txn_next, t + 1);
    return t;
}

/* ------------------------------------------------------------------ */
/* Whole transactions                                                  */
/* ------------------------------------------------------------------ */

/* One step of apl_commit_txn's `ops` buffer (8-aligned records). */
struct txn_op {
    uint8_t op;        /* APL_TXN_INSERT / UPDATE / DELETE */
    uint8_t pad[3];
    uint32_t file;
    uint32_t klen;
    uint32_t vlen;
    /* key bytes, value bytes, padding to 8 */
};

/* What an applied step needs to be undone. */
struct undo_rec {
    uint8_t op;        /* the step that was applied */
    uint32_t file;
    const uint8_t *key;
    uint32_t klen;
    uint64_t old_off;  /* B image in the undo arena */
    uint32_t old_len;
};

static int log_op(apl_store *s, int kind, uint32_t file, const uint8_t *key, uint32_t klen,
                  const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                  uint64_t txn, uint64_t now)
{
    uint16_t flags = s->op.nstruct ? APL_CEF_STRUCT : 0;
    struct apl_opinfo info = s->op; /* log_block does not touch s->op, but keep a copy */
    int rc = apl_log_append(s, (uint16_t)kind, flags, file, info.block, info.offset, txn, now,
                            key, klen, a, alen, b, blen, 0);
    for (uint32_t i = 0; rc == APL_OK && i < info.nstruct; i++)
        rc = apl_log_block(s, info.structs[i], info.removed[i] ? APL_CEF_REMOVED : 0, txn, now, 0);
    return rc;
}

/* Apply one step and log it; the B image goes to *old (caller's buffer). */
static int apply_step(apl_store *s, uint8_t op, uint32_t file, const uint8_t *key, uint32_t klen,
                      const uint8_t *val, uint32_t vlen, uint8_t *old, uint64_t oldcap, int64_t *oldlen,
                      uint64_t txn, uint64_t now)
{
    int kind;
    if (op == APL_TXN_DELETE) {
        kind = apl_delete(s, file, key, klen, old, oldcap, oldlen);
        if (kind < 0)
            return kind;
        return log_op(s, APL_CE_DELETE, file, key, klen, 0, 0, old, (uint32_t)*oldlen, txn, now);
    }
    kind = apl_put(s, file, key, klen, val, vlen, op == APL_TXN_INSERT ? APL_PUT_INSERT : APL_PUT_UPDATE,
                   old, oldcap, oldlen);
    if (kind < 0)
        return kind;
    return log_op(s, kind, file, key, klen, val, vlen, old, *oldlen > 0 ? (uint32_t)*oldlen : 0, txn, now);
}

int apl_commit_txn(apl_store *s, uint64_t txn, uint64_t now, const uint8_t *tlog, uint32_t tlen,
                   const uint8_t *ops, uint64_t ops_len, uint64_t *commit_serial, int64_t *failed_at)
{
    if (!s->pending)
        return APL_EBATCH;
    *failed_at = -1;
    int rc = apl_log_append(s, APL_CE_BEGIN, 0, 0, 0, 0, txn, now, 0, 0, tlog, tlen, 0, 0, 0);
    if (rc)
        return rc;
    /* undo information: records + an arena of B images */
    uint64_t nsteps = 0, cap_steps = 16, arena_cap = 4096, arena_len = 0;
    struct undo_rec *steps = malloc(cap_steps * sizeof(*steps));
    uint8_t *arena = malloc(arena_cap);
    uint8_t *old = malloc(s->bsize);
    int64_t oldlen = -1;
    if (!steps || !arena || !old) {
        free(steps), free(arena), free(old);
        return APL_ENOMEM;
    }
    uint64_t pos = 0;
    int64_t index = 0;
    while (rc == APL_OK && pos + sizeof(struct txn_op) <= ops_len) {
        const struct txn_op *o = (const struct txn_op *)(ops + pos);
        uint64_t len = APL_ALIGN(sizeof(*o) + (uint64_t)o->klen + o->vlen, 8);
        if (pos + sizeof(*o) + o->klen + o->vlen > ops_len || o->op < APL_TXN_INSERT || o->op > APL_TXN_DELETE) {
            rc = APL_EINVAL;
            break;
        }
        const uint8_t *key = (const uint8_t *)(o + 1);
        rc = apply_step(s, o->op, o->file, key, o->klen, key + o->klen, o->vlen, old, s->bsize, &oldlen, txn, now);
        if (rc == APL_OK) {
            uint32_t ol = oldlen > 0 ? (uint32_t)oldlen : 0;
            if (nsteps == cap_steps) {
                struct undo_rec *ns = realloc(steps, (cap_steps *= 2) * sizeof(*steps));
                if (!ns) {
                    rc = APL_ENOMEM;
                    break;
                }
                steps = ns;
            }
            if (arena_len + ol > arena_cap) {
                while (arena_len + ol > arena_cap)
                    arena_cap *= 2;
                uint8_t *na = realloc(arena, arena_cap);
                if (!na) {
                    rc = APL_ENOMEM;
                    break;
                }
                arena = na;
            }
            memcpy(arena + arena_len, old, ol);
            steps[nsteps++] = (struct undo_rec){o->op, o->file, key, o->klen, arena_len, ol};
            arena_len += ol;
        }
        pos += len;
        index++;
    }
    if (rc == APL_OK && pos != ops_len)
        rc = APL_EINVAL;
    if (rc == APL_OK) {
        rc = apl_log_append(s, APL_CE_COMMIT, 0, 0, 0, 0, txn, now, 0, 0, 0, 0, 0, 0, commit_serial);
    } else {
        /* Undo what was applied, newest first, from the B images ([0122]);
         * every reversal is logged like a change, then CANCEL. */
        *failed_at = index;
        int urc = APL_OK;
        s->use_reserve++;
        for (uint64_t i = nsteps; urc == APL_OK && i-- > 0;) {
            struct undo_rec *u = &steps[i];
            const uint8_t *b = arena + u->old_off;
            if (u->op == APL_TXN_INSERT)
                urc = apply_step(s, APL_TXN_DELETE, u->file, u->key, u->klen, 0, 0, old, s->bsize, &oldlen, txn, now);
            else if (u->op == APL_TXN_DELETE)
                urc = apply_step(s, APL_TXN_INSERT, u->file, u->key, u->klen, b, u->old_len, old, s->bsize, &oldlen, txn, now);
            else
                urc = apply_step(s, APL_TXN_UPDATE, u->file, u->key, u->klen, b, u->old_len, old, s->bsize, &oldlen, txn, now);
        }
        s->use_reserve--;
        if (urc == APL_OK)
            urc = apl_log_append(s, APL_CE_CANCEL, 0, 0, 0, 0, txn, now, 0, 0, 0, 0, 0, 0, 0);
        if (urc != APL_OK)
            rc = APL_EUNDO;
    }
    free(steps);
    free(arena);
    free(old);
    return rc;
}
