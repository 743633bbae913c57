/*
 * apl_layout.h — the on-memory format of an appliance. This header is the one
 * place where the shared-memory layout is defined; Python reads every size and
 * offset from it through cffi (appliance/store/layout.py) and never hardcodes one.
 *
 * An appliance is a set of POSIX shared-memory segments:
 *
 *   /apl.<name>.meta    superblock, file directory, layout description (the
 *                       configuration's tables and storage settings as JSON, read
 *                       only to say what differs when a configuration is refused),
 *                       location table, block checksums (apl_sums.c), change log. Written by the controller
 *                       only; mapped read-only by clients and by the replication agent.
 *   /apl.<name>.readers reader slots: the only region clients write (their pins).
 *   /apl.<name>.dev<i>  "storage devices": an arena of fixed-length block slots.
 *                       Written by the controller only; mapped read-only by clients.
 *
 * Every region starts with a magic number and APL_FORMAT, a number that folds in
 * the format version and the sizes of every layout-affecting struct, so a build
 * with a different layout is refused (APL_EVERSION) instead of corrupting memory.
 *
 * ---------------------------------------------------------------------------
 * Files, blocks and the location table (patent Fig. 3/4, [0068]-[0077])
 * ---------------------------------------------------------------------------
 * A "file" is a table's primary data, or one alternate-key index of a table.
 * Each file is a tree of numbered blocks:
 *   - leaf blocks ("primary blocks") hold records sorted by key; a full primary
 *     block gets overflow blocks chained behind it (bh_next), at most
 *     sb_max_overflow of them; past that the chain shares its records with a
 *     sibling chain that has room, or else is split in two and the new half
 *     gets a new block number (apl_tree.c), so lookups stay logarithmic
 *     however data arrives. Data past the last block gets a new primary block
 *     ([0077]).
 *   - inner ("index") blocks map separator keys to child *block numbers*;
 *   - one meta block per file holds its record count.
 * The location table maps block number -> block address (segment, slot). A block
 * is found by number only through it, so a block may live on any segment and may
 * move (copy-on-write, device replacement) without touching its parent.
 * Overflow blocks are addressed from their primary block only and have no number
 * of their own ([0076]).
 *
 * ---------------------------------------------------------------------------
 * Readers' consistent access: versions, pins, reclamation
 * ---------------------------------------------------------------------------
 * Shared:   sb_version (G, the last published commit version), the location
 *           table, the block versions, the reader slots.
 * Writer:   the controller alone writes blocks, the location table and G.
 * Readers:  clients, the agent, the controller's own status code.
 *
 * Every commit batch builds version V = G+1. A block changed in V is first
 * copied ("copy-on-write") to a free slot; the copy gets bh_version = V and
 * bh_prev = the address of the version it replaces, and only then is its
 * address stored into the location table (release). Further changes in the
 * same batch modify the copy in place: no reader can be looking at it, because
 * a reader with snapshot version S always follows bh_prev while bh_version > S.
 * Publishing V is one release store of sb_version. Committed block versions are
 * never modified again, but for bh_retired: removing a block number stores the
 * removal's version V there (before V is published). Lookups never reach a
 * removed number (no parent refers to it from V on); block images (verify,
 * a first copy) read a number whose bh_retired is <= their version as not in
 * use. The number itself stays in the location table until no pin can reach
 * it, and is dropped then only if that same removal still holds: a secondary
 * re-creates a number as soon as its primary reuses it, which can be before
 * its own reclaim has passed the removal.
 *
 * A reader pins its snapshot before reading: rs_pin = APL_PIN_PENDING; full
 * fence; S = load(G); rs_pin = S. It reads, then stores rs_pin = 0. There is no
 * retry anywhere on the read path.
 *
 * The writer frees an old version only once no pin can reach it: a version
 * superseded at version X is freed when every pin is >= X. To compute that the
 * writer takes a full fence and scans the slots; a slot in PENDING makes it
 * postpone reclamation to its next round (it does not wait). Why that is safe:
 * a reader the scan did not see stored PENDING after the scan read its slot, so
 * its fence orders its load of G after the writer's earlier publish, and the
 * pin it takes is at least the G the writer used as the bound. The oldest pin
 * only grows over time, which is also what lets a restarted controller rebuild
 * its free lists from the version chains alone (apl_alloc.c, recovery).
 * A reader killed while pinned leaves its pid in the slot; the controller clears
 * slots whose pid no longer exists.
 *
 * Slots are claimed and cleared by CAS on rs_pid, and only the CAS winner
 * writes the rest of the slot: a claimer takes a free slot (0 -> its pid) or
 * a dead process's (dead pid -> its pid); the controller clears one by
 * (pid -> APL_PID_BUSY), then pin, then rs_pid = 0. A process is dead when
 * kill(pid, 0) says ESRCH or its start time is not the slot's rs_start (the
 * pid was reused). Each claim bumps rs_gen; a thread's cached per-call slot is
 * used only while rs_pid and rs_gen are still its own.
 *
 * The readers segment is group-writable, so nothing in it is trusted for
 * safety; a client may forge slots, pins or rh_high. Three things hold anyway:
 *   - The writer scans slots up to its own high-water mark (the largest
 *     rh_high it ever read, and every slot its listing found in use), so
 *     lowering rh_high hides no slot it has seen. A claimer raises rh_high
 *     before it pins, which is ordered like PENDING above.
 *   - sb_horizon (meta, controller-written): before freeing versions with
 *     bound B the writer stores sb_horizon = B (release, then a full fence);
 *     every read at version S ends with an acquire fence and fails with
 *     APL_ESNAPSHOT when sb_horizon > S. Memory is reused only after that
 *     store, so a read that saw reused bytes sees the horizon past its
 *     version: a snapshot whose pin was wiped or overwritten fails, it never
 *     returns data from a freed version. Honest pins are never below the
 *     horizon (it is the oldest pin the writer saw). The writer also treats
 *     pins below the horizon as the horizon, and recovery walks version
 *     chains back only to it: versions older than that may be freed and reused.
 *   - struct apl_rown (meta) records the owner (pid, start time) the
 *     controller verified for each slot through a connected session
 *     (SO_PEERCRED); slots that no verified owner or session holds are
 *     cleared by the controller's housekeeping.
 *
 * Closing a view (the client library's close) must not unmap segments under
 * a read of another thread: every reader entry point announces the view it is
 * inside in a thread record (process memory) and then checks v_closed; the
 * closer sets v_closed, runs membarrier(PRIVATE_EXPEDITED) (a full fence on
 * every thread of the process; readers use a fence of their own where it is
 * not available) and waits until no thread record names the view. A read
 * that finds the view closed returns APL_ECLOSED. That wait is the closer's
 * alone: a read never waits.
 *
 * ---------------------------------------------------------------------------
 * The change log (read by the replication agent)
 * ---------------------------------------------------------------------------
 * A ring of variable-length entries in the meta segment, addressed by a
 * monotonic byte position (physical offset = position % sb_log_size). Entries
 * never wrap: when one does not fit before the end, a PAD entry (or, if even a
 * header does not fit, nothing: readers skip to the next lap) fills the rest.
 * The entries of a transaction are appended together when it commits:
 *   BEGIN   (T log: program name and input, msgpack)
 *   INSERT / UPDATE / DELETE   (file, block number, record offset, key, A image, B image)
 *   BLOCK   (a block's whole logical content after a structural change: split,
 *            new overflow block, removal; see apl_block_image())
 *   COMMIT  (ce_version = the commit version that published it)
 * Every entry carries the appliance epoch, its serial number (strictly +1 per
 * entry over the appliance's life), the transaction number and a wall-clock
 * timestamp. Which entries are valid is published with the commit: sb_pub[G & 1]
 * holds the log head and tail of version G, written before G itself.
 */
#ifndef APL_LAYOUT_H
#define APL_LAYOUT_H

#include <stdint.h>
#include <stddef.h>

#define APL_FORMAT_VERSION   4u   /* 4: a record no longer repeats the 8 key bytes of its slot */
/* The record format (the value bytes of a leaf slot: cext/apl_rec.h). It is
 * not part of APL_FORMAT, which fixes the blocks around records: the
 * configuration's schema hash and layout include it with the fields in schema
 * order (appliance/config.py), so segments or a peer with records of another
 * format are refused naming it. 1 was one msgpack map per record. */
#define APL_REC_FORMAT       2u
#define APL_MAGIC_META       0x4D4C5041u /* "APLM" */
#define APL_MAGIC_READERS    0x524C5041u /* "APLR" */
#define APL_MAGIC_DEVICE     0x444C5041u /* "APLD" */

#define APL_MAX_SEGMENTS     64u
#define APL_MAX_FILES        256u
#define APL_MAX_KEY          1024u     /* encoded key bytes */
#define APL_MAX_HEIGHT       16u
#define APL_MIN_BLOCK        1024u
#define APL_MAX_BLOCK        32768u    /* slot offsets are 16-bit */
#define APL_CACHELINE        64u

/* A block address: segment index in the top 16 bits, slot index below. */
typedef uint64_t apl_addr;
#define APL_ADDR_NONE        UINT64_MAX
#define APL_ADDR_SEG(a)      ((uint32_t)((a) >> 48))
#define APL_ADDR_SLOT(a)     ((a) & 0x0000FFFFFFFFFFFFull)
#define APL_ADDR(seg, slot)  (((uint64_t)(seg) << 48) | (uint64_t)(slot))
/* A location entry with this bit set: the number's chain has a block on a
 * detached storage device (sb_detached; apl_devices.c). Its segment field is
 * then past every segment, so a reader's apl_ptr finds nothing there and the
 * read fails (APL_EDEVICE) without a test on its path; the writer strips
 * the bit (apl_loc_raw) for its own bookkeeping. */
#define APL_ADDR_OFF         (1ull << 62)

#define APL_NO_BLOCK         UINT32_MAX

/* Reader pins. */
#define APL_PIN_IDLE         0ull
#define APL_PIN_PENDING      UINT64_MAX

/* An appliance's role (sb_role): the config gives the first one; a failover
 * changes it and the epoch together (appliance/controller/role.py). A primary
 * that learnt of a newer epoch stays a primary that takes no writes
 * (sb_fenced_epoch) until it rejoins as a secondary. */
enum apl_role { APL_ROLE_NONE = 0, APL_ROLE_STANDALONE = 1, APL_ROLE_PRIMARY = 2, APL_ROLE_SECONDARY = 3 };

/* File kinds. */
enum apl_file_kind { APL_FILE_PRIMARY = 1, APL_FILE_ALTKEY = 2 };

/* Block kinds (bh_magic). */
enum apl_block_kind {
    APL_BLK_LEAF = 0x46414C42u,  /* "BLAF": primary block (leaf) */
    APL_BLK_OVFL = 0x4C564F42u,  /* "BOVL": overflow block       */
    APL_BLK_INNR = 0x4E4E4942u,  /* "BINN": index (inner) block  */
    APL_BLK_META = 0x54454D42u,  /* "BMET": file meta block      */
};

/* Change-log entry kinds (ce_kind). */
enum apl_entry_kind {
    APL_CE_BEGIN = 1, APL_CE_INSERT = 2, APL_CE_UPDATE = 3, APL_CE_DELETE = 4,
    APL_CE_COMMIT = 5, APL_CE_CANCEL = 6, APL_CE_BLOCK = 7, APL_CE_PAD = 8,
};
/* ce_flags */
#define APL_CEF_STRUCT       0x0001u  /* a record change followed by BLOCK images */
#define APL_CEF_REMOVED      0x0002u  /* BLOCK: the block number was removed */
#define APL_CEF_DELTA        0x0004u  /* UPDATE on the wire: A holds only the changed part:
                                          u32 offset, u32 replaced length, new bytes ([0116]) */
#define APL_CEF_NO_B         0x0008u  /* on the wire: the B image was not sent */

/* ------------------------------------------------------------------ */
/* Superblock: offset 0 of the meta segment.                           */
/* ------------------------------------------------------------------ */

/* What one published commit version says about the change log. */
struct apl_pub {
    uint64_t pb_version;   /** the commit version this record belongs to */
    uint64_t pb_log_head;  /** log position just past the last entry of pb_version */
    uint64_t pb_log_tail;  /** oldest log position still holding valid entries */
    uint64_t pb_serial;    /** serial of the last entry published */
    uint64_t pb_txn;       /** last transaction number committed */
    uint64_t pb_time_ns;   /** wall-clock time of the commit */
    uint64_t pb_source_serial;   /** secondary: the primary's serial applied as of this version */
    uint64_t pb_source_instance; /** secondary: the primary (sb_instance) that serial belongs to */
};

struct apl_super {
    /* --- immutable after format --- */
    uint32_t sb_magic;          /** APL_MAGIC_META */
    uint32_t sb_format;         /** APL_FORMAT */
    uint64_t sb_instance;       /** random id chosen when the segments were created */
    uint64_t sb_created_ns;     /** wall-clock creation time */
    uint64_t sb_schema_hash;    /** hash of the geometry and schema it was formatted with */
    uint32_t sb_block_size;     /** bytes per block slot */
    uint32_t sb_nsegments;      /** number of device segments */
    uint64_t sb_segment_slots;  /** block slots per device segment */
    uint64_t sb_max_blocks;     /** location table capacity (block numbers) */
    uint32_t sb_nfiles;         /** entries in the file directory */
    uint32_t sb_max_overflow;   /** overflow blocks allowed behind a primary block */
    uint32_t sb_nreaders;       /** reader slots in the readers segment */
    uint32_t sb_flags;          /** APL_SB_COMPRESSED: devices hold lz4 backup blocks */
    uint64_t sb_files_off;      /** offset of struct apl_file[sb_nfiles] */
    uint64_t sb_loc_off;        /** offset of apl_addr[sb_max_blocks] */
    uint64_t sb_log_off;        /** offset of the change-log ring */
    uint64_t sb_log_size;       /** bytes in the change-log ring */
    uint64_t sb_meta_size;      /** total bytes of the meta segment */
    uint32_t sb_page_size;      /** compressed store: bytes per device page (the slot size) */
    uint32_t sb_nclasses;       /** compressed store: object size classes (APL_BCLASSES) */
    uint64_t sb_layout_off;     /** offset of the layout description (0: none recorded) */
    uint64_t sb_layout_len;     /** its bytes: the configuration's tables and storage settings as
                                    JSON, so a refused configuration can be told what differs */
    uint64_t sb_rown_off;       /** offset of struct apl_rown[sb_nreaders] */

    /* --- failover: written by the controller, rarely (promote, fence, rejoin,
     *     rewind; appliance/controller/recovery.py), read by status and the agent --- */
    uint64_t sb_fork_instance;  /** the primary this appliance followed before it was promoted
                                    (0: never promoted): its serials continue that primary's */
    uint64_t sb_fork_serial;    /** the last serial of sb_fork_instance's history held here */
    uint64_t sb_fenced_epoch;   /** a primary that learnt of this higher epoch takes no writes (0: none) */
    uint32_t sb_repair_pending; /** 1 while blocks wait for a copy from the primary (a rewind or a
                                    repair): a controller that restarts then asks for a whole copy */
    uint32_t sb_pad1a;
    char     sb_fenced_by[48];  /** the primary at sb_fenced_epoch, when it is known ("" otherwise) */
    uint64_t sb_sums_off;       /** offset of uint64_t[sb_max_blocks]: each block number's checksum
                                    (apl_sums.c; immutable after format, like the offsets above) */
    uint8_t  sb_pad1[256 - 144 - 88];

    /* --- written by the controller, read by everyone (own cache lines) --- */
    volatile uint64_t sb_version;     /** G: last published commit version */
    volatile uint64_t sb_epoch;       /** appliance epoch; a failover increments it */
    volatile uint64_t sb_txn_next;    /** next transaction number to hand out */
    volatile uint32_t sb_controller_pid; /** pid of the controller that last opened it */
    volatile uint32_t sb_state;       /** 1 while a controller serves, 0 after a clean stop */
    volatile uint64_t sb_opened_ns;   /** when the current controller opened it */
    volatile uint64_t sb_horizon;     /** a pin below it may have lost versions (reads fail) */
    volatile uint32_t sb_role;        /** enum apl_role: the role now (APL_ROLE_NONE: the config's) */
    uint32_t sb_pad2;
    volatile uint64_t sb_detached;    /** bit i: device segment i is out of service (apl_devices.c) */
    struct apl_pub sb_pub[2];         /** sb_pub[G & 1] describes version G */
};

/* One entry of the file directory. */
struct apl_file {
    char     fl_name[48];    /** table name, or "<table>.<field>" for an index */
    uint32_t fl_id;          /** index in the directory */
    uint32_t fl_kind;        /** enum apl_file_kind */
    uint32_t fl_root;        /** block number of the root; fixed for the file's life */
    uint32_t fl_meta;        /** block number of the meta block */
    uint32_t fl_table;       /** for an index: the file id of its table */
    uint32_t fl_pad[15];
};

/* ------------------------------------------------------------------ */
/* Reader slots: the readers segment.                                   */
/* ------------------------------------------------------------------ */
struct apl_rhdr {
    uint32_t rh_magic;         /** APL_MAGIC_READERS */
    uint32_t rh_format;        /** APL_FORMAT */
    uint64_t rh_instance;      /** equals sb_instance */
    uint32_t rh_nslots;        /** number of slots */
    volatile uint32_t rh_high; /** 1 + highest slot index ever claimed */
    uint8_t  rh_pad[64 - 24];
};

/* One cache line per slot, so readers never share a line (LMDB MDB_reader). */
struct apl_reader {
    volatile uint32_t rs_pid;     /** owning process, 0 = free, APL_PID_BUSY while the
                                      controller clears it; claimed by CAS */
    volatile uint32_t rs_tid;     /** owning thread (informational) */
    volatile uint64_t rs_pin;     /** APL_PIN_IDLE, APL_PIN_PENDING or a version */
    volatile uint64_t rs_since_ns;/** when the current pin was taken (snapshots) */
    volatile uint64_t rs_view;    /** the owner's view id (a process may map an appliance twice) */
    volatile uint32_t rs_kind;    /** 1 = per-call slot, 2 = snapshot slot */
    uint32_t rs_pad0;
    volatile uint64_t rs_start;   /** the owner's start time (/proc/<pid>/stat), 0 = unknown */
    volatile uint64_t rs_gen;     /** +1 at every claim: the claimer's token */
    uint8_t  rs_pad[64 - 56];
};

#define APL_PID_BUSY         UINT32_MAX

/*
 * The owner of each reader slot as the controller last verified it (a
 * connected session of that pid and start time): in the meta segment, which
 * only the controller writes, so it outlives a controller restart and no
 * client can forge it.
 */
struct apl_rown {
    uint32_t ro_pid;         /** 0 = no verified owner */
    uint32_t ro_pad;
    uint64_t ro_start;
};

/* ------------------------------------------------------------------ */
/* Device segments and blocks.                                          */
/* ------------------------------------------------------------------ */
struct apl_seghdr {            /* slot -1 of a device segment, padded to a block */
    uint32_t sg_magic;         /** APL_MAGIC_DEVICE */
    uint32_t sg_format;        /** APL_FORMAT */
    uint64_t sg_instance;      /** equals sb_instance */
    uint32_t sg_index;         /** which device this is */
    uint32_t sg_block_size;
    uint64_t sg_slots;         /** block slots in this segment */
};

/*
 * Block header. A slotted page follows: an array of struct apl_slot growing up
 * from the header (to bh_lower), and record bytes growing down from the end of
 * the block (from bh_upper). bh_garbage counts dead record bytes.
 */
struct apl_bhdr {
    uint32_t bh_magic;       /** enum apl_block_kind */
    uint32_t bh_number;      /** block number (an overflow block: its primary's) */
    uint64_t bh_version;     /** commit version that made this version current */
    apl_addr bh_prev;        /** previous version of this block number, or NONE */
    apl_addr bh_next;        /** next block of the overflow chain, or NONE */
    volatile uint64_t bh_retired; /** version at which the number was removed, 0 = live */
    uint32_t bh_file;        /** file id */
    uint16_t bh_nslots;      /** slots in use */
    uint16_t bh_level;       /** 0 = leaf, else height above the leaves */
    uint16_t bh_lower;       /** end of the slot array (byte offset) */
    uint16_t bh_upper;       /** start of the record heap (byte offset) */
    uint16_t bh_garbage;     /** dead bytes inside the heap */
    uint16_t bh_chain;       /** primary block: blocks in its chain (1 = no overflow) */
    uint64_t bh_count;       /** meta block: records in the file */
};

/*
 * Slot: the key's first 8 bytes as a big-endian integer (zero-padded), so a
 * binary search touches one contiguous array; the offset of its record and
 * the key's length. sl_aux is the value length in a leaf and the child block
 * number in an inner block. The record at sl_off is the key's bytes past the
 * first 8 (none for a key of 8 bytes or fewer: the slot holds all of it),
 * then, in a leaf, the value's bytes. The first 8 are not stored twice.
 */
struct apl_slot {
    uint64_t sl_prefix;
    uint16_t sl_off;
    uint16_t sl_klen;
    uint32_t sl_aux;
};

/* ------------------------------------------------------------------ */
/* Compressed backup blocks ([0088]-[0091])                              */
/* ------------------------------------------------------------------ */
/*
 * A secondary that serves no reads keeps each block number as one object:
 * the block's image (apl_block_image: a primary block and its overflow chain
 * as one unit) compressed with lz4, in a variable-length slot. Device
 * segments are cut into pages of sb_page_size bytes; a page holds objects of
 * one size class. The location table entry of a number is the address of its
 * newest object (segment << 48 | byte offset); versions chain through bo_prev
 * exactly as block versions do, so publishing and crash recovery work the
 * same way. Nobody reads such a store but its controller.
 */
#define APL_SB_COMPRESSED    0x1u
#define APL_MAGIC_BOBJ       0x4A424F42u /* "BOBJ" */
#define APL_BCLASSES         60u
#define APL_BOBJ_ADDR(seg, off) (((uint64_t)(seg) << 48) | (uint64_t)(off))

struct apl_bobj {
    uint32_t bo_magic;       /** APL_MAGIC_BOBJ */
    uint32_t bo_number;      /** block number */
    uint64_t bo_version;     /** commit version that made it current */
    apl_addr bo_prev;        /** previous version of this number, or NONE */
    uint64_t bo_retired;     /** version at which the number was removed, 0 = live */
    uint32_t bo_class;       /** size class of its slot */
    uint32_t bo_clen;        /** compressed bytes that follow the header */
    uint32_t bo_rawlen;      /** bytes of the image once decompressed */
    uint32_t bo_pad;
};

/* ------------------------------------------------------------------ */
/* Change-log entry header; payload follows: key, A image, B image.     */
/* ------------------------------------------------------------------ */
struct apl_centry {
    uint32_t ce_len;         /** total bytes, header included, multiple of 8 */
    uint16_t ce_kind;        /** enum apl_entry_kind */
    uint16_t ce_flags;       /** APL_CEF_* */
    uint32_t ce_file;        /** file id */
    uint32_t ce_block;       /** block number (primary block of the record's chain) */
    uint64_t ce_serial;      /** message serial: +1 per entry */
    uint64_t ce_txn;         /** transaction number */
    uint64_t ce_epoch;       /** appliance epoch */
    uint64_t ce_time_ns;     /** wall-clock time of the commit */
    uint64_t ce_version;     /** commit version */
    uint32_t ce_offset;      /** record offset inside the chain: index*block_size + heap offset */
    uint32_t ce_klen;        /** key bytes */
    uint32_t ce_alen;        /** A image (post-update) bytes; BEGIN: T log; BLOCK: image */
    uint32_t ce_blen;        /** B image (pre-update) bytes */
};

/* ------------------------------------------------------------------ */
/* A primary's controller and its agent: acknowledgements (apl_acks.c)  */
/* ------------------------------------------------------------------ */
/*
 * The primary's agent learns of new log entries and reports what each
 * secondary confirmed without a message on the controller's socket (a
 * synchronous commit crosses this link twice):
 *   - the controller creates, per agent, an anonymous memfd holding one
 *     struct apl_acks and two eventfds, "published" and "acked", and hands
 *     all three to the agent in its OP_WAKEUPS reply (SCM_RIGHTS): nothing
 *     has a name, so nothing is left to unlink, and only the holders of the
 *     descriptors (the controller and that agent) can map or signal them;
 *   - after every publish the controller adds 1 to "published"; the agent
 *     reads the log bounds from the meta segment then, as it would after a
 *     WATCH reply;
 *   - the agent stores each secondary's acknowledged serial in ak_acked and
 *     adds 1 to "acked" when a waiting commit may be released by it.
 *
 * Shared:  ak_acked[i]: the serial secondary i (its place in the primary's
 *          [[replication.secondaries]]) confirmed applied. Written by the
 *          agent only, only ever raised (atomic release store); read by the
 *          controller (acquire).
 *          ak_want: the lowest serial a commit on the controller waits for, 0
 *          when none waits. Written by the controller only; read by the agent.
 * Why no wake-up is lost: the agent stores ak_acked[i], then a full fence,
 * then loads ak_want, and signals "acked" when the serial reaches it; the
 * controller stores ak_want, then a full fence, then loads every ak_acked
 * (apl_acks_want). Both sides fence between their store and their load
 * (Dekker), so either the agent sees the new want and signals, or the
 * controller sees the new acknowledgement itself: a commit never waits for a
 * signal that nobody sends. Signals for acknowledgements nobody waits for are
 * not sent at all; extra signals are harmless (the eventfd counts them as one
 * wake-up, and the controller reads every ak_acked when it wakes).
 * A region comes from the agent's own controller: the agent is trusted as
 * the controller's own user or root (OP_AGENT), and the controller still
 * counts only serials that grow and that it has logged.
 */
#define APL_MAGIC_ACKS       0x4B414C41u /* "ALAK" */
#define APL_MAX_SECONDARIES  64u

struct apl_acks {
    uint32_t ak_magic;        /** APL_MAGIC_ACKS */
    uint32_t ak_format;       /** APL_FORMAT */
    uint64_t ak_instance;     /** the primary's sb_instance */
    uint32_t ak_count;        /** secondaries in use: ak_acked[0 .. ak_count) */
    uint32_t ak_pad0;
    uint8_t  ak_pad1[64 - 24];
    volatile uint64_t ak_want;                       /** controller: lowest waiting serial, 0 = none */
    uint8_t  ak_pad2[64 - 8];
    volatile uint64_t ak_acked[APL_MAX_SECONDARIES]; /** agent: serial each secondary confirmed */
};

/* Meta segment offsets are page-aligned. */
#define APL_PAGE 4096u
#define APL_ALIGN(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))

_Static_assert(sizeof(struct apl_pub) == 64, "apl_pub is one cache line");
_Static_assert(offsetof(struct apl_super, sb_version) == 256, "hot superblock fields start a cache line");
_Static_assert(offsetof(struct apl_super, sb_detached) == 312, "sb_detached ends the hot line");
_Static_assert(sizeof(struct apl_super) == 256 + 64 + 128, "superblock size");
_Static_assert(sizeof(struct apl_file) == 128, "file entry size");
_Static_assert(sizeof(struct apl_rhdr) == 64, "readers header is one cache line");
_Static_assert(sizeof(struct apl_reader) == APL_CACHELINE, "reader slot is one cache line");
_Static_assert(sizeof(struct apl_rown) == 16, "reader owner record size");
_Static_assert(sizeof(struct apl_bhdr) == 64, "block header size");
_Static_assert(sizeof(struct apl_slot) == 16, "slot size");
_Static_assert(sizeof(struct apl_centry) == 72, "change-log entry header size");
_Static_assert(sizeof(struct apl_bobj) == 48, "backup object header size");
_Static_assert(sizeof(struct apl_seghdr) <= APL_MIN_BLOCK, "segment header fits a block");
_Static_assert(offsetof(struct apl_acks, ak_want) == 64, "the controller's field has a cache line of its own");
_Static_assert(offsetof(struct apl_acks, ak_acked) == 128, "the agent's fields start a cache line");

/* The format number folds in the sizes of everything above (LMDB MDB_LOCK_FORMAT). */
#define APL_FORMAT ((uint32_t)(APL_FORMAT_VERSION * 1000003u \
    ^ (uint32_t)sizeof(struct apl_super) * 31u \
    ^ (uint32_t)sizeof(struct apl_file) * 37u \
    ^ (uint32_t)sizeof(struct apl_reader) * 41u \
    ^ (uint32_t)sizeof(struct apl_bhdr) * 43u \
    ^ (uint32_t)sizeof(struct apl_slot) * 47u \
    ^ (uint32_t)sizeof(struct apl_centry) * 53u \
    ^ (uint32_t)sizeof(struct apl_bobj) * 61u ^ APL_BCLASSES * 67u \
    ^ (uint32_t)sizeof(struct apl_rown) * 71u \
    ^ (uint32_t)sizeof(apl_addr) * 59u))

#endif /* APL_LAYOUT_H */
