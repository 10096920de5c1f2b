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
 *   page k>=1: 4096 bytes: 4088 bytes of bits (32704 regions) + xxh64 of
 *           those bytes seeded with the page number.
 * A bad header refuses the whole file; a bad page refuses that page.  What is
 * refused is marked dirty (never "clean by mistake") and cbt_state() says so.
 */
#ifndef FERRY_CBT_H
#define FERRY_CBT_H

#include <stdbool.h>
#include <stdint.h>

#include "common/bitmap.h"

#define CBT_MAGIC        "FERRYCBT"
#define CBT_VERSION      1
#define CBT_PAGE_SIZE    4096
#define CBT_PAGE_BITS    ((CBT_PAGE_SIZE - 8) * 8)   /* 32704 regions per page */
#define CBT_DEFAULT_GRANULARITY (64 * 1024)

struct cbt;

/* Opens or creates the map file at path for a disk of disk_size bytes.  An
 * existing file whose granularity or size differs is refused as a mismatch
 * (marked all dirty, new file written).  Returns NULL only on a hard error
 * (ENOMEM, cannot create the file), with a message in err. */
struct cbt *cbt_open(const char *path, const char *disk_name, uint64_t disk_size,
                     uint64_t granularity, char *err, size_t errlen);
/* Writes every page and the header, fsyncs, frees. */
void cbt_close(struct cbt *c);

uint64_t cbt_granularity(const struct cbt *c);
uint64_t cbt_nbits(const struct cbt *c);
uint64_t cbt_generation(const struct cbt *c);
const char *cbt_state(const struct cbt *c);
const struct bitmap *cbt_bitmap(const struct cbt *c);   /* live map, read only */

/* Writers bracket their mark + data write with these (a shared lock). */
void cbt_write_begin(struct cbt *c);
void cbt_write_end(struct cbt *c);

/* Marks [off, off+len).  Returns 0 if no wait is needed, else a ticket > 0. */
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

#endif
