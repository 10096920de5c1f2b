/* registry: the disks a ferryd serves, kept in SQLite (DATA_DIR/ferry.db) so
 * everything survives a restart, and in memory as open struct disk objects.
 *
 * Thread model: all functions are thread-safe (one registry mutex; SQLite in
 * serialized mode).  Lookups return a referenced disk that the caller unrefs.
 *
 * Layout of the data directory:
 *   ferry.db            registry (table disks, schema in docs/formats.md)
 *   disks/NAME.img      images made by `ferry disk create` (owned: deleted by rm)
 *   cbt/NAME.cbt        dirty maps
 *   cache/NAME.present  cloud caches' present maps (warm migration destinations)
 *   snapshots/          restore points (warm migration sources; see snapshots.c)
 */
#ifndef FERRY_REGISTRY_H
#define FERRY_REGISTRY_H

#include <stdbool.h>
#include <stdint.h>

#include "disk/disk.h"

struct registry;

struct registry_options {
  bool cbt_enabled;        /* daemon-wide; false only for benchmarks */
  bool heat_enabled;
};

/* Opens (creating if needed) DATA_DIR/ferry.db and opens every registered
 * disk.  A disk whose image is missing is logged and left out (not deleted
 * from the registry).  Returns NULL with a message in err. */
struct registry *registry_open(const char *data_dir, const struct registry_options *opt,
                               char *err, size_t errlen);
void registry_close(struct registry *r);  /* syncs and unrefs every disk */

/* Errors: return -errno-like codes and fill err:
 *   -EEXIST name taken, -EINVAL bad name/size/granularity, -ENOENT no such disk
 *   or image, -EBUSY clients connected (rm without force), other -errno I/O. */
int registry_create(struct registry *r, const char *name, uint64_t size,
                    uint64_t cbt_granularity, char *err, size_t errlen);
/* registry_create for a disk this site is not authoritative for yet: it is
 * created fenced with the reason given (an incoming migration's target). */
int registry_create_ex(struct registry *r, const char *name, uint64_t size,
                       uint64_t cbt_granularity, const char *fence, char *err, size_t errlen);
/* registry_create_ex for a warm migration's destination: the disk is a cloud
 * cache (cache.h) with cache_quota bytes of local space (0: no limit; -1: not
 * a cache, as registry_create_ex), nothing present yet. */
int registry_create_cached(struct registry *r, const char *name, uint64_t size,
                           uint64_t cbt_granularity, const char *fence, int64_t cache_quota,
                           char *err, size_t errlen);
/* The cache holds every region: from the next open the disk is a plain image
 * (commit of a warm migration).  Removes the present map. */
int registry_drop_cache(struct registry *r, const char *name, char *err, size_t errlen);
/* Takes (path != NULL: created there, attached, recorded) or drops (NULL:
 * detached, unrecorded; the caller deletes the files) a disk's restore point. */
int registry_set_snapshot(struct registry *r, const char *name, const char *path, char *err,
                          size_t errlen);
int registry_add(struct registry *r, const char *name, const char *image_path,
                 uint64_t cbt_granularity, char *err, size_t errlen);
/* Removes the disk from the registry and closes it; deletes its CBT map and,
 * if ferry created the image, the image.  Clients are the caller's business:
 * with clients attached and !force, returns -EBUSY. */
int registry_remove(struct registry *r, const char *name, bool force, char *err, size_t errlen);

struct disk *registry_get(struct registry *r, const char *name);   /* ref'd or NULL */
/* Returns a malloc'ed array of ref'd disks sorted by name; caller unrefs each
 * and frees the array. */
struct disk **registry_list(struct registry *r, size_t *count);
bool registry_owns_image(struct registry *r, const char *name);
/* Persists a disk's write limit so it survives a restart. */
int registry_set_write_limit(struct registry *r, const char *name, uint64_t bps,
                             char *err, size_t errlen);
/* Fences (reason != NULL) or unfences a disk, persisted (disk.h: fence).
 * A fence is in force before the call returns, and an unfence only once it
 * is durable. */
int registry_set_fence(struct registry *r, const char *name, const char *reason, char *err,
                       size_t errlen);
/* The data directory (absolute). */
const char *registry_data_dir(const struct registry *r);
/* disk_sync_all on every disk. */
void registry_sync_all(struct registry *r);

#endif
