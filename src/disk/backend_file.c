/* backend_file: a disk's bytes in a raw image file or a block device (see
 * backend.h for the ops contract).
 *
 * DESIGN
 * One O_RDWR descriptor shared by every thread: only positioned IO (pread,
 * pwrite and their v2 forms) and lseek(SEEK_DATA/SEEK_HOLE), whose result does
 * not depend on the file offset, so no lock is needed.
 *
 *   read      pread; for NOWAIT preadv2(RWF_NOWAIT): a page-cache miss is
 *             -EAGAIN.  Where the kernel or filesystem has no RWF_NOWAIT the
 *             read simply blocks (remembered, so it is tried once).
 *   write     pwrite; FUA is pwritev2(RWF_DSYNC), or pwrite + fdatasync where
 *             RWF_DSYNC is refused.
 *   flush     fdatasync.
 *   trim      files: fallocate(PUNCH_HOLE|KEEP_SIZE); advisory, so a
 *             filesystem without hole punching makes it a successful no-op.
 *             Block devices: a no-op (discard semantics vary too much by
 *             device to be worth the risk).
 *   zero      files: PUNCH_HOLE when holes are allowed, ZERO_RANGE when not,
 *             then written zeroes.  Block devices: BLKZEROOUT, then written
 *             zeroes.
 *   cache     posix_fadvise(WILLNEED).
 *   extents   files: SEEK_DATA/SEEK_HOLE (holes are HOLE|ZERO); devices: all
 *             data.
 * Unsupported kernel features are found at the first try and remembered in
 * atomic flags; the fallbacks give the same result, only slower. */
#include "disk/backend.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"

struct file_backend {
  struct backend b;                /* first: the ops get a struct backend * */
  _Atomic bool no_nowait;          /* preadv2(RWF_NOWAIT) refused */
  _Atomic bool no_dsync;           /* pwritev2(RWF_DSYNC) refused */
  _Atomic bool no_punch;           /* FALLOC_FL_PUNCH_HOLE refused */
  _Atomic bool no_zero_range;      /* FALLOC_FL_ZERO_RANGE refused */
  _Atomic bool no_zeroout;         /* BLKZEROOUT refused */
};

#define ZERO_CHUNK (256 * 1024)
static const char zero_buf[ZERO_CHUNK];

static struct file_backend *fb_of(struct backend *b) { return (struct file_backend *)b; }

static bool unsupported(int err) { return err == EOPNOTSUPP || err == ENOSYS || err == ENOTTY; }

/* Remembers that a feature is missing; says so once. */
static void feature_missing(struct backend *b, _Atomic bool *flag, const char *what, int err)
{
  if (!atomic_exchange(flag, true))
    log_info(b->disk_name, "image: %s not supported here (%s); using the fallback", what,
             strerror(err));
}

static int file_pread(struct backend *b, void *buf, uint32_t len, uint64_t off, bool nowait)
{
  struct file_backend *fb = fb_of(b);
  char *p = buf;
  while (len > 0) {
    ssize_t r;
    if (nowait && !atomic_load_explicit(&fb->no_nowait, memory_order_relaxed)) {
      struct iovec iov = { p, len };
      r = preadv2(b->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
      if (r < 0 && unsupported(errno)) {
        feature_missing(b, &fb->no_nowait, "preadv2(RWF_NOWAIT)", errno);
        continue;
      }
      if (r < 0 && errno == EAGAIN)
        return -EAGAIN;
    } else {
      r = pread(b->fd, p, len, (off_t)off);
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0) {          /* past the end of a file shorter than the disk */
      memset(p, 0, len);
      return 0;
    }
    p += r;
    off += (uint64_t)r;
    len -= (uint32_t)r;
  }
  return 0;
}

static int file_flush(struct backend *b)
{
  while (fdatasync(b->fd) < 0) {
    if (errno != EINTR)
      return -errno;
  }
  return 0;
}

static int file_pwrite(struct backend *b, const void *buf, uint32_t len, uint64_t off, bool fua)
{
  struct file_backend *fb = fb_of(b);
  const char *p = buf;
  bool dsync = fua && !atomic_load_explicit(&fb->no_dsync, memory_order_relaxed);
  while (len > 0) {
    ssize_t r;
    if (dsync) {
      struct iovec iov = { (void *)p, len };
      r = pwritev2(b->fd, &iov, 1, (off_t)off, RWF_DSYNC);
      if (r < 0 && unsupported(errno)) {
        feature_missing(b, &fb->no_dsync, "pwritev2(RWF_DSYNC)", errno);
        dsync = false;
        continue;
      }
    } else {
      r = pwrite(b->fd, p, len, (off_t)off);
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += r;
    off += (uint64_t)r;
    len -= (uint32_t)r;
  }
  if (fua && !dsync)
    return file_flush(b);
  return 0;
}

static int write_zeroes(struct backend *b, uint64_t len, uint64_t off)
{
  while (len > 0) {
    size_t n = (size_t)MIN(len, (uint64_t)ZERO_CHUNK);
    if (pwrite_full(b->fd, zero_buf, n, (off_t)off) < 0)
      return -errno;
    off += n;
    len -= n;
  }
  return 0;
}

/* fallocate with mode; 1 if the mode is unsupported (flag set), 0 or -errno. */
static int try_fallocate(struct backend *b, _Atomic bool *flag, const char *what, int mode,
                         uint64_t len, uint64_t off)
{
  if (atomic_load_explicit(flag, memory_order_relaxed))
    return 1;
  while (fallocate(b->fd, mode, (off_t)off, (off_t)len) < 0) {
    if (errno == EINTR)
      continue;
    if (unsupported(errno)) {
      feature_missing(b, flag, what, errno);
      return 1;
    }
    return -errno;
  }
  return 0;
}

static int file_trim(struct backend *b, uint32_t len, uint64_t off)
{
  if (b->is_block_device)
    return 0;
  int r = try_fallocate(b, &fb_of(b)->no_punch, "fallocate(PUNCH_HOLE)",
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, len, off);
  return r > 0 ? 0 : r;   /* trim is advisory */
}

static int file_zero(struct backend *b, uint32_t len, uint64_t off, bool may_trim)
{
  struct file_backend *fb = fb_of(b);
  int r;
  if (b->is_block_device) {
    if (!atomic_load_explicit(&fb->no_zeroout, memory_order_relaxed) &&
        off % 512 == 0 && len % 512 == 0) {
      uint64_t range[2] = { off, len };
      while ((r = ioctl(b->fd, BLKZEROOUT, range)) < 0 && errno == EINTR)
        ;
      if (r == 0)
        return 0;
      if (!unsupported(errno) && errno != EINVAL)
        return -errno;
      feature_missing(b, &fb->no_zeroout, "BLKZEROOUT", errno);
    }
    return write_zeroes(b, len, off);
  }
  if (may_trim) {
    r = try_fallocate(b, &fb->no_punch, "fallocate(PUNCH_HOLE)",
                      FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, len, off);
    if (r <= 0)
      return r;
  }
  r = try_fallocate(b, &fb->no_zero_range, "fallocate(ZERO_RANGE)",
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, len, off);
  if (r <= 0)
    return r;
  return write_zeroes(b, len, off);
}

static int file_cache(struct backend *b, uint32_t len, uint64_t off)
{
  int r = posix_fadvise(b->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
  return r == 0 || unsupported(r) ? 0 : -r;   /* a hint: refusal is not an error */
}

/* Calls fn for one extent; 1 means stop (0 returned to our caller). */
static int emit(disk_extent_fn fn, void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  int r = fn(opaque, off, len, flags);
  return r < 0 ? r : (r ? 1 : 0);
}

static int file_extents(struct backend *b, uint64_t off, uint64_t len, disk_extent_fn fn,
                        void *opaque)
{
  uint64_t end = MIN(off + len, b->size);
  if (off >= end)
    return 0;
  if (b->is_block_device) {
    int r = emit(fn, opaque, off, end - off, 0);
    return r < 0 ? r : 0;
  }
  uint64_t pos = off;
  while (pos < end) {
    /* A hole from pos to the next data, then data up to the next hole. */
    uint64_t data = end;
    off_t d = lseek(b->fd, (off_t)pos, SEEK_DATA);
    if (d >= 0)
      data = MIN((uint64_t)d, end);
    else if (errno == EINVAL || unsupported(errno))
      data = pos;                    /* no hole reporting here: all data */
    else if (errno != ENXIO)         /* ENXIO: no data after pos */
      return -errno;
    int r;
    if (data > pos) {
      if ((r = emit(fn, opaque, pos, data - pos, DISK_EXTENT_HOLE | DISK_EXTENT_ZERO)))
        return r < 0 ? r : 0;
      pos = data;
      if (pos >= end)
        break;
    }
    uint64_t hole = end;
    off_t h = d >= 0 ? lseek(b->fd, (off_t)pos, SEEK_HOLE) : (off_t)end;
    if (h >= 0)
      hole = MIN((uint64_t)h, end);
    else if (errno != ENXIO)
      return -errno;
    if (hole <= pos)
      hole = end;                    /* raced with a write: call the rest data */
    if ((r = emit(fn, opaque, pos, hole - pos, 0)))
      return r < 0 ? r : 0;
    pos = hole;
  }
  return 0;
}

static uint64_t file_allocated(struct backend *b)
{
  if (b->is_block_device)
    return b->size;
  struct stat st;
  if (fstat(b->fd, &st) < 0)
    return 0;
  return (uint64_t)st.st_blocks * 512;
}

static void file_close(struct backend *b)
{
  close(b->fd);
  free(b);
}

static const struct backend_ops file_ops = {
  .name = "file",
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .trim = file_trim,
  .zero = file_zero,
  .cache = file_cache,
  .extents = file_extents,
  .allocated = file_allocated,
  .close = file_close,
};

struct backend *backend_file_open(const char *path, const char *disk_name, char *err,
                                  size_t errlen)
{
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "cannot open image %s: %s", path, strerror(errno));
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) < 0) {
    snprintf(err, errlen, "cannot stat image %s: %s", path, strerror(errno));
    close(fd);
    return NULL;
  }
  uint64_t size;
  bool blk = S_ISBLK(st.st_mode);
  if (blk) {
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
      snprintf(err, errlen, "cannot get the size of block device %s: %s", path,
               strerror(errno));
      close(fd);
      return NULL;
    }
  } else if (S_ISREG(st.st_mode)) {
    size = (uint64_t)st.st_size;
  } else {
    snprintf(err, errlen, "image %s is neither a regular file nor a block device", path);
    close(fd);
    return NULL;
  }
  struct file_backend *fb = calloc(1, sizeof *fb);
  if (!fb) {
    snprintf(err, errlen, "out of memory");
    close(fd);
    return NULL;
  }
  fb->b.ops = &file_ops;
  fb->b.fd = fd;
  fb->b.size = size;
  fb->b.is_block_device = blk;
  fb->b.disk_name = disk_name;
  return &fb->b;
}
