/*
 * apl_format.c — the shape of fresh segments: the geometry of a
 * configuration (apl_geometry: how big each segment is and where each region
 * of meta lies), formatting the meta, readers and device segments, checking
 * a mapped segment against the identity and geometry it must have, and this
 * build's format number. No state of its own; the layout itself is defined
 * in apl_layout.h. The magic number of a region is stored last (release), so
 * a half-formatted segment is not an appliance segment.
 */
#include "apl_int.h"

uint32_t apl_format_number(void) { return APL_FORMAT; }

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
    g->sums_off = APL_ALIGN(g->loc_off + g->max_blocks * sizeof(apl_addr), APL_PAGE);
    g->log_off = APL_ALIGN(g->sums_off + g->max_blocks * sizeof(uint64_t), APL_PAGE);
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
    memset(meta + g->sums_off, 0, g->max_blocks * sizeof(uint64_t));
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
    sb->sb_sums_off = g->sums_off;
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
        sb->sb_loc_off + sb->sb_max_blocks * sizeof(apl_addr) > sb->sb_sums_off ||
        sb->sb_sums_off + sb->sb_max_blocks * sizeof(uint64_t) > sb->sb_log_off ||
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
