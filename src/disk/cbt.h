/* cbt: crash-safe changed-block tracking for one disk.
 *
 * DESIGN
 * The disk is cut into regions of `granularity` bytes; a region's bit is set
 * when it has been written (or trimmed, or zeroed) since the map was last
 * swapped for a clean one.  The map lives in memory (an atomic bitmap) and in
 * a map file that is always a SUPERSET of the in-memory map as far as
 * acknowledged writes are concerned:
 *
 *   cbt_mark()  sets the bits of a range.  If every bit was already set and
 *               already durable it returns a ticket of 0 and the write goes on
 *               at full speed.  Otherwise it returns a ticket (a commit
 *               sequence number) that must be waited for with cbt_wait()
 *               before the write is acknowledged.
 *   committer   a thread per map: takes every page changed since the last
 *               commit, writes those pages (each with its own checksum) and
 *               fdatasyncs the file once for the whole batch, then wakes the
 *               waiters.  Concurrent writes to clean regions share one sync,
 *               as dm-era and dm-clone batch their metadata commits.
 *   cbt_swap()  excludes writers (cbt_write_begin/end is a shared lock that
 *               every writer holds from before its mark to after its data is
 *               written), copies the map out, clears it, and writes a clean
 *               map file (temp file + fsync + rename + dir fsync) before it
 *               lets writers go on.  A crash in the middle leaves the old
 *               superset map.
 *
 * ON DISK (little endian; see docs/formats.md)
 *   page 0: header: magic "FERRYCBT", version 1, granularity, disk size, nbits,
 *           generation, flags, xxh64 checksum of the header.
 *           Byte offsets: 0 magic[8], 8 u32 version, 12 u32 page size (4096),
 *           16 u64 granularity, 24 u64 disk size, 32 u64 nbits, 40 u64
 *           generation, 48 u64 flags, 56 u64 XXH64(bytes 0..55, seed 0);
 *           the rest of the page is zero.  Flag 1 (CBT_FLAG_UNTRACKED): the
 *           disk was served with CBT off since this map was written.
 *   page k>=1: 4096 bytes: 4088 bytes of bits (32704 regions) + xxh64 of
 *           those bytes seeded with the page number.  Page k holds regions
 *           [(k-1) * 32704, k * 32704) as 511 little-endian u64 words, bit i
 *           of word w being region (k-1) * 32704 + 64 * w + i.
 * A bad header refuses the whole file; a bad page refuses that page.  What is
 * refused is marked dirty (never "clean by mistake") and cbt_state() says so.
 *
 * FAIL MODE: when a map write or sync fails, marks that need a commit fail
 * (cbt_wait -EIO; cbt_mark CBT_TICKET_FAILED for clean regions, so the write
 * fails before touching data), and the map file is unlinked so that a
 * restart cannot trust a stale map.  A later cbt_sync() or cbt_swap() that
 * writes a complete new map file leaves fail mode (and logs it).
 */
#ifndef FERRY_CBT_H
#define FERRY_CBT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/bitmap.h"

#define CBT_MAGIC        "FERRYCBT"
#define CBT_VERSION      1
#define CBT_PAGE_SIZE    4096
#define CBT_PAGE_BITS    ((CBT_PAGE_SIZE - 8) * 8)   /* 32704 regions per page */
#define CBT_DEFAULT_GRANULARITY (64 * 1024)
#define CBT_FLAG_UNTRACKED 1u

struct cbt;

/* Opens or creates the map file at path for a disk of disk_size bytes.  An
 * existing file whose granularity or size differs is refused as a mismatch
 * (marked all dirty, new file written).  Returns NULL only on a hard error
 * (ENOMEM, cannot create the file), with a message in err. */
struct cbt *cbt_open(const char *path, const char *disk_name, uint64_t disk_size,
                     uint64_t granularity, char *err, size_t errlen);
/* cbt_open with flags.  Without CBT_OPEN_NEW (and so with cbt_open) an absent
 * map file is "recovered: ..." with every region dirty: nothing vouches for
 * the writes made while it was missing.  With CBT_OPEN_NEW the disk is new to
 * ferry: any file at path is replaced by a clean map, state "created". */
#define CBT_OPEN_NEW 1u
struct cbt *cbt_open_ex(const char *path, const char *disk_name, uint64_t disk_size,
                        uint64_t granularity, unsigned flags, char *err, size_t errlen);
/* For a disk served with CBT off: flags an existing map file so that the next
 * cbt_open() marks every region dirty ("recovered: ...served with change
 * tracking off").  Absent or unreadable files need nothing (they are refused
 * anyway).  Returns 0 or -errno; on failure the caller must not serve writes. */
int cbt_invalidate(const char *path, const char *disk_name);
/* Writes every page and the header, fsyncs, frees (the write is skipped when
 * the last cbt_sync() already holds every mark). */
void cbt_close(struct cbt *c);

uint64_t cbt_granularity(const struct cbt *c);
uint64_t cbt_nbits(const struct cbt *c);
uint64_t cbt_generation(const struct cbt *c);
const char *cbt_state(const struct cbt *c);
const struct bitmap *cbt_bitmap(const struct cbt *c);   /* live map, read only */

/* Writers bracket their mark + data write with these (a shared lock). */
void cbt_write_begin(struct cbt *c);
/* As cbt_write_begin, but returns false at once if a swap holds the lock. */
bool cbt_write_trybegin(struct cbt *c);
void cbt_write_end(struct cbt *c);

/* Marks [off, off+len).  Returns 0 if no wait is needed, else a ticket > 0.
 * CBT_TICKET_FAILED: the bits were not set yet and the map file has failed
 * (fail mode: see cbt_wait), so the write must fail before touching data;
 * cbt_wait() on it returns -EIO. */
#define CBT_TICKET_FAILED UINT64_MAX
uint64_t cbt_mark(struct cbt *c, uint64_t off, uint64_t len);
/* Blocks until the commit that covers ticket is durable.  Returns 0, or
 * -EIO if the map file cannot be written (the write must then fail). */
int cbt_wait(struct cbt *c, uint64_t ticket);
/* True if ticket is already durable (for NOWAIT callers). */
bool cbt_ticket_done(struct cbt *c, uint64_t ticket);

/* Snapshot (copy) and swap, as described above.  out must be a bitmap of
 * cbt_nbits() bits (bitmap_init).  Return 0 or -errno. */
int cbt_snapshot(struct cbt *c, struct bitmap *out);
int cbt_swap(struct cbt *c, struct bitmap *out, uint64_t *new_generation);

/* Writes every page and fsyncs (clean shutdown). */
int cbt_sync(struct cbt *c);

/* Bits set in the live map (kept as a counter: no scan). */
uint64_t cbt_dirty_count(const struct cbt *c);
/* True once a map write failed (fail mode): marks that need a commit fail
 * until a cbt_sync() or cbt_swap() writes a new map file successfully.
 * Durability is kept per bit page, so in fail mode a region durable before
 * fails too when its page carries a change that could not be written. */
bool cbt_failed(const struct cbt *c);
/* Fault injection for tests: every later write to the map file fails with
 * -err (0 turns it off). */
void cbt_inject_write_error(struct cbt *c, int err);

#endif
