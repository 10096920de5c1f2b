/* backend: where a disk's bytes live, behind an ops table so a block device,
 * a file and (later) a cloud cache look the same to the disk service.
 * Every op returns 0 or a negative errno and may be called concurrently. */
#ifndef FERRY_BACKEND_H
#define FERRY_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "disk/disk.h"   /* disk_extent_fn */

struct backend;

struct backend_ops {
  const char *name;
  int (*pread)(struct backend *b, void *buf, uint32_t len, uint64_t off, bool nowait);
  int (*pwrite)(struct backend *b, const void *buf, uint32_t len, uint64_t off, bool fua);
  int (*flush)(struct backend *b);
  int (*trim)(struct backend *b, uint32_t len, uint64_t off);
  int (*zero)(struct backend *b, uint32_t len, uint64_t off, bool may_trim);
  int (*cache)(struct backend *b, uint32_t len, uint64_t off);
  int (*extents)(struct backend *b, uint64_t off, uint64_t len, disk_extent_fn fn, void *opaque);
  uint64_t (*allocated)(struct backend *b);
  void (*close)(struct backend *b);
};

struct backend {
  const struct backend_ops *ops;
  int fd;
  uint64_t size;
  bool is_block_device;
  const char *disk_name;            /* for log lines; owned by the disk */
};

/* Opens a raw file or a block device read-write (O_CLOEXEC).  Returns NULL and
 * fills err on failure. */
struct backend *backend_file_open(const char *path, const char *disk_name,
                                  char *err, size_t errlen);

#endif
