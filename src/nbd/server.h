/* server: the NBD server (fixed newstyle handshake, transmission phase) over
 * any connected stream socket.  It knows nothing of disks: exports are reached
 * through the nbd_exports ops table that the embedding program supplies
 * (ferryd maps it onto the disk service; the fuzzer onto memory).
 *
 * Thread model: nbd_serve_connection() runs one connection on the calling
 * thread plus `workers` helper threads of its own.  The calling thread reads
 * requests; cheap requests (reads served from the page cache, writes that
 * need no wait) run inline and their replies are batched into one sendmsg;
 * requests that may block (FLUSH, FUA, cache misses, writes waiting for a CBT
 * commit or the rate limit) go to the connection's workers, so many requests
 * are in flight at once and replies go out in completion order.
 * With workers == 0 everything runs inline (the fuzzer uses this). */
#ifndef FERRY_NBD_SERVER_H
#define FERRY_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

struct nbd_conn;

/* Extent callback used by block status (same contract as disk_extent_fn). */
typedef int (*nbd_extent_fn)(void *opaque, uint64_t off, uint64_t len, uint32_t flags);

#define NBD_EXPORT_NOWAIT 2u   /* same value as DISK_IO_NOWAIT */
#define NBD_EXPORT_FUA    1u   /* same value as DISK_IO_FUA */
#define NBD_EXPORT_MAY_TRIM 4u /* same value as DISK_IO_MAY_TRIM */

struct nbd_exports {
  void *ctx;
  /* Meta contexts every export offers, e.g. {"base:allocation","ferry:dirty"};
   * block_status receives the index into this array. */
  const char *const *meta_contexts;
  unsigned n_meta_contexts;

  /* Returns an opaque handle (a reference) or NULL if there is no such export. */
  void *(*open)(void *ctx, const char *name);
  void (*close)(void *handle);
  /* Calls fn(opaque, name, description) for each export; for NBD_OPT_LIST. */
  void (*list)(void *ctx, void (*fn)(void *opaque, const char *name, const char *desc),
               void *opaque);
  uint64_t (*size)(void *handle);
  const char *(*description)(void *handle);  /* may return NULL */

  /* All return 0 or a negative errno; -EAGAIN only when flags has NOWAIT. */
  int (*pread)(void *handle, void *buf, uint32_t len, uint64_t off, unsigned flags);
  int (*pwrite)(void *handle, const void *buf, uint32_t len, uint64_t off, unsigned flags);
  int (*flush)(void *handle);
  int (*trim)(void *handle, uint32_t len, uint64_t off, unsigned flags);
  int (*zero)(void *handle, uint32_t len, uint64_t off, unsigned flags);
  int (*cache)(void *handle, uint32_t len, uint64_t off);
  int (*block_status)(void *handle, unsigned context, uint64_t off, uint64_t len,
                      nbd_extent_fn fn, void *opaque);
  /* Connection bookkeeping (clients per export, forced disconnects). */
  void (*attached)(void *handle, struct nbd_conn *conn);
  void (*detached)(void *handle, struct nbd_conn *conn);
};

struct nbd_conn_options {
  unsigned workers;         /* helper threads for blocking requests; 0 = inline only */
  const char *peer;         /* for log lines, e.g. "unix" or "127.0.0.1:51234" */
};

/* Serves one client on fd (already connected) until it disconnects, sends
 * garbage, or nbd_conn_shutdown() is called; closes fd.  Returns 0 after an
 * orderly end (NBD_CMD_DISC, ABORT, EOF between requests), -1 otherwise. */
int nbd_serve_connection(const struct nbd_exports *ex, int fd,
                         const struct nbd_conn_options *opt);

/* The same with separate input and output descriptors (both closed at the
 * end); for the fuzzer and tests, which feed a pipe and discard replies. */
int nbd_serve_fds(const struct nbd_exports *ex, int in_fd, int out_fd,
                  const struct nbd_conn_options *opt);

/* Asks a connection to stop: no new requests are read, requests in flight
 * finish and are answered, then the connection closes.  Safe from any thread
 * while the connection is attached. */
void nbd_conn_shutdown(struct nbd_conn *conn);
const char *nbd_conn_export_name(const struct nbd_conn *conn);

/* Maps an errno to an NBD error (one place for the whole program). */
uint32_t nbd_errno_to_wire(int err);

#endif
