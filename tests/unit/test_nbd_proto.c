/* test_nbd_proto: the NBD server against a real client (libnbd) over a
 * socketpair, with the memory export: handshake variants, every command,
 * both meta contexts, the error replies for bad requests, many requests in
 * flight.  Exits non-zero on the first failed check. */
#include <errno.h>
#include <inttypes.h>
#include <libnbd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "mem_export.h"
#include "nbd/server.h"

static int failures;
#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
      fprintf(stderr, __VA_ARGS__);                                          \
      fprintf(stderr, " (libnbd: %s)\n", nbd_get_error() ? nbd_get_error() : "-"); \
      failures++;                                                            \
      return;                                                                \
    }                                                                        \
  } while (0)

struct server_arg {
  int fd;
  unsigned workers;
  int result;
};

static void *server_main(void *p)
{
  struct server_arg *a = p;
  struct nbd_conn_options opt = { .workers = a->workers, .peer = "test" };
  a->result = nbd_serve_connection(&mem_exports, a->fd, &opt);
  return NULL;
}

/* Connects a libnbd handle to a fresh server thread. */
static struct nbd_handle *connect_to(pthread_t *t, struct server_arg *a, unsigned workers,
                                     bool structured, const char *export_name)
{
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return NULL;
  a->fd = sv[0];
  a->workers = workers;
  pthread_create(t, NULL, server_main, a);
  struct nbd_handle *h = nbd_create();
  nbd_set_request_structured_replies(h, structured);
  nbd_set_export_name(h, export_name);
  if (structured) {
    nbd_add_meta_context(h, "base:allocation");
    nbd_add_meta_context(h, "ferry:dirty");
  }
  if (nbd_connect_socket(h, sv[1]) < 0) {
    nbd_close(h);
    return NULL;
  }
  return h;
}

static void finish(struct nbd_handle *h, pthread_t t)
{
  nbd_shutdown(h, 0);
  nbd_close(h);
  pthread_join(t, NULL);
}

struct extents {
  uint64_t base_flags_at_0;
  uint32_t entries[64];
  size_t n;
  char ctx[32];
};

static int extent_cb(void *user, const char *metacontext, uint64_t offset, uint32_t *entries,
                     size_t nr, int *error)
{
  struct extents *e = user;
  if (strcmp(metacontext, "ferry:dirty") != 0)
    return 0;
  e->n = nr < 64 ? nr : 64;
  memcpy(e->entries, entries, e->n * sizeof *entries);
  return 0;
}

static void test_structured_io(unsigned workers)
{
  pthread_t t;
  struct server_arg a;
  mem_export_reset();
  struct nbd_handle *h = connect_to(&t, &a, workers, true, "mem");
  CHECK(h, "connect");
  CHECK(nbd_get_size(h) == MEM_EXPORT_SIZE, "size");
  CHECK(nbd_can_multi_conn(h) == 1, "multi-conn advertised");
  CHECK(nbd_can_meta_context(h, "ferry:dirty") == 1, "ferry:dirty negotiated");
  CHECK(nbd_can_meta_context(h, "base:allocation") == 1, "base:allocation negotiated");

  /* Unaligned write and read back, inline and (odd offset) worker paths. */
  char buf[5000], back[5000];
  for (size_t i = 0; i < sizeof buf; i++)
    buf[i] = (char)(i * 7 + 3);
  CHECK(nbd_pwrite(h, buf, 3333, 1000, 0) == 0, "write at 1000");
  CHECK(nbd_pwrite(h, buf, 4097, 200001, 0) == 0, "write at odd offset");
  CHECK(nbd_pwrite(h, buf, 512, 300000, LIBNBD_CMD_FLAG_FUA) == 0, "FUA write");
  CHECK(nbd_pread(h, back, 3333, 1000, 0) == 0, "read");
  CHECK(memcmp(back, buf, 3333) == 0, "content at 1000");
  CHECK(nbd_pread(h, back, 4097, 200001, 0) == 0, "read odd");
  CHECK(memcmp(back, buf, 4097) == 0, "content at 200001");
  CHECK(memcmp(mem_export_data() + 1000, buf, 3333) == 0, "bytes reached the export");
  CHECK(nbd_flush(h, 0) == 0, "flush");
  CHECK(nbd_cache(h, 65536, 0, 0) == 0, "cache");

  /* Dirty map: 64 KiB regions 0, 3 (200001..204097 lies in region 3) and 4. */
  struct extents e = { 0 };
  CHECK(nbd_block_status(h, 6 * 65536, 0, (nbd_extent_callback){ .callback = extent_cb,
                                                                    .user_data = &e }, 0) == 0,
        "block status");
  CHECK(e.n >= 6, "dirty extents: got %zu entries", e.n);
  /* Expect: [64K dirty][128K clean][128K dirty][64K clean] */
  CHECK(e.entries[0] == 65536 && e.entries[1] == 1, "region 0 dirty (len %u flags %u)",
        e.entries[0], e.entries[1]);
  CHECK(e.entries[2] == 131072 && e.entries[3] == 0, "regions 1-2 clean (len %u flags %u)",
        e.entries[2], e.entries[3]);
  CHECK(e.entries[4] == 131072 && e.entries[5] == 1, "regions 3-4 dirty (len %u flags %u)",
        e.entries[4], e.entries[5]);

  /* Zero and trim. */
  CHECK(nbd_zero(h, 1000, 1000, 0) == 0, "zero");
  CHECK(nbd_pread(h, back, 1000, 1000, 0) == 0, "read zeroed");
  for (int i = 0; i < 1000; i++)
    CHECK(back[i] == 0, "zeroed byte %d", i);
  CHECK(nbd_zero(h, 4096, 8192, LIBNBD_CMD_FLAG_NO_HOLE | LIBNBD_CMD_FLAG_FUA) == 0,
        "zero no-hole fua");
  CHECK(nbd_trim(h, 4096, 200000, 0) == 0, "trim");

  /* Bad requests get errors and the connection goes on. */
  nbd_set_strict_mode(h, 0);
  CHECK(nbd_pread(h, back, 512, MEM_EXPORT_SIZE - 256, 0) == -1, "read past end refused");
  CHECK(nbd_get_errno() == EINVAL, "read past end: EINVAL (got %d)", nbd_get_errno());
  CHECK(nbd_pwrite(h, buf, 512, MEM_EXPORT_SIZE, 0) == -1, "write past end refused");
  CHECK(nbd_get_errno() == ENOSPC, "write past end: ENOSPC (got %d)", nbd_get_errno());
  CHECK(nbd_pread(h, back, 512, UINT64_MAX - 100, 0) == -1, "offset overflow refused");
  char *big = malloc(33 * 1024 * 1024);
  CHECK(big, "malloc");
  CHECK(nbd_pread(h, big, 33 * 1024 * 1024, 0, 0) == -1, "oversized read refused");
  CHECK(nbd_get_errno() == EOVERFLOW || nbd_get_errno() == EINVAL, "oversized read errno %d",
        nbd_get_errno());
  CHECK(nbd_pwrite(h, big, 33 * 1024 * 1024, 0, 0) == -1, "oversized write refused");
  free(big);
  CHECK(nbd_pread(h, back, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE) == -1, "bad flag refused");
  CHECK(nbd_pread(h, back, 100, 1000, 0) == 0, "connection still usable after errors");

  /* Many requests in flight. */
  enum { N = 64 };
  static char bufs[N][4096];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    memset(bufs[i], 'a' + i % 26, 4096);
    cookies[i] = nbd_aio_pwrite(h, bufs[i], 4096, (uint64_t)i * 8192 + (i & 1),
                                NBD_NULL_COMPLETION, 0);
    CHECK(cookies[i] > 0, "aio write %d", i);
  }
  for (int i = 0; i < N; i++) {
    while (nbd_aio_command_completed(h, cookies[i]) == 0)
      CHECK(nbd_poll(h, -1) >= 0, "poll");
  }
  for (int i = 0; i < N; i++)
    CHECK(memcmp(mem_export_data() + (uint64_t)i * 8192 + (i & 1), bufs[i], 4096) == 0,
          "aio write %d landed", i);
  finish(h, t);
  CHECK(a.result == 0, "orderly end");
}

static void test_simple_replies(void)
{
  pthread_t t;
  struct server_arg a;
  mem_export_reset();
  struct nbd_handle *h = connect_to(&t, &a, 2, false, "mem2");
  CHECK(h, "connect without structured replies");
  CHECK(nbd_get_structured_replies_negotiated(h) == 0, "simple replies");
  char buf[777];
  memset(buf, 0x5a, sizeof buf);
  CHECK(nbd_pwrite(h, buf, sizeof buf, 12345, 0) == 0, "write");
  char back[777];
  CHECK(nbd_pread(h, back, sizeof back, 12345, 0) == 0, "read");
  CHECK(memcmp(buf, back, sizeof buf) == 0, "content");
  nbd_set_strict_mode(h, 0);
  CHECK(nbd_pread(h, back, 10, MEM_EXPORT_SIZE, 0) == -1, "past end");
  CHECK(nbd_get_errno() == EINVAL, "EINVAL (got %d)", nbd_get_errno());
  finish(h, t);
}

static int list_cb(void *user, const char *name, const char *desc)
{
  int *n = user;
  if (strcmp(name, "mem") == 0 || strcmp(name, "mem2") == 0)
    (*n)++;
  return 0;
}

static void test_list_and_unknown(void)
{
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
  pthread_t t;
  struct server_arg a = { .fd = sv[0], .workers = 0 };
  pthread_create(&t, NULL, server_main, &a);
  struct nbd_handle *h = nbd_create();
  nbd_set_opt_mode(h, true);
  CHECK(nbd_connect_socket(h, sv[1]) == 0, "connect in opt mode");
  int n = 0;
  CHECK(nbd_opt_list(h, (nbd_list_callback){ .callback = list_cb, .user_data = &n }) >= 0,
        "opt list");
  CHECK(n == 2, "both exports listed (%d)", n);
  nbd_set_export_name(h, "nope");
  CHECK(nbd_opt_go(h) == -1, "unknown export refused");
  nbd_set_export_name(h, "mem");
  CHECK(nbd_opt_info(h) == 0, "info mem");
  CHECK(nbd_get_size(h) == MEM_EXPORT_SIZE, "info size");
  CHECK(nbd_opt_abort(h) == 0, "abort");
  nbd_close(h);
  pthread_join(t, NULL);
  CHECK(a.result == 0, "abort is an orderly end");
}

int main(void)
{
  log_set_level(getenv("NBD_TEST_DEBUG") ? LOG_DEBUG : LOG_WARN);
  test_structured_io(0);
  printf("structured IO, inline only: %s\n", failures ? "FAIL" : "ok");
  test_structured_io(3);
  printf("structured IO, 3 workers: %s\n", failures ? "FAIL" : "ok");
  test_simple_replies();
  printf("simple replies: %s\n", failures ? "FAIL" : "ok");
  test_list_and_unknown();
  printf("list, info, unknown export, abort: %s\n", failures ? "FAIL" : "ok");
  return failures ? 1 : 0;
}
