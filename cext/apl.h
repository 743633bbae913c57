/*
 * apl.h — the C helpers' API, as Python sees it through cffi (cext/build.py).
 *
 * Reader side (any process that maps the segments): apl_view_*, apl_get*,
 * apl_scan, apl_find, apl_count, apl_snap_*, apl_block_image; the same reads
 * as CPython types (RecordCodec, TableReader: apl_py_install).
 * Writer side (the controller only): apl_store_*, apl_batch_*, apl_put,
 * apl_delete, apl_log_*, apl_reclaim, apl_sweep_readers.
 * Every function returns APL_OK (0) or a negative APL_* code (apl_errors.h),
 * unless it says it returns a length or count (then >= 0 on success).
 */
#ifndef APL_H
#define APL_H

#include "apl_layout.h"
#include "apl_errors.h"

uint32_t apl_format_number(void);

/* ---- geometry: how big each segment must be for a configuration ---- */
struct apl_geometry {
    /* inputs */
    uint32_t block_size;
    uint32_t nsegments;
    uint64_t segment_size;   /* bytes per device segment, including its header */
    uint32_t nfiles;
    uint32_t max_overflow;
    uint32_t nreaders;
    uint64_t log_size;
    uint32_t compressed;     /* 1: devices hold lz4 backup blocks (a secondary that serves no reads) */
    uint64_t max_blocks_in;  /* compressed: location table capacity (block numbers) */
    uint64_t layout_len;     /* bytes of the layout description kept in meta (sb_layout_*) */
    /* outputs */
    uint64_t segment_slots;
    uint64_t max_blocks;
    uint64_t files_off;
    uint64_t layout_off;
    uint64_t rown_off;
    uint64_t loc_off;
    uint64_t sums_off;
    uint64_t log_off;
    uint64_t meta_size;
    uint64_t readers_size;
    uint32_t page_size;      /* compressed: bytes per device page */
};
int apl_geometry(struct apl_geometry *g);
int apl_format_meta(uint8_t *meta, const struct apl_geometry *g, uint64_t instance,
                    uint64_t schema_hash, uint64_t now_ns);
int apl_format_readers(uint8_t *mem, const struct apl_geometry *g, uint64_t instance);
int apl_format_device(uint8_t *mem, const struct apl_geometry *g, uint64_t instance, uint32_t index);
/* Check a meta/readers/device region against the expected identity. */
int apl_check_meta(const uint8_t *meta, uint64_t size);
int apl_check_readers(const uint8_t *mem, uint64_t size, uint64_t instance);
int apl_check_device(const uint8_t *mem, uint64_t size, uint64_t instance, uint32_t index);

/* ---- views ---- */
typedef struct apl_view {
    uint64_t v_id;                 /* process-unique id, never reused */
    uint8_t *v_meta;
    struct apl_super *v_sb;
    struct apl_file *v_files;
    uint64_t *v_loc;
    uint8_t *v_log;
    uint64_t v_log_size;
    uint64_t v_max_blocks;
    struct apl_rhdr *v_rhdr;
    struct apl_reader *v_readers;
    struct apl_rown *v_rown;       /* the owners the controller verified (meta) */
    uint32_t v_nreaders;
    uint32_t v_nfiles;
    uint32_t v_bsize;
    uint32_t v_nseg;
    uint32_t v_flags;              /* sb_flags: APL_SB_COMPRESSED */
    uint64_t v_seg_slots;
    volatile uint32_t v_closed;    /* set by apl_view_close: reads fail with APL_ECLOSED */
    uint8_t *v_seg[APL_MAX_SEGMENTS];
} apl_view;

int apl_view_open(apl_view *v, uint8_t *meta, uint64_t meta_size,
                  uint8_t *readers, uint64_t readers_size,
                  uint8_t **segs, uint32_t nsegs, uint64_t seg_size);
/* Close a view: reads that start from now on fail with APL_ECLOSED; waits
 * for the reads other threads are inside, then releases every reader slot
 * this process holds in it. The segments may be unmapped once it returns. */
void apl_view_close(apl_view *v);
/* Re-point device segment `index` (device replacement). */
int apl_view_set_segment(apl_view *v, uint32_t index, uint8_t *mem);

uint64_t apl_committed(apl_view *v);

/*
 * Reads. version = 0 reads the latest committed version under a per-call pin
 * taken from the calling thread's reader slot; a non-zero version reads that
 * version (the caller holds it pinned, see apl_snap_open). Every read fails
 * with APL_ESNAPSHOT when its version was freed meanwhile (sb_horizon passed
 * it: the pin was wiped), and with APL_ECLOSED on a closed view.
 * apl_get* copy the value into out and return its length; APL_NOTFOUND when
 * there is no such key; APL_EBUFSIZE when cap is too small (the length needed
 * is then stored in the first 8 bytes of out, so cap must be >= 8).
 */
int64_t apl_get(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen,
                uint64_t version, uint8_t *out, uint64_t cap);
int64_t apl_get_i64(apl_view *v, uint32_t file, int64_t key,
                    uint64_t version, uint8_t *out, uint64_t cap);

/* What apl_scan writes for each record. */
#define APL_SCAN_VALUES 1u   /* [u32 length][value bytes] per record */
#define APL_SCAN_KEYS   2u   /* [u16 length][encoded key] per record */
/* A scan reads [lo, hi) (lo exclusive when lo_incl is 0; hilen = APL_NO_BOUND
 * means no upper bound; lolen = 0 with lo_incl starts at the first record).
 * It writes as many whole records as fit, sets *count, and stores the last key
 * it wrote in resume (cap APL_MAX_KEY) so the next call continues after it.
 * Returns bytes written; *more is 1 when records remain. */
#define APL_NO_BOUND 0xFFFFFFFFu
int64_t apl_scan(apl_view *v, uint32_t file,
                 const uint8_t *lo, uint32_t lolen, int lo_incl,
                 const uint8_t *hi, uint32_t hilen,
                 uint64_t version, uint32_t what, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more);
/* Every record of primary file `table` whose alternate key in index file
 * `index` equals the encoded value `prefix` (the index keys are prefix+pk).
 * Values as APL_SCAN_VALUES writes them, in primary-key order; same
 * continuation contract. */
int64_t apl_find(apl_view *v, uint32_t index, uint32_t table,
                 const uint8_t *prefix, uint32_t plen,
                 const uint8_t *after, uint32_t afterlen,
                 uint64_t version, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more);
/* Records in a file at a version (0 = latest). */
int64_t apl_count(apl_view *v, uint32_t file, uint64_t version);

/* Long-lived snapshot pins: each takes its own reader slot; *gen is the
 * claim's token, which close checks (the slot may have been taken since). */
int apl_snap_open(apl_view *v, uint32_t *slot, uint64_t *gen, uint64_t *version);
int apl_snap_close(apl_view *v, uint32_t slot, uint64_t gen);
/* A process's start time (clock ticks after boot, /proc/<pid>/stat field 22),
 * 0 when it cannot be read; with the pid it names one process, not a reused pid. */
uint64_t apl_pid_start(uint32_t pid);

/*
 * A block's logical content at a version: for a primary block, its whole
 * overflow chain as one unit ([0090]). Format (little-endian):
 *   u32 number, u32 kind (bh_magic of the primary), u32 file, u16 level,
 *   u16 reserved, u32 nrecords, then per record u16 klen, u32 aux, key bytes,
 *   and for a leaf aux value bytes (aux = child block number in an inner block;
 *   a meta block has no records and carries u64 count instead).
 * Returns its length. Two appliances hold the same data exactly when these
 * images are equal block for block.
 */
int64_t apl_block_image(apl_view *v, uint32_t number, uint64_t version,
                        uint8_t *out, uint64_t cap);
/* 64-bit checksum of the block image (0 when the number is not in use). */
int apl_block_checksum(apl_view *v, uint32_t number, uint64_t version, uint64_t *sum);
/* Highest block number in use + 1 (for iterating block numbers). */
uint64_t apl_block_limit(apl_view *v);
/* The block number of the leaf chain that holds `key` in `file` at
 * `version` (where it is, or would go); apl_locate.c. */
int64_t apl_leaf_of(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen, uint64_t version);
/* Entries back to back outside the ring (apl_scan.c): the byte offset where
 * a restore plan may start reading them — the last COMMIT, CANCEL or PAD
 * entry before the first COMMIT after the target (serial, or with `by_time`
 * time_ns), or the last one in `buf` when none comes after it; 0 when there
 * is none — and, in `last_serial`, the serial of the last whole entry (0:
 * none). */
int64_t apl_entries_start(const uint8_t *buf, uint64_t len, uint64_t serial, uint64_t time_ns, int by_time,
                          uint64_t *last_serial);

/* Primary blocks by the length of their chain (the block and its overflow
 * blocks, bh_chain) at the latest committed version, pinned for the walk:
 * hist[i] counts the chains of i + 1 blocks, hist[nbuckets - 1] those of
 * nbuckets blocks or more. An lz4 backup store (no chains) leaves every bucket
 * 0. Costs one location-table walk: for metrics, not for a hot path. */
int apl_chain_lengths(apl_view *v, uint64_t *hist, uint32_t nbuckets);

/* ---- the writer (controller only) ---- */
typedef struct apl_store apl_store;

struct apl_recovery {
    uint64_t rolled_back;     /* block versions newer than G undone */
    uint64_t versions_kept;   /* old versions still pinned by readers */
    uint64_t blocks_live;     /* block numbers in use */
    uint64_t slots_used;      /* block slots in use */
    uint64_t readers_cleared; /* dead readers' slots released */
    uint64_t log_head;        /* change-log head after recovery */
};
struct apl_opinfo {
    uint32_t block;           /* primary block number of the chain holding the record */
    uint32_t offset;          /* record offset in that chain */
    uint32_t nstruct;         /* blocks whose structure changed (log them as BLOCK) */
    uint32_t structs[64];
    uint8_t  removed[64];     /* 1 when that block number was removed */
};
struct apl_stats {
    uint64_t version;
    uint64_t slots_total;
    uint64_t slots_free;
    uint64_t blocks_used;     /* block numbers in use */
    uint64_t max_blocks;
    uint64_t retire_pending;  /* old versions waiting for readers */
    uint64_t oldest_pin;      /* smallest pinned version, 0 when none */
    uint64_t readers_active;
    uint64_t log_head;
    uint64_t log_tail;
    uint64_t log_size;
    uint64_t serial;
    uint64_t retained;        /* slots (compressed: objects) held by old versions for readers */
    uint64_t horizon;         /* sb_horizon: pins below it read nothing */
    uint64_t bytes_used;      /* compressed store: bytes of pages in use */
    uint64_t bytes_live;      /* compressed store: bytes of live objects */
    uint64_t seg_free[APL_MAX_SEGMENTS];
};

#define APL_PUT_INSERT 1u  /* fail with APL_EXISTS if the key exists */
#define APL_PUT_UPDATE 2u  /* fail with APL_NOTFOUND unless it exists */
#define APL_PUT_UPSERT 3u

apl_store *apl_store_new(apl_view *v, uint64_t reserve_slots);
void apl_store_free(apl_store *s);
int apl_store_recover(apl_store *s, struct apl_recovery *r);
/* Create a file's root and meta blocks (inside a batch; at format time). */
int apl_store_create_file(apl_store *s, uint32_t id, const char *name, uint32_t kind, uint32_t table);
/* Allow allocation from the reserve (undo of a failed transaction). */
void apl_store_use_reserve(apl_store *s, int on);

int apl_batch_begin(apl_store *s);
int apl_put(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
            const uint8_t *val, uint32_t vlen, uint32_t mode,
            uint8_t *old, uint64_t oldcap, int64_t *oldlen);
int apl_delete(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
               uint8_t *old, uint64_t oldcap, int64_t *oldlen);
int apl_op_info(apl_store *s, struct apl_opinfo *info);
/* Append one change-log entry in the open batch; *serial gets its serial. */
int apl_log_append(apl_store *s, uint16_t kind, uint16_t flags, uint32_t file,
                   uint32_t block, uint32_t offset, uint64_t txn, uint64_t time_ns,
                   const uint8_t *key, uint32_t klen, const uint8_t *a, uint32_t alen,
                   const uint8_t *b, uint32_t blen, uint64_t *serial);
/* Append a BLOCK entry with the image of `number` as it stands in the batch. */
int apl_log_block(apl_store *s, uint32_t number, uint16_t flags, uint64_t txn,
                  uint64_t time_ns, uint64_t *serial);
/*
 * Apply and log one whole transaction inside the open batch: BEGIN (T log),
 * then each step of `ops` (records of struct {u8 op; u8 pad[3]; u32 file;
 * u32 klen; u32 vlen;} followed by key and value bytes, 8-aligned; op is
 * APL_TXN_INSERT / UPDATE / DELETE) with its change entry (A and B images)
 * and BLOCK images of structural changes, then COMMIT (*commit_serial).
 * If a step fails, the steps already applied are undone from their B images
 * (each reversal logged), CANCEL is logged, *failed_at is the failing step
 * and its error is returned. APL_EUNDO: the undo itself failed and the batch
 * must not be published.
 */
#define APL_TXN_INSERT 1u
#define APL_TXN_UPDATE 2u
#define APL_TXN_DELETE 3u
int apl_commit_txn(apl_store *s, uint64_t txn, uint64_t now, const uint8_t *tlog, uint32_t tlen,
                   const uint8_t *ops, uint64_t ops_len, uint64_t *commit_serial, int64_t *failed_at);
int apl_batch_publish(apl_store *s, uint64_t time_ns, uint64_t last_txn);
/* Roll back the open batch (a failed apply): every change it made is undone,
 * nothing of it is published, the writer's state is rebuilt as at start-up
 * recovery (facts in *r). APL_EBATCH when no batch is open. */
int apl_batch_abort(apl_store *s, struct apl_recovery *r);
/* Free what no reader can reach any more; returns slots freed (>= 0). */
int64_t apl_reclaim(apl_store *s);
/* Release slots of processes that no longer exist (kill(pid, 0) fails with
 * ESRCH, or the pid now names a process with another start time); returns
 * slots released. */
int64_t apl_sweep_readers(apl_store *s);
/* One reader slot in use, as apl_readers_list reports it. */
struct apl_slotinfo {
    uint32_t slot;
    uint32_t pid;
    uint64_t start;
    uint64_t gen;
    uint64_t pin;
    uint64_t since_ns;
    uint32_t kind;
    uint32_t owned;           /* 1 when apl_reader_own recorded this pid and start */
};
/* Every slot in use (all rh_nslots, whatever rh_high says); the writer's own
 * high-water mark learns from it. Returns how many were written to out. */
int64_t apl_readers_list(apl_store *s, struct apl_slotinfo *out, uint32_t cap);
/* Record that a connected session verified (pid, start) as the slot's owner. */
int apl_reader_own(apl_store *s, uint32_t slot, uint32_t pid, uint64_t start);
/* Clear slot `slot` if it still holds (pid, gen); returns 1 when cleared. */
int apl_reader_clear(apl_store *s, uint32_t slot, uint32_t pid, uint64_t gen);
int apl_store_stats(apl_store *s, struct apl_stats *st);
void apl_store_set_epoch(apl_store *s, uint64_t epoch);
/* A store rebuilt from durability files (a cold start): inside the open batch,
 * its change-log serial continues after `serial` and transaction numbers from
 * at least `txn_next`. APL_EINVAL if `serial` is below the store's own. */
int apl_store_resume(apl_store *s, uint64_t serial, uint64_t txn_next);
uint64_t apl_next_txn(apl_store *s);

/* ---- change-log reading (agent, recovery tools) ---- */
/* Copy the entry at log position *pos into out; advance *pos past it (and past
 * PAD space). Returns its length, 0 when *pos is at the published head, or
 * APL_ELOGFULL when the entry at *pos was overwritten (position < tail). */
int64_t apl_log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap);
/* The first entry of `kind` at or after *pos, among at most max_entries:
 * its header into *out, its position into *pos (1); 0 when there is none
 * (*pos: where the search stopped); APL_ELOGFULL when *pos was overwritten.
 * Reads headers only. */
int64_t apl_log_find(apl_view *v, uint64_t *pos, uint16_t kind, uint64_t max_entries, struct apl_centry *out);
#define APL_EXPORT_DELTA 1u
#define APL_EXPORT_NO_B  2u
int64_t apl_log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                       uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count);
int apl_log_seek(apl_view *v, uint64_t serial, uint64_t *pos);

/* ---- a secondary applying a primary's stream (apl_apply.c) ---- */
/* Apply entries (as exported by apl_log_export) after `after_serial`, only
 * whole transactions: *consumed = bytes up to the end of the last COMMIT or
 * CANCEL; *last_serial / *last_commit = its serial. `copied`, when not NULL,
 * is a bitmap of block numbers already copied (first copy in progress):
 * changes to other blocks are dropped, the copy will carry them ([0130]). */
int apl_apply_entries(apl_store *s, const uint8_t *buf, uint64_t len, uint64_t after_serial,
                      const uint8_t *copied, uint64_t nbits, uint64_t *consumed,
                      uint64_t *last_serial, uint64_t *last_commit);
/* Replace block `number` with an image (apl_block_image format); img NULL or
 * len 0 removes the number. */
int apl_apply_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len);
/* A copy: block images in batches (apl_read.c), applied in batches. */
int64_t apl_block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                         uint8_t *out, uint64_t cap, uint32_t *next);
/* The same records for the block numbers numbers[0, count); *next: the index
 * to continue from. */
int64_t apl_block_images_of(apl_view *v, const uint32_t *numbers, uint32_t count, uint64_t version,
                            uint8_t *out, uint64_t cap, uint32_t *next);
int apl_apply_images(apl_store *s, const uint8_t *buf, uint64_t len, uint8_t *copied, uint64_t nbits);
int64_t apl_drop_uncopied(apl_store *s, const uint8_t *copied, uint64_t nbits);
/* Record in the batch being built which primary serial it brings us to. */
void apl_set_source(apl_store *s, uint64_t serial, uint64_t instance);

/* ---- block checksums (apl_sums.c) ---- */
/* A block number as apl_check_blocks reports it. */
struct apl_blockinfo {
    uint32_t number;
    uint32_t file;            /* the file it belongs to (UINT32_MAX: unknown) */
    uint64_t devices;         /* bit i: a block of its chain lies on device segment i */
    uint32_t damaged;         /* 1: its content does not match its checksum */
    uint32_t removed;         /* 1: removed, waiting for readers to pass */
};
/* The numbers in use in [start, limit) (only the damaged ones with
 * damaged_only), at most cap of them; *next: where to go on. Between batches. */
int64_t apl_check_blocks(apl_store *s, uint32_t start, uint32_t limit, struct apl_blockinfo *out, uint32_t cap,
                         uint32_t damaged_only, uint32_t *next);

/* ---- storage devices out of service and back (apl_devices.c) ---- */
/* Take device segment `seg` out of service: nothing is allocated there, and
 * every number whose chain has a block on it fails its reads and changes
 * with APL_EDEVICE until a peer's image refills it. Returns how many numbers
 * that marked. Between batches; the plain store only (APL_EINVAL). */
int64_t apl_device_detach(apl_store *s, uint32_t seg);
/* The block numbers from `start` on whose current chain has a block on
 * `seg` (marked or not), at most cap of them; *next: where to go on. */
int64_t apl_device_numbers(apl_store *s, uint32_t seg, uint32_t start, uint32_t *out, uint32_t cap,
                           uint32_t *next);
/* The numbers still marked with a block on `seg` (not yet refilled). */
int64_t apl_device_marked(apl_store *s, uint32_t seg);
/* Give a detached device's memory back and put it in service, empty:
 * APL_EBUSY while a slot of it is in use (a pin still sees a version there). */
int apl_device_renew(apl_store *s, uint32_t seg);
/* In the open batch: copy each number's chain onto `seg` (its slots taken
 * first). Returns how many moved. */
int64_t apl_device_fill(apl_store *s, uint32_t seg, const uint32_t *numbers, uint64_t n);

/* ---- segment pages mapped ahead of use (apl_prefault.c) ---- */
/* Map [base, base+len) of a writable segment mapping into this process
 * without changing a byte: 0 (MADV_POPULATE_WRITE), 1 (the kernel lacks
 * it: each page read once instead), APL_EINVAL (the range is not mapped
 * writable). Takes no lock: callable from any thread (cffi lets go of the GIL). */
int apl_prefault(uint8_t *base, uint64_t len);

/* ---- the durability files' record checksum (apl_crc.c) ---- */
/* zlib's crc32(crc, buf, len), the same values, faster where the CPU has
 * PCLMULQDQ. Takes no lock: callable from any thread. */
uint32_t apl_crc32(uint32_t crc, const uint8_t *buf, uint64_t len);

/* ---- failover (apl_rewind.c) ---- */
/* In the open batch: the change log continues at `serial` (a promoted
 * secondary continues its primary's serials); entries it held are dropped. */
int apl_log_restart(apl_store *s, uint64_t serial);
/* In the open batch: undo entries (a history past a fork, oldest first, as the
 * change log stores them) newest first from their B logs. Block numbers whose
 * structure changed (BLOCK entries, APL_CEF_STRUCT) or whose B log is missing
 * are not undone but set in `copy` (a bitmap of nbits): copy them from the new
 * primary. *txns: the COMMITs undone. */
int apl_undo_entries(apl_store *s, const uint8_t *buf, uint64_t len, uint8_t *copy, uint64_t nbits,
                     uint64_t *txns);
/* Promote an lz4 secondary (apl_bstore.c): lay every live backup block of
 * `src` (a compressed store, no batch open) into `dst` (an uncompressed store
 * with the same files, inside its open batch) as primary blocks. APL_EFULL:
 * dst cannot hold them. *blocks, *bytes: numbers laid in, image bytes. */
int apl_expand(apl_store *src, apl_store *dst, uint64_t *blocks, uint64_t *bytes);

/* ---- a primary's controller and its agent (apl_acks.c; apl_layout.h, struct apl_acks) ---- */
void apl_acks_init(struct apl_acks *a, uint64_t instance, uint32_t count);
/* The agent: secondary i confirmed `serial`. Returns 1 when the controller
 * should be signalled (a commit waits for a serial it reaches), else 0. */
int apl_acks_post(struct apl_acks *a, uint32_t i, uint64_t serial);
/* The controller: the lowest serial a commit waits for (0: none), then every
 * acknowledged serial into out[0 .. ak_count). */
void apl_acks_want(struct apl_acks *a, uint64_t serial, uint64_t *out);

/* ---- the read path as CPython types (apl_py.c) ---- */
/* Set RecordCodec and TableReader as attributes of the (imported) Python
 * module named `module`; APL_EINVAL when that fails. */
int apl_py_install(const char *module);

/* Published log head/tail/version, read consistently. */
int apl_log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial);

#endif
