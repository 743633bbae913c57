/*
 * apl_locate.c — where a key lives: the block number of the leaf chain that
 * holds it, or would hold it, in a file at one version (apl_leaf_of). A
 * serving secondary's controller uses it to put records back in place when
 * batch mode rewinds to an earlier point (appliance/controller/batch.py):
 * the record goes into the chain its key belongs to, as the primary's
 * stream would put it, so the block numbers stay the primary's.
 *
 * Shared: block versions and the location table, written by the controller
 * alone; the caller names a version that stays allocated while it reads (the
 * controller's own published version, or a pinned one).
 */
#include "apl_int.h"

int64_t apl_leaf_of(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen, uint64_t version)
{
    int rc = view_enter(v);
    if (rc)
        return rc;
    int64_t out = APL_ECORRUPT;
    if (klen == 0 || klen > APL_MAX_KEY) {
        out = APL_EKEY;
    } else if (file >= v->v_nfiles) {
        out = APL_EFILE;
    } else {
        struct apl_bhdr *b = apl_descend(v, file, version ? version : LOAD_ACQ(&v->v_sb->sb_version),
                                         apl_prefix(key, klen), key, klen);
        if (b)
            out = b->bh_number;
    }
    view_exit();
    return out;
}
