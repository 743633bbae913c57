"""The only FFIBuilder of the project: builds ``appliance._cext`` from cext/*.c.

API out-of-line mode (``set_source`` + ``cffi_modules`` in setup.py). The cdef
leaves every value and struct layout to the compiler (``...``), so Python reads
sizes and offsets from the C headers and cannot drift from them.
"""
import os
import shutil
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _lz4_flags() -> tuple[list[str], list[str]]:
    """Include and library directories of liblz4, from pkg-config when it knows
    the library; otherwise the compiler's defaults (/usr/include on Debian)."""
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "liblz4"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            words = r.stdout.split()
            return [w[2:] for w in words if w.startswith("-I")], [w[2:] for w in words if w.startswith("-L")]
    if not any(os.path.exists(os.path.join(d, "lz4.h")) for d in ("/usr/include", "/usr/local/include")):
        print("appliance: lz4.h not found: install the lz4 development files "
              "(Debian/Ubuntu: apt-get install liblz4-dev; Fedora: dnf install lz4-devel)", file=sys.stderr)
    return [], []


LZ4_INCLUDE, LZ4_LIBDIRS = _lz4_flags()
SOURCES = ["apl_errors.c", "apl_view.c", "apl_store.c", "apl_bstore.c"]

CDEF = r"""
#define APL_FORMAT_VERSION ...
#define APL_MAGIC_META ...
#define APL_MAX_SEGMENTS ...
#define APL_MAX_FILES ...
#define APL_MAX_KEY ...
#define APL_MIN_BLOCK ...
#define APL_MAX_BLOCK ...
#define APL_NO_BOUND ...
#define APL_SCAN_VALUES ...
#define APL_SCAN_KEYS ...
#define APL_PUT_INSERT ...
#define APL_PUT_UPDATE ...
#define APL_PUT_UPSERT ...
#define APL_CEF_STRUCT ...
#define APL_CEF_REMOVED ...
#define APL_NO_BLOCK ...

enum apl_role { APL_ROLE_NONE, APL_ROLE_STANDALONE, APL_ROLE_PRIMARY, APL_ROLE_SECONDARY };
enum apl_file_kind { APL_FILE_PRIMARY, APL_FILE_ALTKEY };
enum apl_block_kind { APL_BLK_LEAF, APL_BLK_OVFL, APL_BLK_INNR, APL_BLK_META };
enum apl_entry_kind { APL_CE_BEGIN, APL_CE_INSERT, APL_CE_UPDATE, APL_CE_DELETE,
                      APL_CE_COMMIT, APL_CE_CANCEL, APL_CE_BLOCK, APL_CE_PAD };

enum apl_error {
    APL_NOTFOUND, APL_EXISTS, APL_EFULL, APL_ETOOBIG, APL_EKEY, APL_EBUFSIZE,
    APL_EVERSION, APL_EMAGIC, APL_ECORRUPT, APL_EREADERS, APL_EFILE, APL_EINVAL,
    APL_ENOMEM, APL_ELOGFULL, APL_EBATCH, APL_EGEOMETRY, APL_EUNDO,
    APL_ELOCKTIMEOUT, APL_EDEADLOCK, APL_ECANCELLED, APL_ETXN, APL_ENOTABLE, APL_ENOFIELD,
    APL_ETYPE, APL_EACCESS, APL_EUNAVAIL, APL_EPROTO, APL_ECLOSED, APL_ECONFIG, APL_ESTALE,
    APL_EBUSY, APL_EUNKNOWN, APL_EREADONLY, APL_ENOREAD, APL_ELIMIT, APL_EINTERNAL, APL_EBACKUP, APL_ESNAPSHOT, ...
};
const char *apl_strerror(int code);
const char *apl_errname(int code);
uint32_t apl_format_number(void);

struct apl_pub {
    uint64_t pb_version; uint64_t pb_log_head; uint64_t pb_log_tail;
    uint64_t pb_serial; uint64_t pb_txn; uint64_t pb_time_ns;
    uint64_t pb_source_serial; uint64_t pb_source_instance; ...;
};
struct apl_super {
    uint32_t sb_magic; uint32_t sb_format; uint64_t sb_instance; uint64_t sb_created_ns;
    uint64_t sb_schema_hash; uint32_t sb_block_size; uint32_t sb_nsegments;
    uint64_t sb_segment_slots; uint64_t sb_max_blocks; uint32_t sb_nfiles;
    uint32_t sb_max_overflow; uint32_t sb_nreaders; uint32_t sb_flags; uint64_t sb_files_off;
    uint64_t sb_loc_off; uint64_t sb_log_off; uint64_t sb_log_size; uint64_t sb_meta_size;
    uint32_t sb_page_size; uint32_t sb_nclasses; uint64_t sb_layout_off; uint64_t sb_layout_len;
    uint64_t sb_rown_off;
    uint64_t sb_version; uint64_t sb_epoch; uint64_t sb_txn_next;
    uint32_t sb_controller_pid; uint32_t sb_state; uint64_t sb_opened_ns; uint64_t sb_horizon;
    uint32_t sb_role;
    struct apl_pub sb_pub[2];
    ...;
};
struct apl_file {
    char fl_name[48]; uint32_t fl_id; uint32_t fl_kind; uint32_t fl_root;
    uint32_t fl_meta; uint32_t fl_table; ...;
};
struct apl_rhdr { uint32_t rh_magic; uint32_t rh_format; uint64_t rh_instance;
                  uint32_t rh_nslots; uint32_t rh_high; ...; };
struct apl_reader { uint32_t rs_pid; uint32_t rs_tid; uint64_t rs_pin; uint64_t rs_since_ns;
                    uint64_t rs_view; uint32_t rs_kind; uint64_t rs_start; uint64_t rs_gen; ...; };
struct apl_rown { uint32_t ro_pid; uint64_t ro_start; ...; };
#define APL_PID_BUSY ...
#define APL_PIN_IDLE ...
#define APL_PIN_PENDING ...
struct apl_seghdr { uint32_t sg_magic; uint32_t sg_format; uint64_t sg_instance;
                    uint32_t sg_index; uint32_t sg_block_size; uint64_t sg_slots; ...; };
struct apl_bhdr {
    uint32_t bh_magic; uint32_t bh_number; uint64_t bh_version; uint64_t bh_prev;
    uint64_t bh_next; uint64_t bh_retired; uint32_t bh_file; uint16_t bh_nslots;
    uint16_t bh_level; uint16_t bh_lower; uint16_t bh_upper; uint16_t bh_garbage;
    uint16_t bh_chain; uint64_t bh_count; ...;
};
struct apl_slot { uint64_t sl_prefix; uint16_t sl_off; uint16_t sl_klen; uint32_t sl_aux; ...; };
#define APL_BCLASSES ...
#define APL_SB_COMPRESSED ...
struct apl_bobj {
    uint32_t bo_magic; uint32_t bo_number; uint64_t bo_version; uint64_t bo_prev;
    uint64_t bo_retired; uint32_t bo_class; uint32_t bo_clen; uint32_t bo_rawlen; ...;
};
struct apl_centry {
    uint32_t ce_len; uint16_t ce_kind; uint16_t ce_flags; uint32_t ce_file; uint32_t ce_block;
    uint64_t ce_serial; uint64_t ce_txn; uint64_t ce_epoch; uint64_t ce_time_ns;
    uint64_t ce_version; uint32_t ce_offset; uint32_t ce_klen; uint32_t ce_alen;
    uint32_t ce_blen; ...;
};

struct apl_geometry {
    uint32_t block_size; uint32_t nsegments; uint64_t segment_size; uint32_t nfiles;
    uint32_t max_overflow; uint32_t nreaders; uint64_t log_size;
    uint32_t compressed; uint64_t max_blocks_in; uint64_t layout_len; uint32_t page_size;
    uint64_t segment_slots; uint64_t max_blocks; uint64_t files_off; uint64_t layout_off; uint64_t rown_off;
    uint64_t loc_off;
    uint64_t log_off; uint64_t meta_size; uint64_t readers_size; ...;
};
int apl_geometry(struct apl_geometry *g);
int apl_format_meta(uint8_t *meta, const struct apl_geometry *g, uint64_t instance,
                    uint64_t schema_hash, uint64_t now_ns);
int apl_format_readers(uint8_t *mem, const struct apl_geometry *g, uint64_t instance);
int apl_format_device(uint8_t *mem, const struct apl_geometry *g, uint64_t instance, uint32_t index);
int apl_check_meta(const uint8_t *meta, uint64_t size);
int apl_check_readers(const uint8_t *mem, uint64_t size, uint64_t instance);
int apl_check_device(const uint8_t *mem, uint64_t size, uint64_t instance, uint32_t index);

typedef struct { uint64_t v_id; uint32_t v_nfiles; uint32_t v_bsize; uint32_t v_nseg;
                 uint32_t v_nreaders; uint64_t v_max_blocks; ...; } apl_view;
int apl_view_open(apl_view *v, uint8_t *meta, uint64_t meta_size,
                  uint8_t *readers, uint64_t readers_size,
                  uint8_t **segs, uint32_t nsegs, uint64_t seg_size);
void apl_view_close(apl_view *v);
int apl_view_set_segment(apl_view *v, uint32_t index, uint8_t *mem);
uint64_t apl_committed(apl_view *v);
int64_t apl_get(apl_view *v, uint32_t file, const uint8_t *key, uint32_t klen,
                uint64_t version, uint8_t *out, uint64_t cap);
int64_t apl_get_i64(apl_view *v, uint32_t file, int64_t key,
                    uint64_t version, uint8_t *out, uint64_t cap);
int64_t apl_scan(apl_view *v, uint32_t file,
                 const uint8_t *lo, uint32_t lolen, int lo_incl,
                 const uint8_t *hi, uint32_t hilen,
                 uint64_t version, uint32_t what, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more);
int64_t apl_find(apl_view *v, uint32_t index, uint32_t table,
                 const uint8_t *prefix, uint32_t plen,
                 const uint8_t *after, uint32_t afterlen,
                 uint64_t version, uint8_t *out, uint64_t cap,
                 uint64_t *count, uint8_t *resume, uint32_t *resume_len, int *more);
int64_t apl_count(apl_view *v, uint32_t file, uint64_t version);
int apl_snap_open(apl_view *v, uint32_t *slot, uint64_t *gen, uint64_t *version);
int apl_snap_close(apl_view *v, uint32_t slot, uint64_t gen);
uint64_t apl_pid_start(uint32_t pid);
int64_t apl_block_image(apl_view *v, uint32_t number, uint64_t version,
                        uint8_t *out, uint64_t cap);
int apl_block_checksum(apl_view *v, uint32_t number, uint64_t version, uint64_t *sum);
uint64_t apl_block_limit(apl_view *v);

typedef struct apl_store apl_store;
struct apl_recovery {
    uint64_t rolled_back; uint64_t versions_kept; uint64_t blocks_live;
    uint64_t slots_used; uint64_t readers_cleared; uint64_t log_head; ...;
};
struct apl_opinfo {
    uint32_t block; uint32_t offset; uint32_t nstruct; uint32_t structs[64];
    uint8_t removed[64]; ...;
};
struct apl_stats {
    uint64_t version; uint64_t slots_total; uint64_t slots_free; uint64_t blocks_used;
    uint64_t max_blocks; uint64_t retire_pending; uint64_t oldest_pin; uint64_t readers_active;
    uint64_t log_head; uint64_t log_tail; uint64_t log_size; uint64_t serial;
    uint64_t retained; uint64_t horizon; uint64_t bytes_used; uint64_t bytes_live;
    uint64_t seg_free[...]; ...;
};
apl_store *apl_store_new(apl_view *v, uint64_t reserve_slots);
void apl_store_free(apl_store *s);
int apl_store_recover(apl_store *s, struct apl_recovery *r);
int apl_store_create_file(apl_store *s, uint32_t id, const char *name, uint32_t kind, uint32_t table);
void apl_store_use_reserve(apl_store *s, int on);
int apl_batch_begin(apl_store *s);
int apl_put(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
            const uint8_t *val, uint32_t vlen, uint32_t mode,
            uint8_t *old, uint64_t oldcap, int64_t *oldlen);
int apl_delete(apl_store *s, uint32_t file, const uint8_t *key, uint32_t klen,
               uint8_t *old, uint64_t oldcap, int64_t *oldlen);
int apl_op_info(apl_store *s, struct apl_opinfo *info);
int apl_log_append(apl_store *s, uint16_t kind, uint16_t flags, uint32_t file,
                   uint32_t block, uint32_t offset, uint64_t txn, uint64_t time_ns,
                   const uint8_t *key, uint32_t klen, const uint8_t *a, uint32_t alen,
                   const uint8_t *b, uint32_t blen, uint64_t *serial);
int apl_log_block(apl_store *s, uint32_t number, uint16_t flags, uint64_t txn,
                  uint64_t time_ns, uint64_t *serial);
#define APL_TXN_INSERT ...
#define APL_TXN_UPDATE ...
#define APL_TXN_DELETE ...
int apl_commit_txn(apl_store *s, uint64_t txn, uint64_t now, const uint8_t *tlog, uint32_t tlen,
                   const uint8_t *ops, uint64_t ops_len, uint64_t *commit_serial, int64_t *failed_at);
int apl_batch_publish(apl_store *s, uint64_t time_ns, uint64_t last_txn);
int apl_batch_abort(apl_store *s, struct apl_recovery *r);
int64_t apl_reclaim(apl_store *s);
int64_t apl_sweep_readers(apl_store *s);
struct apl_slotinfo {
    uint32_t slot; uint32_t pid; uint64_t start; uint64_t gen; uint64_t pin; uint64_t since_ns;
    uint32_t kind; uint32_t owned; ...;
};
int64_t apl_readers_list(apl_store *s, struct apl_slotinfo *out, uint32_t cap);
int apl_reader_own(apl_store *s, uint32_t slot, uint32_t pid, uint64_t start);
int apl_reader_clear(apl_store *s, uint32_t slot, uint32_t pid, uint64_t gen);
int apl_store_stats(apl_store *s, struct apl_stats *st);
void apl_store_set_epoch(apl_store *s, uint64_t epoch);
uint64_t apl_next_txn(apl_store *s);
int64_t apl_log_read(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap);
#define APL_EXPORT_DELTA ...
#define APL_EXPORT_NO_B ...
#define APL_CEF_DELTA ...
#define APL_CEF_NO_B ...
int64_t apl_log_export(apl_view *v, uint64_t *pos, uint8_t *out, uint64_t cap, uint32_t opts,
                       uint64_t max_serial, uint64_t *first_serial, uint64_t *last_serial, uint64_t *count);
int apl_log_seek(apl_view *v, uint64_t serial, uint64_t *pos);
int apl_apply_entries(apl_store *s, const uint8_t *buf, uint64_t len, uint64_t after_serial,
                      const uint8_t *copied, uint64_t nbits, uint64_t *consumed,
                      uint64_t *last_serial, uint64_t *last_commit);
int apl_apply_image(apl_store *s, uint32_t number, const uint8_t *img, uint64_t len);
void apl_set_source(apl_store *s, uint64_t serial, uint64_t instance);
int64_t apl_block_images(apl_view *v, uint32_t start, uint32_t limit, uint64_t version,
                         uint8_t *out, uint64_t cap, uint32_t *next);
int apl_apply_images(apl_store *s, const uint8_t *buf, uint64_t len, uint8_t *copied, uint64_t nbits);
int64_t apl_drop_uncopied(apl_store *s, const uint8_t *copied, uint64_t nbits);
int apl_log_bounds(apl_view *v, uint64_t *head, uint64_t *tail, uint64_t *version, uint64_t *serial);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "appliance._cext",
    '#include "apl.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE), *LZ4_INCLUDE],
    library_dirs=LZ4_LIBDIRS,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-sign-compare", "-fno-strict-aliasing"],
    # liblz4, built against its own header (Debian: liblz4-dev) and linked
    # the ordinary way; the set-up commands install it
    libraries=["lz4", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
