/* journal: the write-back journal of a warm migration: one RPO point as a
 * file, written at the destination, shipped unchanged, checked and applied
 * at the source.
 *
 * DESIGN
 * In a warm migration the VM runs at the destination against the cloud
 * cache.  Every RPO interval the destination captures the contents of the
 * regions written since the last point (and the VM's state) into a journal,
 * seals it and ships its bytes to the source (WARM_WB frames).  The source
 * stores the file, checks ALL of it (journal_check_fd) and only then applies
 * it to its images (journal_apply_file), so a source image is always exactly
 * some RPO point, never half of one.  A crash while applying replays the file
 * from the start: every entry holds whole contents (DATA bytes or ZERO), so
 * applying an entry twice is the same as once.  Entries need not be in offset
 * order and may overlap: applied in file order, a later entry for a byte
 * overrides an earlier one, so a writer that captures a region twice keeps
 * the newer capture last.
 *
 * The reader is a parser of untrusted input (the file came from the network):
 * it checks every field and length before it uses it, reads entry by entry
 * with one buffer of at most JOURNAL_MAX_ENTRY bytes (never the whole file),
 * and is fuzzed (fuzz/fuzz_journal.c).
 *
 * ON DISK (all integers little endian; see journal.c for the details)
 *   header   64 bytes   "FERRYWBJ", version, sizes, point id, time, ndisks, xxh64
 *   entry    32 bytes + data   kind, disk, offset, length, xxh64 (header + data)
 *   ...      (any number of entries)
 *   trailer  48 bytes   "FERRYWBT", entry count, data bytes, chained hash,
 *                       point id, xxh64
 *
 * Thread model: journal_append may be called by many threads at once on one
 * writer (each entry is written whole, at its own offset);
 * journal_writer_bytes at any time; journal_seal or journal_abort once, after
 * every journal_append has returned.  The readers keep no state between
 * calls and may run in any number of threads.
 *
 * Naming: journal_* are public; everything in journal.c that is not here is
 * static. */
#ifndef FERRY_CACHE_JOURNAL_H
#define FERRY_CACHE_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#define JOURNAL_KIND_DATA  1   /* bytes for disk, offset, length */
#define JOURNAL_KIND_ZERO  2   /* the range reads as zeros (no bytes) */
#define JOURNAL_KIND_STATE 3   /* the VM's state blob (disk = 0, offset = 0); at most one */
#define JOURNAL_MAX_ENTRY (16u * 1024 * 1024)   /* bytes in one entry at most */
#define JOURNAL_MAX_DISKS 16

#define JOURNAL_MAGIC         "FERRYWBJ"
#define JOURNAL_TRAILER_MAGIC "FERRYWBT"
#define JOURNAL_VERSION       1
#define JOURNAL_HEADER_SIZE   64
#define JOURNAL_ENTRY_HEADER_SIZE 32
#define JOURNAL_TRAILER_SIZE  48

struct journal_writer;

/* Creates path + ".tmp" (replacing a stale one) for point `point_id` (>= 1)
 * taken at time_ns (CLOCK_REALTIME) for ndisks (1..JOURNAL_MAX_DISKS) disks,
 * and writes its header.  NULL with a message in err on failure (errno set). */
struct journal_writer *journal_create(const char *path, uint64_t point_id, uint64_t time_ns,
                                      unsigned ndisks, char *err, size_t errlen);

/* Appends an entry.  Thread-safe: many threads append at once, each entry is
 * written whole at its own place; entries are in the file in the order their
 * appends reserved space (so an append that returned before another began is
 * before it).  DATA whose bytes are all zero is stored as ZERO; `data` is
 * not read for ZERO (may be NULL).  STATE: disk 0, offset 0, at most one per
 * journal.  len is 1..JOURNAL_MAX_ENTRY; disk < ndisks; off + len must not
 * overflow.  Returns 0, -EINVAL (bad arguments), -EEXIST (a second STATE),
 * or the -errno of a failed write: then the writer is failed, every later
 * append and journal_seal return that error (abort it). */
int journal_append(struct journal_writer *w, unsigned kind, unsigned disk, uint64_t off,
                   uint64_t len, const void *data);

/* Writes the trailer, fdatasyncs, renames path.tmp to path, fsyncs the
 * directory: the journal is complete.  Frees w in every case.  0, or -errno
 * with a message: then path.tmp is removed and no journal was made (if only
 * the directory fsync failed, path exists, whole, but may not survive a
 * crash). */
int journal_seal(struct journal_writer *w, char *err, size_t errlen);

/* Closes and unlinks path.tmp; frees w.  NULL is a no-op. */
void journal_abort(struct journal_writer *w);

/* Bytes in the file so far: header plus every entry appended (or being
 * appended); the sealed file is this plus JOURNAL_TRAILER_SIZE. */
uint64_t journal_writer_bytes(const struct journal_writer *w);

struct journal_info {
  uint64_t point_id, time_ns;
  uint64_t entries;      /* entries of every kind */
  uint64_t data_bytes;   /* bytes carried by DATA and STATE entries */
  uint64_t file_bytes;   /* size of the whole journal */
  uint64_t state_bytes;  /* length of the STATE entry, 0 when there is none */
  unsigned ndisks;
};

/* Checks a complete journal read from fd (with pread, from byte 0 to the size
 * fstat gives; fd's position is not used) or from memory: the header (magic,
 * version, point id, ndisks == ndisks_expected unless that is 0, checksum),
 * every entry (kind known, disk < ndisks, STATE at disk 0 offset 0 and at
 * most once, 1 <= length <= JOURNAL_MAX_ENTRY, offset + length within
 * disk_sizes[disk] (disk_sizes has ndisks_expected values, or is NULL: no
 * size check), per-entry checksum), the trailer (entry count, byte count,
 * chained checksum of all entries, point id, magic, checksum) and nothing
 * after it.  0 with *info (info may be NULL), or -EPROTO (malformed),
 * -EBADMSG (a checksum does not match), -EINVAL (bad arguments) or -errno
 * (read failure) with a message naming the problem and its offset
 * ("entry 12 at byte 40960: checksum mismatch", "truncated: no trailer"). */
int journal_check_fd(int fd, const uint64_t *disk_sizes, unsigned ndisks_expected,
                     struct journal_info *info, char *err, size_t errlen);
int journal_check_buffer(const void *buf, size_t len, const uint64_t *disk_sizes,
                         unsigned ndisks_expected, struct journal_info *info, char *err,
                         size_t errlen);

/* Called for each entry: kind, disk, offset, length and, for DATA and STATE,
 * the len checked bytes (valid only during the call); NULL for ZERO. */
typedef int (*journal_apply_fn)(void *opaque, unsigned kind, unsigned disk, uint64_t off,
                                uint64_t len, const void *data);

/* Checks the whole journal (as journal_check_fd) and only then calls fn for
 * every entry in file order; each entry is checked again as it is read for
 * fn, so fn only ever sees checked bytes (a file changed between the passes
 * stops with -EBADMSG or -EPROTO after some entries were applied: apply it
 * again once it is whole).  fn's non-zero return stops it and is returned
 * (err then says which entry).  fn NULL: check only.  *info is filled by the
 * check (may be NULL).  journal_apply_file prefixes messages with the path. */
int journal_apply_file(const char *path, const uint64_t *disk_sizes, unsigned ndisks_expected,
                       journal_apply_fn fn, void *opaque, struct journal_info *info, char *err,
                       size_t errlen);
int journal_apply_fd(int fd, const uint64_t *disk_sizes, unsigned ndisks_expected,
                     journal_apply_fn fn, void *opaque, struct journal_info *info, char *err,
                     size_t errlen);
int journal_apply_buffer(const void *buf, size_t len, const uint64_t *disk_sizes,
                         unsigned ndisks_expected, journal_apply_fn fn, void *opaque,
                         struct journal_info *info, char *err, size_t errlen);

/* "DATA", "ZERO", "STATE" or "?". */
const char *journal_kind_name(unsigned kind);

#endif
