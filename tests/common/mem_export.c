/* mem_export: see mem_export.h. */
#include "mem_export.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

static unsigned char mem[MEM_EXPORT_SIZE];
static bool dirty[MEM_EXPORT_SIZE / MEM_EXPORT_GRAN];
static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;
static int handle_token;

static const char *const contexts[] = { "base:allocation", "ferry:dirty" };

void mem_export_reset(void)
{
  memset(mem, 0, sizeof mem);
  memset(dirty, 0, sizeof dirty);
}

unsigned char *mem_export_data(void) { return mem; }

static void *m_open(void *ctx, const char *name)
{
  return (strcmp(name, "mem") == 0 || strcmp(name, "mem2") == 0) ? &handle_token : NULL;
}
static void m_close(void *h) {}
static void m_list(void *ctx, void (*fn)(void *, const char *, const char *), void *opaque)
{
  fn(opaque, "mem", "memory export");
  fn(opaque, "mem2", NULL);
}
static uint64_t m_size(void *h) { return MEM_EXPORT_SIZE; }
static const char *m_desc(void *h) { return "memory export"; }

static void mark(uint64_t off, uint32_t len)
{
  if (len == 0)
    return;
  for (uint64_t i = off / MEM_EXPORT_GRAN; i <= (off + len - 1) / MEM_EXPORT_GRAN; i++)
    dirty[i] = true;
}

static int m_pread(void *h, void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  if (off + len > MEM_EXPORT_SIZE)
    return -EIO;   /* the server must have refused this already */
  pthread_mutex_lock(&mem_lock);
  memcpy(buf, mem + off, len);
  pthread_mutex_unlock(&mem_lock);
  return 0;
}
static int m_pwrite(void *h, const void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  if (off + len > MEM_EXPORT_SIZE)
    return -EIO;
  if ((flags & NBD_EXPORT_NOWAIT) && (off & 1))
    return -EAGAIN;  /* exercise the worker path: odd offsets "would block" */
  pthread_mutex_lock(&mem_lock);
  memcpy(mem + off, buf, len);
  mark(off, len);
  pthread_mutex_unlock(&mem_lock);
  return 0;
}
static int m_flush(void *h) { return 0; }
static int m_zero(void *h, uint32_t len, uint64_t off, unsigned flags)
{
  if (off + len > MEM_EXPORT_SIZE)
    return -EIO;
  pthread_mutex_lock(&mem_lock);
  memset(mem + off, 0, len);
  mark(off, len);
  pthread_mutex_unlock(&mem_lock);
  return 0;
}
static int m_cache(void *h, uint32_t len, uint64_t off) { return 0; }
static int m_block_status(void *h, unsigned ctx, uint64_t off, uint64_t len, nbd_extent_fn fn,
                          void *opaque)
{
  if (off + len > MEM_EXPORT_SIZE)
    return -EIO;
  uint64_t pos = off;
  while (pos < off + len) {
    uint64_t next = (pos / MEM_EXPORT_GRAN + 1) * MEM_EXPORT_GRAN;
    uint32_t flags;
    if (ctx == 0) {
      bool zero = true;
      for (uint64_t i = pos; i < next && zero; i++)
        zero = mem[i] == 0;
      flags = zero ? 2u : 0u;
    } else {
      flags = dirty[pos / MEM_EXPORT_GRAN] ? 1u : 0u;
    }
    int r = fn(opaque, pos, next - pos, flags);
    if (r < 0)
      return r;
    if (r > 0)
      break;
    pos = next;
  }
  return 0;
}

const struct nbd_exports mem_exports = {
  .ctx = NULL,
  .meta_contexts = contexts,
  .n_meta_contexts = 2,
  .open = m_open,
  .close = m_close,
  .list = m_list,
  .size = m_size,
  .description = m_desc,
  .pread = m_pread,
  .pwrite = m_pwrite,
  .flush = m_flush,
  .trim = m_zero,
  .zero = m_zero,
  .cache = m_cache,
  .block_status = m_block_status,
};
