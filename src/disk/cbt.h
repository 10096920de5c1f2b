/* cbt: crash-safe changed-block tracking for one disk.
 *
 * DESIGN: persist coarse, track exact.
 * The disk is cut into regions of `granularity` bytes; a region's bit is set
 * when it has been written (or trimmed, or zeroed) since the map was last
 * swapped for a clean one.  Two levels:
 *
 *   exact map   in memory (an atomic bitmap): exactly the regions written.
 *               It is what the API, snapshot, swap and NBD ferry:dirty report.
 *   map file    only needs to be a SUPERSET of the acknowledged writes.  Its
 *               unit of durability is the persist neighbourhood: the
 *               CBT_PERSIST_SPAN aligned regions around a region.  The first
 *               write to a neighbourhood sets ALL of its bits in the page the
 *               committer writes (the exact map keeps just the written
 *               region) and waits for that commit; once the neighbourhood is
 *               durable, writes anywhere in it set their exact bit (one
 *               atomic OR) and go on without a ticket.  So a random-write
 *               workload costs one map sync per neighbourhood instead of one
 *               per region.
 *
 *   cbt_mark()  sets the bits of a range.  If every neighbourhood it touches
 *               is durable (or its exact bits were already durable) it
 *               returns a ticket of 0 and the write goes on at full speed
 *               (atomic loads, plus an OR for bits not set yet).  Otherwise
 *               it returns a ticket (a commit sequence number) that must be
 *               waited for with cbt_wait() before the write is acknowledged.
 *   committer   a thread per map: takes every page changed since the last
 *               commit, writes those pages (exact bits OR the bits of every
 *               persisted neighbourhood, each page with its own checksum) and
 *               fdatasyncs the file once for the whole batch, then wakes the
 *               waiters.  Concurrent first writes share one sync, as dm-era
 *               and dm-clone batch their metadata commits.  Before the first
 *               such page after a clean (exact) map write it sets
 *               CBT_FLAG_COARSE in the header and syncs that on its own.
 *   cbt_sync()  (clean shutdown; cbt_close) excludes writers, rewrites every
 *               page in place with the EXACT bits only, fdatasyncs, then
 *               writes the header with CBT_FLAG_COARSE clear and fdatasyncs
 *               again; the persisted neighbourhoods are forgotten (the file
 *               no longer holds them), so the next first write to a region
 *               not in the exact map commits again.
 *   cbt_swap()  excludes writers (cbt_write_begin/end is a shared lock that
 *               every writer holds from before its mark to after its data is
 *               written), copies the exact map out, clears it and the
 *               persisted neighbourhoods, and writes a clean map file (temp
 *               file + fsync + rename + dir fsync) before it lets writers go
 *               on.  A crash in the middle leaves the old superset map.  A
 *               write that completed before the swap held the shared lock
 *               before it, so its exact bit is in the map copied out; a write
 *               after it finds both levels clear, so it marks the new map and
 *               re-persists its neighbourhood in the new file.
 *
 * At open, a header without CBT_FLAG_COARSE means the last writer closed the
 * map cleanly: the bits are exact (state "ok").  With the flag, ferryd
 * stopped without a clean close (kill -9, crash, power loss): the bits are a
 * superset, exact to the neighbourhood; they are taken as the exact map
 * (over-reporting is safe; under-reporting never happens) and the state says
 * "recovered: unclean shutdown; regions marked at <span> precision".
 *
 * ON DISK (little endian; see docs/formats.md)
 *   page 0: header: magic "FERRYCBT", version 1, granularity, disk size, nbits,
 *           generation, flags, xxh64 checksum of the header.
 *           Byte offsets: 0 magic[8], 8 u32 version, 12 u32 page size (4096),
 *           16 u64 granularity, 24 u64 disk size, 32 u64 nbits, 40 u64
 *           generation, 48 u64 flags, 56 u64 XXH64(bytes 0..55, seed 0);
 *           the rest of the page is zero.  Flags:
 *             1 CBT_FLAG_UNTRACKED: the disk was served with CBT off since
 *               this map was written (the map is refused: all dirty).
 *             2 CBT_FLAG_COARSE: the bit pages may hold whole persist
 *               neighbourhoods beyond the regions written (set, durably,
 *               before the first such page is written; cleared by a clean
 *               close after the exact pages are durable).  Clear: the bits
 *               are exact.  (Files written before this flag existed never
 *               had coarse bits, so flags 0 still means exact.)
 *           Any other flag refuses the map.
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
#define CBT_FLAG_COARSE    2u

/* The persist neighbourhood, in regions: the map file is made durable in
 * aligned runs of this many regions (2 MiB at the default 64 KiB, 128 KiB at
 * 4 KiB).  A first write anywhere in a neighbourhood costs one commit (page
 * write + fdatasync, shared with concurrent ones); the other regions of the
 * neighbourhood then need none.  32 keeps a random-write workload at one sync
 * per 2 MiB (a 2 GiB disk: 1024 syncs instead of 32768) while a map that was
 * not closed cleanly over-reports by at most 2 MiB around each write.  It
 * must be a power of two <= 64 that divides CBT_PAGE_BITS (32704 = 64 * 511),
 * so that a neighbourhood never straddles a u64 word or a bit page. */
#define CBT_PERSIST_SPAN 32

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
/* Writes the exact map as cbt_sync() does, frees (the write is skipped when
 * the last cbt_sync() already holds every mark).  No writer may be active. */
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
/* cbt_swap for a consumer that must not lose the swapped-out bits in a crash
 * (the replicator): with writers excluded, after the map is copied into out
 * and BEFORE the clean map file replaces the old one, keep(opaque, out) must
 * make those bits durable somewhere of its own (and return 0), or return
 * -errno, in which case the swap is abandoned and the map stays as it was.
 * So at every instant the old map file or the keeper holds every mark.
 * keep runs with the disk's writers stalled: it should cost one small write
 * and sync. */
typedef int (*cbt_keep_fn)(void *opaque, const struct bitmap *swapped_out);
int cbt_swap_keep(struct cbt *c, struct bitmap *out, uint64_t *new_generation,
                  cbt_keep_fn keep, void *opaque);
/* The swap without file IO, for a consumer that swaps often (the replicator,
 * several times a second): the exact map is copied out and cleared, but the
 * map file is left as it is and keeps holding the swapped-out bits (they are
 * kept in memory as "retained" and ORed into every page the committer
 * writes), so the file stays a superset of every mark not yet made durable
 * elsewhere, and the persisted neighbourhoods stay persisted: writers pay no
 * new commits.  The retained bits leave the file at its next full rewrite
 * (cbt_swap, cbt_swap_keep, cbt_sync, cbt_close): the consumer must have made
 * them durable itself before any of those (cbt_swap_keep's keeper is the
 * place).  After a crash the map reloads them as dirty (over-reporting). */
int cbt_swap_fast(struct cbt *c, struct bitmap *out, uint64_t *new_generation);

/* Clean shutdown: excludes writers (as cbt_swap), rewrites every bit page
 * with the exact map, fdatasyncs, then clears CBT_FLAG_COARSE in the header
 * and fdatasyncs.  Writes may go on afterwards (the next first write to a
 * region sets the flag again). */
int cbt_sync(struct cbt *c);

/* Bits set in the live map (kept as a counter: no scan). */
uint64_t cbt_dirty_count(const struct cbt *c);
/* Commits made by the committer thread since open: each is one batch of bit
 * pages and one fdatasync (the first after a clean map write also writes and
 * syncs the header flag first).  Full writes (sync, swap) are not counted. */
uint64_t cbt_commit_count(const struct cbt *c);
/* True once a map write failed (fail mode): marks that need a commit fail
 * until a cbt_sync() or cbt_swap() writes a new map file successfully.
 * Durability is kept per group of 64 neighbourhoods (one word of the
 * persisted-neighbourhood bitmap), so in fail mode a region durable before
 * fails too when its group carries a change that could not be written. */
bool cbt_failed(const struct cbt *c);
/* Fault injection for tests: every later write to the map file fails with
 * -err (0 turns it off). */
void cbt_inject_write_error(struct cbt *c, int err);

#endif
