/* snapshot: the migrate-time restore point of one source disk.
 *
 * At the start of a warm migration ferry takes a restore point of each source
 * disk.  The source image then receives write-backs (RPO points shipped back
 * from the destination) and, after a migrate-back, the guest's own writes;
 * `ferry snapshot restore` rolls the image back to exactly the migrate-time
 * content and `ferry snapshot rm` drops the point.
 *
 * DESIGN: copy before write.
 * The disk is cut into regions of `granularity` bytes (the last one may be
 * short).  Before a region is changed for the first time since the point was
 * taken, snapshot_preserve() copies its current content into the data file at
 * the region's own offset, makes that durable, then sets the region's "saved"
 * bit in the map file durably; only then may the caller change the region.
 * Restore writes every saved region back: the regions without a bit were
 * never changed, so the disk then equals the restore point.  Each region is
 * saved at most once per point, so the saved content is always the
 * migrate-time content; restore leaves the point as it is (it can be run
 * again, and later writes need no new copy of regions already saved).
 *
 *   fast path  every region touched is saved: a few atomic loads, no lock.
 *   slow path  the caller claims the unsaved regions no one else is copying
 *              (in runs of at most SNAPSHOT_MAX_RUN bytes), reads them from the
 *              backend, writes the non-zero chunks to the data file (an
 *              all-zero chunk stays a hole), fdatasyncs it, then commits the
 *              bits.  Regions another caller is copying are waited for.
 *   commit     group commit without a thread: whoever finds no commit running
 *              takes every bit page changed since the last one, writes them
 *              in place and fdatasyncs the map file once for the batch; the
 *              others wait for that commit (or lead the next one).
 *
 * ON DISK (little endian)
 *   PATH: the map file, (1 + npages) pages of 4096 bytes.
 *     page 0: header.  Byte offsets: 0 magic "FERRYSNP", 8 u32 version (1),
 *             12 u32 page size (4096), 16 u64 granularity, 24 u64 disk size,
 *             32 u64 nbits (regions), 40 u64 created (CLOCK_REALTIME ns), 48
 *             u64 flags (0; any other value refuses the file), 56 u64
 *             XXH64(bytes 0..55, seed 0); the rest of the page is zero.
 *     page k>=1: 4088 bytes of saved bits (32704 regions) + XXH64 of those
 *             bytes seeded with created + k, so that a page belongs to one
 *             header and one place.  Page k holds regions [(k-1) * 32704,
 *             k * 32704) as 511 u64 words, bit i of word w being region
 *             (k-1) * 32704 + 64 * w + i; bits past nbits are zero.
 *   PATH.data: the data file, a sparse file of exactly disk size bytes; a
 *     saved region's content is at the region's own offset (its all-zero
 *     chunks are holes).  Only regions whose bit is set are meaningful.
 * Nothing in a file that fails a check is trusted: a bad header, a bad page,
 * a truncated map, a missing data file or one of the wrong size, or a
 * granularity or disk size that differs from the caller's, refuses the open
 * with a message (a restore from a partial map would silently be wrong).
 *
 * INVARIANTS
 *   - A bit is written to the map file only after its region's data is
 *     durable in the data file (fdatasync), and snapshot_preserve returns 0
 *     only after the bit is durable (map fdatasync).  So after kill -9 or a
 *     power loss at any point, a set bit has the migrate-time content in the
 *     data file and a region without one was never changed.
 *   - Create removes the old map durably before anything else and installs
 *     the new one by rename: a crash leaves the old point, no point, or the
 *     new one whole.  Delete removes the map first for the same reason.
 *
 * FAIL MODE: when a write or sync of the map or data file fails, the point
 * can no longer vouch for new copies: every later preserve that needs a copy
 * returns -EIO (regions already saved still pass), until the point is
 * reopened.  Reading the disk (the backend) failing is only that call's
 * error.
 *
 * THREAD MODEL: snapshot_preserve may be called from any number of threads
 * at once (the disk's IO threads).  snapshot_restore needs no other writer of
 * the disk or caller of preserve; open, close and delete are single-threaded
 * per point. */
#ifndef FERRY_SNAPSHOT_H
#define FERRY_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "disk/backend.h"

#define SNAPSHOT_MAGIC       "FERRYSNP"
#define SNAPSHOT_VERSION     1
#define SNAPSHOT_PAGE_SIZE   4096
#define SNAPSHOT_PAGE_BITS   ((SNAPSHOT_PAGE_SIZE - 8) * 8)   /* 32704 regions per page */
#define SNAPSHOT_DEFAULT_GRANULARITY (64 * 1024)
#define SNAPSHOT_MAX_GRANULARITY     (UINT64_C(1) << 30)
/* The most one preserve copies before it commits (at least one region). */
#define SNAPSHOT_MAX_RUN     (8 * 1024 * 1024)

struct snapshot;

/* Opens (create=false) or creates (create=true: replaces anything at path) the
 * restore point of a disk of disk_size bytes cut into regions of granularity
 * bytes (a power of two from 4096 to SNAPSHOT_MAX_GRANULARITY; 0: the default
 * at create, whatever the file says at open).  Files: path (header + saved
 * bitmap) and path + ".data" (sparse, disk_size bytes, saved regions at their
 * own offsets).  A corrupt or mismatched file is refused with a clear message
 * in err (never trusted); NULL then. */
struct snapshot *snapshot_open(const char *path, const char *disk_name, uint64_t disk_size,
                               uint64_t granularity, bool create, char *err, size_t errlen);
void snapshot_close(struct snapshot *s);
/* Unlinks both files (absent is fine), the map first; fsyncs the directory.
 * Returns 0 or -errno. */
int snapshot_delete(const char *path);

/* Before [off, off+len) of the disk is changed: saves every region it touches
 * that is not saved yet, reading the current content from be, durably (data
 * file fdatasync'd, then the bit durable), then returns 0.  Regions that read
 * as all zeros are saved as holes (no data written).  Concurrent calls
 * touching the same region: one copies, the others wait for it.  nowait:
 * -EAGAIN at once if any region touched is not saved yet (the caller retries
 * without it).  Returns 0 or -errno (the caller must then not change the
 * disk): -EINVAL past the end of the disk (or a backend of another size),
 * the backend's read error, -ENOMEM, -EIO in fail mode. */
int snapshot_preserve(struct snapshot *s, struct backend *be, uint64_t off, uint64_t len,
                      bool nowait);
/* Writes every saved region back into be (all-zero chunks as be->ops->zero,
 * which may punch holes) and flushes be; the disk then equals the restore
 * point, and the snapshot stays valid (still the same point).  Idempotent: a
 * crash in the middle is repaired by running it again.  No other writer may
 * be active.  Returns 0 or -errno (-EINVAL: be is not disk_size bytes). */
int snapshot_restore(struct snapshot *s, struct backend *be);

uint64_t snapshot_saved_regions(const struct snapshot *s);
uint64_t snapshot_saved_bytes(const struct snapshot *s);  /* allocated bytes of the data file */
uint64_t snapshot_created_ns(const struct snapshot *s);   /* CLOCK_REALTIME at creation, kept in the header */
uint64_t snapshot_granularity(const struct snapshot *s);
uint64_t snapshot_nregions(const struct snapshot *s);
/* True if region i (offset i * granularity) is saved. */
bool snapshot_region_saved(const struct snapshot *s, uint64_t i);
/* Number of map commits (page batches + one fdatasync each) since open. */
uint64_t snapshot_commit_count(const struct snapshot *s);
/* True once a file write failed (fail mode, see above). */
bool snapshot_failed(const struct snapshot *s);
/* Fault injection for tests: every later write to the map or data file fails
 * with -err (0 turns it off; fail mode, once entered, stays). */
void snapshot_inject_write_error(struct snapshot *s, int err);

#endif
