/*
 * apl_acks.c — the acknowledgements a primary's agent stores for its
 * controller (format, and why no wake-up is lost: apl_layout.h, struct
 * apl_acks). The agent writes ak_acked, the controller ak_want; each side
 * fences between its store and its load of the other's field.
 */
#include <string.h>

#include "apl_int.h"

void apl_acks_init(struct apl_acks *a, uint64_t instance, uint32_t count)
{
    memset(a, 0, sizeof *a);
    a->ak_instance = instance;
    a->ak_count = count < APL_MAX_SECONDARIES ? count : APL_MAX_SECONDARIES;
    a->ak_format = APL_FORMAT;
    STORE_REL(&a->ak_magic, APL_MAGIC_ACKS);
}

int apl_acks_post(struct apl_acks *a, uint32_t i, uint64_t serial)
{
    if (i >= a->ak_count || serial <= LOAD_ACQ(&a->ak_acked[i]))
        return 0;                        /* only the agent writes it: no race on the raise */
    STORE_REL(&a->ak_acked[i], serial);
    FENCE();                             /* the store before the load of ak_want (Dekker) */
    uint64_t want = LOAD_ACQ(&a->ak_want);
    return want && serial >= want;
}

void apl_acks_want(struct apl_acks *a, uint64_t serial, uint64_t *out)
{
    STORE_REL(&a->ak_want, serial);
    FENCE();                             /* the store before the loads of ak_acked (Dekker) */
    for (uint32_t i = 0; i < a->ak_count; i++)
        out[i] = LOAD_ACQ(&a->ak_acked[i]);
}
