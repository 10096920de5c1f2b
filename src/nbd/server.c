/* server: the NBD protocol, server side: fixed newstyle handshake and the
 * transmission phase, over one connected stream.
 *
 * DESIGN
 * The connection's own thread is the reader.  It keeps an input buffer and
 * parses as many requests as the buffer holds.  Each request is first tried
 * inline with NBD_EXPORT_NOWAIT: a read served from the page cache, a write
 * whose dirty-map mark is already durable.  Inline replies are gathered in a
 * batch (headers + data slices in an arena) and sent with one writev when the
 * input buffer holds no further complete request, so a client at queue depth
 * 16 costs one read and one write system call per batch, not per request.
 * A request that would block (-EAGAIN from the export, FLUSH, FUA, oversized
 * data) is handed to the connection's worker threads, which run it and send
 * their own reply under the send lock.  Replies may thus leave out of order,
 * as NBD allows; FLUSH is handled by the export, which makes durable every
 * write already completed on any connection (so CAN_MULTI_CONN holds).
 *
 * Bad input: a request with a bad magic, or a handshake that breaks the
 * protocol, ends the connection (there is no way to resynchronise); a request
 * that is well framed but invalid (range, flags, size) gets an NBD error and
 * the connection goes on.  Nothing reaches the export before it is validated.
 *
 * Memory per connection is bounded: the input buffer, the batch arena, and at
 * most MAX_INFLIGHT_BYTES of payload handed to workers (the reader waits for
 * workers to finish before it reads more).
 *
 * Thread model: the reader owns the handshake state, the input buffer and the
 * batch.  `queue_lock` guards the worker queue and in-flight counters;
 * `send_lock` serialises whole replies on the socket. */
#include "nbd/server.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <endian.h>

#include "common/log.h"
#include "common/util.h"
#include "nbd/protocol.h"

#define INBUF_SIZE          (256 * 1024)
#define ARENA_SIZE          (1024 * 1024)
#define BATCH_MAX_REPLIES   64
#define BATCH_MAX_IOV       (BATCH_MAX_REPLIES * 2)
#define MAX_INFLIGHT_BYTES  (64u * 1024 * 1024)
#define MAX_INFLIGHT_REQS   256
#define MAX_EXTENTS         1024            /* per context per BLOCK_STATUS reply */
#define MAX_META_CONTEXTS   8
#define HANDSHAKE_TIMEOUT_S 60
#define DISCARD_LIMIT       (64u * 1024 * 1024) /* largest oversized payload we skip */

struct request {
  struct request *next;        /* worker queue link */
  uint16_t flags, type;
  uint64_t cookie, offset;
  uint32_t count;
  char *buf;                   /* payload (write) or data (read), malloc'ed */
};

/* One inline reply waiting in the batch: its header bytes live here. */
struct batch_hdr {
  unsigned char bytes[32];
};

struct nbd_conn {
  const struct nbd_exports *ex;
  int in_fd, out_fd;
  bool out_is_socket;
  const char *peer;

  /* Handshake results. */
  bool fixed, no_zeroes, structured;
  char *export_name;
  void *handle;
  bool attached;                           /* ex->attached() called for handle */
  uint64_t size;
  uint16_t tflags;
  char *meta_export;                       /* export the meta selection is for */
  bool meta_selected[MAX_META_CONTEXTS];
  unsigned n_meta_selected;

  /* Input buffer: bytes [in_start, in_end) are unread. */
  char *inbuf;
  size_t in_start, in_end;
  bool in_eof;

  /* Batch of inline replies. */
  struct iovec iov[BATCH_MAX_IOV];
  unsigned niov;
  struct batch_hdr hdrs[BATCH_MAX_REPLIES];
  unsigned nhdrs;
  char *arena;
  size_t arena_used;
  char *ext_buf;                           /* block status payload scratch */

  /* Workers. */
  unsigned nworkers;
  pthread_t *workers;
  pthread_mutex_t queue_lock;
  pthread_cond_t queue_cond;               /* workers wait for requests */
  pthread_cond_t done_cond;                /* reader waits for capacity / drain */
  struct request *queue_head, *queue_tail;
  unsigned inflight_reqs;
  size_t inflight_bytes;
  bool workers_stop;

  pthread_mutex_t send_lock;
  _Atomic bool dead;                       /* output broken: stop sending */
  _Atomic bool stopping;                   /* nbd_conn_shutdown() called */
};

/* --- errors --- */

uint32_t nbd_errno_to_wire(int err)
{
  switch (err) {
  case 0: return NBD_SUCCESS;
  case EROFS:
  case EPERM: return NBD_EPERM;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC:
  case EFBIG:
  case EDQUOT: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}

/* --- low level output --- */

static void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* Writes all of iov; caller holds send_lock (or is in the handshake). */
static int conn_writev_all(struct nbd_conn *c, struct iovec *iov, int n)
{
  if (atomic_load(&c->dead))
    return -1;
  while (n > 0) {
    ssize_t r;
    if (c->out_is_socket) {
      /* MSG_NOSIGNAL: a client that hangs up must not kill the daemon. */
      struct msghdr mh = { .msg_iov = iov, .msg_iovlen = n > IOV_MAX ? IOV_MAX : n };
      r = sendmsg(c->out_fd, &mh, MSG_NOSIGNAL);
    } else {
      r = writev(c->out_fd, iov, n > IOV_MAX ? IOV_MAX : n);
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (!atomic_exchange(&c->dead, true))
        log_info(c->export_name, "client %s: write failed: %s", c->peer, strerror(errno));
      return -1;
    }
    while (n > 0 && (size_t)r >= iov->iov_len) {
      r -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *)iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  return 0;
}

static int conn_write(struct nbd_conn *c, const void *buf, size_t len)
{
  struct iovec iov = { (void *)buf, len };
  return conn_writev_all(c, &iov, 1);
}

/* --- low level input --- */

/* Makes at least `want` bytes available in the input buffer (want <=
 * INBUF_SIZE).  Returns 0, or -1 on EOF/error (errno 0 for a clean EOF at a
 * message boundary). */
static int conn_fill(struct nbd_conn *c, size_t want)
{
  if (c->in_end - c->in_start >= want)
    return 0;
  if (c->in_start > 0) {
    memmove(c->inbuf, c->inbuf + c->in_start, c->in_end - c->in_start);
    c->in_end -= c->in_start;
    c->in_start = 0;
  }
  while (c->in_end < want) {
    ssize_t r = read(c->in_fd, c->inbuf + c->in_end, INBUF_SIZE - c->in_end);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      c->in_eof = true;
      errno = c->in_end ? EPIPE : 0;
      return -1;
    }
    c->in_end += r;
  }
  return 0;
}

/* Copies len bytes of input into dst (buffered part first, rest directly). */
static int conn_read(struct nbd_conn *c, void *dst, size_t len)
{
  size_t have = c->in_end - c->in_start;
  size_t take = MIN(have, len);
  memcpy(dst, c->inbuf + c->in_start, take);
  c->in_start += take;
  if (take == len)
    return 0;
  if (read_full(c->in_fd, (char *)dst + take, len - take) < 0) {
    if (errno == 0)
      errno = EPIPE;
    return -1;
  }
  return 0;
}

static int conn_discard(struct nbd_conn *c, uint64_t len)
{
  char scratch[16384];
  while (len > 0) {
    size_t n = MIN(len, sizeof scratch);
    if (conn_read(c, scratch, n) < 0)
      return -1;
    len -= n;
  }
  return 0;
}

/* ===================== handshake ===================== */

static int send_option_reply(struct nbd_conn *c, uint32_t opt, uint32_t type,
                             const void *data, uint32_t len)
{
  unsigned char hdr[20];
  put64(hdr, NBD_REP_MAGIC);
  put32(hdr + 8, opt);
  put32(hdr + 12, type);
  put32(hdr + 16, len);
  struct iovec iov[2] = { { hdr, 20 }, { (void *)data, len } };
  return conn_writev_all(c, iov, len ? 2 : 1);
}

static int send_option_error(struct nbd_conn *c, uint32_t opt, uint32_t err, const char *msg)
{
  log_debug(c->export_name, "client %s: option %u refused: %s", c->peer, opt, msg);
  return send_option_reply(c, opt, err, msg, (uint32_t)strlen(msg));
}

struct list_ctx {
  struct nbd_conn *c;
  int err;
};

static void list_one(void *opaque, const char *name, const char *desc)
{
  struct list_ctx *lc = opaque;
  size_t nl = strlen(name);
  size_t dl = desc ? strlen(desc) : 0;
  if (lc->err || nl > NBD_MAX_STRING || dl > NBD_MAX_STRING)
    return;
  unsigned char buf[4 + 2 * NBD_MAX_STRING];
  put32(buf, (uint32_t)nl);
  memcpy(buf + 4, name, nl);
  if (dl)
    memcpy(buf + 4 + nl, desc, dl);
  if (send_option_reply(lc->c, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + nl + dl)) < 0)
    lc->err = -1;
}

/* Which of the export's contexts a query names: exact names select one;
 * "ns:" (namespace only) matches every context of that namespace, for LIST
 * only.  Returns how many indices were written to out. */
static unsigned match_meta_query(const struct nbd_exports *ex, const char *q, size_t qlen,
                                 bool listing, unsigned *out)
{
  unsigned n = 0;
  for (unsigned i = 0; i < ex->n_meta_contexts && i < MAX_META_CONTEXTS; i++) {
    const char *name = ex->meta_contexts[i];
    size_t nlen = strlen(name);
    if (qlen == nlen && memcmp(q, name, nlen) == 0)
      out[n++] = i;
    else if (listing && qlen > 0 && q[qlen - 1] == ':' && qlen <= nlen &&
             memcmp(q, name, qlen) == 0)
      out[n++] = i;
  }
  return n;
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
static int handle_meta_context(struct nbd_conn *c, uint32_t opt, const unsigned char *data,
                               uint32_t len)
{
  bool listing = opt == NBD_OPT_LIST_META_CONTEXT;
  if (!listing && !c->structured)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID,
                             "structured replies must be negotiated first");
  if (len < 8)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "meta context option too short");
  uint32_t nlen = get32(data);
  if (nlen > NBD_MAX_STRING || (uint64_t)nlen + 8 > len)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
  char name[NBD_MAX_STRING + 1];
  memcpy(name, data + 4, nlen);
  name[nlen] = '\0';
  uint32_t nq = get32(data + 4 + nlen);
  size_t pos = 8 + nlen;

  /* Validate every query before answering anything. */
  size_t scan = pos;
  for (uint32_t i = 0; i < nq; i++) {
    if (scan + 4 > len)
      return send_option_error(c, opt, NBD_REP_ERR_INVALID, "truncated meta context query");
    uint32_t ql = get32(data + scan);
    if (ql > NBD_MAX_STRING || scan + 4 + ql > len)
      return send_option_error(c, opt, NBD_REP_ERR_INVALID, "bad meta context query length");
    scan += 4 + ql;
  }
  if (scan != len)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "trailing bytes in option");

  void *h = c->ex->open(c->ex->ctx, name);
  if (!h)
    return send_option_error(c, opt, NBD_REP_ERR_UNKNOWN, "no such export");
  c->ex->close(h);

  bool selected[MAX_META_CONTEXTS] = { false };
  if (nq == 0) {
    if (listing)
      for (unsigned i = 0; i < c->ex->n_meta_contexts && i < MAX_META_CONTEXTS; i++)
        selected[i] = true;
  } else {
    for (uint32_t i = 0; i < nq; i++) {
      uint32_t ql = get32(data + pos);
      unsigned idx[MAX_META_CONTEXTS];
      unsigned n = match_meta_query(c->ex, (const char *)data + pos + 4, ql, listing, idx);
      for (unsigned k = 0; k < n; k++)
        selected[idx[k]] = true;
      pos += 4 + ql;
    }
  }

  if (!listing) {
    free(c->meta_export);
    c->meta_export = strdup(name);
    c->n_meta_selected = 0;
    memcpy(c->meta_selected, selected, sizeof selected);
  }
  for (unsigned i = 0; i < c->ex->n_meta_contexts && i < MAX_META_CONTEXTS; i++) {
    if (!selected[i])
      continue;
    if (!listing)
      c->n_meta_selected++;
    unsigned char buf[4 + NBD_MAX_STRING];
    size_t cl = strlen(c->ex->meta_contexts[i]);
    put32(buf, listing ? 0 : i + 1);
    memcpy(buf + 4, c->ex->meta_contexts[i], cl);
    if (send_option_reply(c, opt, NBD_REP_META_CONTEXT, buf, (uint32_t)(4 + cl)) < 0)
      return -1;
  }
  return send_option_reply(c, opt, NBD_REP_ACK, NULL, 0);
}

static uint16_t transmission_flags(const struct nbd_conn *c)
{
  uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
               NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN |
               NBD_FLAG_SEND_CACHE;
  if (c->structured)
    f |= NBD_FLAG_SEND_DF;   /* reads always go out as one chunk */
  return f;
}

/* Opens the export chosen by GO or EXPORT_NAME. */
static int select_export(struct nbd_conn *c, const char *name, void *h)
{
  c->export_name = strdup(name);
  if (!c->export_name)
    return -1;   /* the caller still owns h */
  c->handle = h;
  c->size = c->ex->size(h);
  c->tflags = transmission_flags(c);
  /* A meta context selection made for another export does not carry over. */
  if (c->n_meta_selected && (!c->meta_export || strcmp(c->meta_export, name) != 0)) {
    c->n_meta_selected = 0;
    memset(c->meta_selected, 0, sizeof c->meta_selected);
  }
  /* Counted as a client before the final handshake reply, so that nothing
   * (a disk removal) can slip in between "connected" and the first request. */
  c->attached = true;
  if (c->ex->attached)
    c->ex->attached(h, c);
  return 0;
}

/* NBD_OPT_INFO and NBD_OPT_GO.  Returns 1 if the export was entered (GO). */
static int handle_info_go(struct nbd_conn *c, uint32_t opt, const unsigned char *data,
                          uint32_t len)
{
  if (len < 6)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "option too short");
  uint32_t nlen = get32(data);
  if (nlen > NBD_MAX_STRING || (uint64_t)nlen + 6 > len)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
  uint16_t ninfo = get16(data + 4 + nlen);
  if ((uint64_t)nlen + 6 + 2 * (uint64_t)ninfo != len)
    return send_option_error(c, opt, NBD_REP_ERR_INVALID, "bad information request count");
  char name[NBD_MAX_STRING + 1];
  memcpy(name, data + 4, nlen);
  name[nlen] = '\0';

  void *h = c->ex->open(c->ex->ctx, name);
  if (!h) {
    log_info(NULL, "client %s asked for unknown export '%s'", c->peer, name);
    return send_option_error(c, opt, NBD_REP_ERR_UNKNOWN, "no such export");
  }

  unsigned char buf[2 + NBD_MAX_STRING + 12];
  uint16_t tflags = transmission_flags(c);
  put16(buf, NBD_INFO_EXPORT);
  put64(buf + 2, c->ex->size(h));
  put16(buf + 10, tflags);
  int r = send_option_reply(c, opt, NBD_REP_INFO, buf, 12);

  /* Block size constraints are always sent: clients must honour them. */
  put16(buf, NBD_INFO_BLOCK_SIZE);
  put32(buf + 2, 1);
  put32(buf + 6, NBD_PREFERRED_BLOCK);
  put32(buf + 10, NBD_MAX_REQUEST);
  if (r == 0)
    r = send_option_reply(c, opt, NBD_REP_INFO, buf, 14);

  for (uint16_t i = 0; i < ninfo && r == 0; i++) {
    uint16_t want = get16(data + 6 + nlen + 2 * i);
    if (want == NBD_INFO_NAME) {
      put16(buf, NBD_INFO_NAME);
      memcpy(buf + 2, name, nlen);
      r = send_option_reply(c, opt, NBD_REP_INFO, buf, 2 + nlen);
    } else if (want == NBD_INFO_DESCRIPTION && c->ex->description) {
      const char *d = c->ex->description(h);
      if (d && strlen(d) <= NBD_MAX_STRING) {
        put16(buf, NBD_INFO_DESCRIPTION);
        memcpy(buf + 2, d, strlen(d));
        r = send_option_reply(c, opt, NBD_REP_INFO, buf, (uint32_t)(2 + strlen(d)));
      }
    }
  }
  if (r < 0 || opt == NBD_OPT_INFO) {
    if (r == 0)
      r = send_option_reply(c, opt, NBD_REP_ACK, NULL, 0);
    c->ex->close(h);
    return r;
  }
  if (select_export(c, name, h) < 0) {
    c->ex->close(h);
    return -1;
  }
  /* From here the handle belongs to the connection and is closed with it. */
  return send_option_reply(c, opt, NBD_REP_ACK, NULL, 0) < 0 ? -1 : 1;
}

/* Runs the option haggling.  Returns 1 when an export is entered, 0 on an
 * orderly ABORT, -1 when the connection must end. */
static int handshake(struct nbd_conn *c)
{
  unsigned char hello[18];
  put64(hello, NBD_MAGIC);
  put64(hello + 8, NBD_IHAVEOPT);
  put16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  if (conn_write(c, hello, sizeof hello) < 0)
    return -1;

  unsigned char cflags[4];
  if (conn_fill(c, 4) < 0 || conn_read(c, cflags, 4) < 0)
    return -1;
  uint32_t client_flags = get32(cflags);
  if (client_flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    log_warn(NULL, "client %s: unknown handshake flags 0x%x, disconnecting", c->peer,
             client_flags);
    return -1;
  }
  c->fixed = client_flags & NBD_FLAG_C_FIXED_NEWSTYLE;
  c->no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES;

  for (unsigned n = 0; n < NBD_MAX_OPTIONS; n++) {
    unsigned char oh[16];
    if (conn_fill(c, 16) < 0 || conn_read(c, oh, 16) < 0)
      return -1;
    if (get64(oh) != NBD_IHAVEOPT) {
      log_warn(NULL, "client %s: bad option magic, disconnecting", c->peer);
      return -1;
    }
    uint32_t opt = get32(oh + 8);
    uint32_t len = get32(oh + 12);
    if (len > NBD_MAX_OPTION_LEN) {
      log_warn(NULL, "client %s: option %u of %u bytes is too large, disconnecting", c->peer,
               opt, len);
      if (c->fixed)
        send_option_error(c, opt, NBD_REP_ERR_TOO_BIG, "option too large");
      return -1;
    }
    unsigned char *data = malloc(len ? len : 1);
    if (!data || conn_read(c, data, len) < 0) {
      free(data);
      return -1;
    }

    int r;
    switch (opt) {
    case NBD_OPT_EXPORT_NAME: {
      char name[NBD_MAX_STRING + 1];
      if (len > NBD_MAX_STRING) {
        r = -1;
        break;
      }
      memcpy(name, data, len);
      name[len] = '\0';
      void *h = c->ex->open(c->ex->ctx, name);
      if (!h) {
        log_info(NULL, "client %s asked for unknown export '%s'", c->peer, name);
        r = -1;   /* EXPORT_NAME has no error reply: the only answer is to hang up */
        break;
      }
      if (select_export(c, name, h) < 0) {
        c->ex->close(h);
        r = -1;
        break;
      }
      unsigned char reply[10 + 124] = { 0 };
      put64(reply, c->size);
      put16(reply + 8, c->tflags);
      r = conn_write(c, reply, c->no_zeroes ? 10 : sizeof reply) < 0 ? -1 : 1;
      break;
    }
    case NBD_OPT_ABORT:
      send_option_reply(c, opt, NBD_REP_ACK, NULL, 0);
      r = 0;
      free(data);
      return 0;
    case NBD_OPT_LIST:
      if (len != 0) {
        r = send_option_error(c, opt, NBD_REP_ERR_INVALID, "LIST takes no data");
      } else {
        struct list_ctx lc = { c, 0 };
        c->ex->list(c->ex->ctx, list_one, &lc);
        r = lc.err ? -1 : send_option_reply(c, opt, NBD_REP_ACK, NULL, 0);
      }
      break;
    case NBD_OPT_STRUCTURED_REPLY:
      if (len != 0)
        r = send_option_error(c, opt, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
      else if (c->structured)
        r = send_option_error(c, opt, NBD_REP_ERR_INVALID, "structured replies already on");
      else {
        c->structured = true;
        r = send_option_reply(c, opt, NBD_REP_ACK, NULL, 0);
      }
      break;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      r = handle_info_go(c, opt, data, len);
      break;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      r = handle_meta_context(c, opt, data, len);
      break;
    case NBD_OPT_STARTTLS:
      r = send_option_error(c, opt, NBD_REP_ERR_UNSUP,
                            "TLS is not offered on the disk service (local socket)");
      break;
    default:
      if (!c->fixed) {
        r = -1;   /* old newstyle clients cannot take an error reply */
        break;
      }
      r = send_option_error(c, opt, NBD_REP_ERR_UNSUP, "option not supported");
      break;
    }
    free(data);
    if (r != 0)
      return r;
  }
  log_warn(NULL, "client %s: more than %d options, disconnecting", c->peer, NBD_MAX_OPTIONS);
  return -1;
}

/* ===================== transmission ===================== */

/* Fills a reply header for a request; returns its length. */
static size_t make_simple_reply(unsigned char *p, uint64_t cookie, uint32_t err)
{
  put32(p, NBD_SIMPLE_REPLY_MAGIC);
  put32(p + 4, err);
  put64(p + 8, cookie);
  return 16;
}

static size_t make_chunk_header(unsigned char *p, uint64_t cookie, uint16_t flags,
                                uint16_t type, uint32_t length)
{
  put32(p, NBD_STRUCTURED_REPLY_MAGIC);
  put16(p + 4, flags);
  put16(p + 6, type);
  put64(p + 8, cookie);
  put32(p + 16, length);
  return 20;
}

/* Header (+ offset for a data chunk) of a successful READ reply. */
static size_t make_read_reply(const struct nbd_conn *c, unsigned char *p,
                              const struct request *r)
{
  if (!c->structured)
    return make_simple_reply(p, r->cookie, 0);
  if (r->count == 0)   /* a data chunk must carry data */
    return make_chunk_header(p, r->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
  size_t n = make_chunk_header(p, r->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                               8 + r->count);
  put64(p + n, r->offset);
  return n + 8;
}

/* Error reply; with structured replies an ERROR chunk carrying msg. */
static int send_error(struct nbd_conn *c, uint64_t cookie, int err, const char *msg)
{
  unsigned char hdr[32];
  uint32_t wire = nbd_errno_to_wire(err);
  struct iovec iov[2];
  int n;
  if (!c->structured) {
    iov[0] = (struct iovec){ hdr, make_simple_reply(hdr, cookie, wire) };
    n = 1;
  } else {
    size_t ml = strlen(msg);
    size_t h = make_chunk_header(hdr, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                                 (uint32_t)(6 + ml));
    put32(hdr + h, wire);
    put16(hdr + h + 4, (uint16_t)ml);
    iov[0] = (struct iovec){ hdr, h + 6 };
    iov[1] = (struct iovec){ (void *)msg, ml };
    n = 2;
  }
  pthread_mutex_lock(&c->send_lock);
  int r = conn_writev_all(c, iov, n);
  pthread_mutex_unlock(&c->send_lock);
  return r;
}

static const char *strerror_short(int err)
{
  switch (err) {
  case EINVAL: return "invalid request";
  case ENOSPC: return "request goes beyond the end of the export";
  case EOVERFLOW: return "request larger than the maximum block size";
  default: return strerror(err);
  }
}

/* Sends the batch of inline replies. */
static void batch_flush(struct nbd_conn *c)
{
  if (c->niov == 0)
    return;
  pthread_mutex_lock(&c->send_lock);
  conn_writev_all(c, c->iov, (int)c->niov);
  pthread_mutex_unlock(&c->send_lock);
  c->niov = 0;
  c->nhdrs = 0;
  c->arena_used = 0;
}

static unsigned char *batch_header(struct nbd_conn *c)
{
  if (c->nhdrs >= BATCH_MAX_REPLIES || c->niov + 2 > BATCH_MAX_IOV)
    batch_flush(c);
  return c->hdrs[c->nhdrs++].bytes;
}

static void batch_add(struct nbd_conn *c, const void *p, size_t len)
{
  c->iov[c->niov++] = (struct iovec){ (void *)p, len };
}

/* --- block status --- */

struct extent_acc {
  unsigned char *out;      /* (length, flags) pairs, big endian */
  unsigned n, max;
  uint64_t next;           /* next offset expected */
  uint64_t end;            /* request end */
};

static int extent_add(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  struct extent_acc *a = opaque;
  if (off != a->next || len == 0)
    return -EIO;           /* the export broke the contract: say so, don't guess */
  if (off + len > a->end)
    len = a->end - off;
  /* Merge with the previous extent when the flags are equal. */
  if (a->n > 0 && get32(a->out + 8 * (a->n - 1) + 4) == flags &&
      (uint64_t)get32(a->out + 8 * (a->n - 1)) + len <= UINT32_MAX) {
    put32(a->out + 8 * (a->n - 1), get32(a->out + 8 * (a->n - 1)) + (uint32_t)len);
  } else {
    if (a->n >= a->max)
      return 1;
    put32(a->out + 8 * a->n, (uint32_t)len);
    put32(a->out + 8 * a->n + 4, flags);
    a->n++;
  }
  a->next = off + len;
  return a->next >= a->end ? 1 : 0;
}

/* Runs a BLOCK_STATUS request and sends its chunks (one per selected
 * context).  Runs on the reader or a worker; sends under send_lock. */
static void do_block_status(struct nbd_conn *c, const struct request *r, unsigned char *scratch)
{
  unsigned max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_EXTENTS;
  unsigned remaining = c->n_meta_selected;
  for (unsigned i = 0; i < c->ex->n_meta_contexts && i < MAX_META_CONTEXTS; i++) {
    if (!c->meta_selected[i])
      continue;
    remaining--;
    struct extent_acc a = { scratch + 4, 0, max, r->offset, r->offset + r->count };
    int e = c->ex->block_status(c->handle, i, r->offset, r->count, extent_add, &a);
    if (e < 0 || a.n == 0) {
      send_error(c, r->cookie, e < 0 ? -e : EIO, "block status failed");
      return;
    }
    unsigned char hdr[20];
    uint32_t plen = 4 + 8 * a.n;
    put32(scratch, i + 1);
    make_chunk_header(hdr, r->cookie, remaining == 0 ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_BLOCK_STATUS, plen);
    struct iovec iov[2] = { { hdr, 20 }, { scratch, plen } };
    pthread_mutex_lock(&c->send_lock);
    conn_writev_all(c, iov, 2);
    pthread_mutex_unlock(&c->send_lock);
  }
}

/* --- running a request --- */

/* Runs a request that may block and sends its reply.  Used by workers (and by
 * the reader when the connection has no workers). */
static void run_blocking(struct nbd_conn *c, struct request *r, unsigned char *scratch)
{
  int e = 0;
  unsigned fua = (r->flags & NBD_CMD_FLAG_FUA) ? NBD_EXPORT_FUA : 0;
  switch (r->type) {
  case NBD_CMD_READ:
    e = c->ex->pread(c->handle, r->buf, r->count, r->offset, 0);
    if (e == 0) {
      unsigned char hdr[32];
      size_t hl = make_read_reply(c, hdr, r);
      struct iovec iov[2] = { { hdr, hl }, { r->buf, r->count } };
      pthread_mutex_lock(&c->send_lock);
      conn_writev_all(c, iov, r->count ? 2 : 1);
      pthread_mutex_unlock(&c->send_lock);
      return;
    }
    break;
  case NBD_CMD_WRITE:
    e = c->ex->pwrite(c->handle, r->buf, r->count, r->offset, fua);
    break;
  case NBD_CMD_FLUSH:
    e = c->ex->flush(c->handle);
    break;
  case NBD_CMD_TRIM:
    e = c->ex->trim(c->handle, r->count, r->offset, fua);
    break;
  case NBD_CMD_WRITE_ZEROES:
    e = c->ex->zero(c->handle, r->count, r->offset,
                    fua | ((r->flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : NBD_EXPORT_MAY_TRIM));
    break;
  case NBD_CMD_CACHE:
    e = c->ex->cache(c->handle, r->count, r->offset);
    break;
  case NBD_CMD_BLOCK_STATUS:
    do_block_status(c, r, scratch);
    return;
  default:
    e = -EINVAL;
  }
  if (e < 0) {
    send_error(c, r->cookie, -e, strerror_short(-e));
    return;
  }
  unsigned char hdr[16];
  make_simple_reply(hdr, r->cookie, 0);
  /* A structured-reply client may still get simple replies for non-reads. */
  pthread_mutex_lock(&c->send_lock);
  conn_write(c, hdr, 16);
  pthread_mutex_unlock(&c->send_lock);
}

static void request_free(struct request *r)
{
  if (r) {
    free(r->buf);
    free(r);
  }
}

static void *worker_main(void *arg)
{
  struct nbd_conn *c = arg;
  unsigned char *scratch = malloc(4 + 8 * MAX_EXTENTS);
  pthread_mutex_lock(&c->queue_lock);
  for (;;) {
    while (!c->queue_head && !c->workers_stop)
      pthread_cond_wait(&c->queue_cond, &c->queue_lock);
    if (!c->queue_head)
      break;
    struct request *r = c->queue_head;
    c->queue_head = r->next;
    if (!c->queue_head)
      c->queue_tail = NULL;
    pthread_mutex_unlock(&c->queue_lock);

    if (scratch)
      run_blocking(c, r, scratch);
    else
      send_error(c, r->cookie, ENOMEM, "out of memory");
    size_t bytes = r->buf ? r->count : 0;
    request_free(r);

    pthread_mutex_lock(&c->queue_lock);
    c->inflight_reqs--;
    c->inflight_bytes -= bytes;
    pthread_cond_broadcast(&c->done_cond);
  }
  pthread_mutex_unlock(&c->queue_lock);
  free(scratch);
  return NULL;
}

/* Hands a request to the workers, waiting for capacity first. */
static void dispatch(struct nbd_conn *c, struct request *r)
{
  if (c->nworkers == 0) {
    run_blocking(c, r, (unsigned char *)c->ext_buf);
    request_free(r);
    return;
  }
  size_t bytes = r->buf ? r->count : 0;
  pthread_mutex_lock(&c->queue_lock);
  while (c->inflight_reqs > 0 &&
         (c->inflight_reqs >= MAX_INFLIGHT_REQS || c->inflight_bytes + bytes > MAX_INFLIGHT_BYTES))
    pthread_cond_wait(&c->done_cond, &c->queue_lock);
  c->inflight_reqs++;
  c->inflight_bytes += bytes;
  r->next = NULL;
  if (c->queue_tail)
    c->queue_tail->next = r;
  else
    c->queue_head = r;
  c->queue_tail = r;
  pthread_cond_signal(&c->queue_cond);
  pthread_mutex_unlock(&c->queue_lock);
}

/* Checks a request's framing rules.  Returns 0 or the errno to reply with. */
static int validate_request(const struct nbd_conn *c, const struct request *r)
{
  static const uint16_t allowed_flags[] = {
    [NBD_CMD_READ] = NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA,
    [NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA,
    [NBD_CMD_DISC] = 0,
    [NBD_CMD_FLUSH] = 0,
    [NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA,
    [NBD_CMD_CACHE] = 0,
    [NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
    [NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_REQ_ONE,
  };
  if (r->type > NBD_CMD_BLOCK_STATUS)
    return EINVAL;
  if (r->flags & ~allowed_flags[r->type])
    return EINVAL;
  if ((r->flags & NBD_CMD_FLAG_DF) && !c->structured)
    return EINVAL;
  switch (r->type) {
  case NBD_CMD_FLUSH:
    return (r->offset || r->count) ? EINVAL : 0;
  case NBD_CMD_READ:
  case NBD_CMD_WRITE:
    if (r->count > NBD_MAX_REQUEST)
      return c->structured ? EOVERFLOW : EINVAL;
    break;
  case NBD_CMD_BLOCK_STATUS:
    if (!c->structured || c->n_meta_selected == 0 || r->count == 0)
      return EINVAL;
    break;
  default:
    break;
  }
  if (r->offset > c->size || r->count > c->size - r->offset) {
    bool writes = r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM ||
                  r->type == NBD_CMD_WRITE_ZEROES;
    return writes ? ENOSPC : EINVAL;
  }
  return 0;
}

/* Tries a request on the reader thread.  Returns true if it was answered
 * (reply batched or sent), false if it must go to a worker.  For a write,
 * payload points at the data (in the input buffer or r->buf). */
static bool try_inline(struct nbd_conn *c, struct request *r, const void *payload)
{
  int e;
  if (r->count == 0 && (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM ||
                        r->type == NBD_CMD_WRITE_ZEROES || r->type == NBD_CMD_CACHE)) {
    unsigned char *hdr = batch_header(c);
    batch_add(c, hdr, make_simple_reply(hdr, r->cookie, 0));
    return true;   /* nothing to do; the export never sees empty ranges */
  }
  switch (r->type) {
  case NBD_CMD_READ: {
    if (r->count > ARENA_SIZE / 4)
      return false;
    /* Reserve header and arena room first: a flush after the read would
     * recycle the arena under the data just read. */
    if (c->nhdrs >= BATCH_MAX_REPLIES || c->niov + 2 > BATCH_MAX_IOV ||
        c->arena_used + r->count > ARENA_SIZE)
      batch_flush(c);
    char *dst = c->arena + c->arena_used;
    e = r->count ? c->ex->pread(c->handle, dst, r->count, r->offset, NBD_EXPORT_NOWAIT) : 0;
    if (e == -EAGAIN)
      return false;
    if (e < 0)
      break;
    unsigned char *hdr = c->hdrs[c->nhdrs++].bytes;
    batch_add(c, hdr, make_read_reply(c, hdr, r));
    if (r->count)
      batch_add(c, dst, r->count);
    c->arena_used += r->count;
    return true;
  }
  case NBD_CMD_WRITE:
    if (r->flags & NBD_CMD_FLAG_FUA)
      return false;
    e = c->ex->pwrite(c->handle, payload, r->count, r->offset, NBD_EXPORT_NOWAIT);
    break;
  case NBD_CMD_TRIM:
  case NBD_CMD_WRITE_ZEROES:
    if (r->flags & NBD_CMD_FLAG_FUA)
      return false;
    if (r->type == NBD_CMD_TRIM)
      e = c->ex->trim(c->handle, r->count, r->offset, NBD_EXPORT_NOWAIT);
    else
      e = c->ex->zero(c->handle, r->count, r->offset,
                      NBD_EXPORT_NOWAIT |
                        ((r->flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : NBD_EXPORT_MAY_TRIM));
    break;
  case NBD_CMD_BLOCK_STATUS:
    batch_flush(c);   /* keep replies of earlier requests ahead of the chunks */
    do_block_status(c, r, (unsigned char *)c->ext_buf);
    return true;
  default:
    return false;     /* FLUSH, CACHE: may block */
  }
  if (e == -EAGAIN)
    return false;
  if (e < 0) {
    batch_flush(c);
    send_error(c, r->cookie, -e, strerror_short(-e));
    return true;
  }
  unsigned char *hdr = batch_header(c);
  batch_add(c, hdr, make_simple_reply(hdr, r->cookie, 0));
  return true;
}

/* Is another complete request already in the input buffer? */
static bool request_buffered(const struct nbd_conn *c)
{
  size_t have = c->in_end - c->in_start;
  if (have < sizeof(struct nbd_request))
    return false;
  const unsigned char *p = (const unsigned char *)c->inbuf + c->in_start;
  if (get16(p + 6) != NBD_CMD_WRITE)
    return true;
  return have >= sizeof(struct nbd_request) + get32(p + 24);
}

/* The transmission phase.  Returns 0 on an orderly end, -1 otherwise. */
static int transmission(struct nbd_conn *c)
{
  for (;;) {
    if (!request_buffered(c))
      batch_flush(c);
    if (atomic_load(&c->stopping))
      return 0;
    if (conn_fill(c, sizeof(struct nbd_request)) < 0) {
      if (errno == 0 || atomic_load(&c->stopping))
        return 0;   /* EOF between requests: the client went away */
      log_info(c->export_name, "client %s: connection lost: %s", c->peer,
               errno == EPIPE ? "truncated request" : strerror(errno));
      return -1;
    }
    const unsigned char *p = (const unsigned char *)c->inbuf + c->in_start;
    struct request hdr = {
      .flags = get16(p + 4),
      .type = get16(p + 6),
      .cookie = get64(p + 8),
      .offset = get64(p + 16),
      .count = get32(p + 24),
    };
    if (get32(p) != NBD_REQUEST_MAGIC) {
      log_warn(c->export_name, "client %s: bad request magic 0x%08x, disconnecting", c->peer,
               get32(p));
      return -1;
    }
    c->in_start += sizeof(struct nbd_request);

    if (hdr.type == NBD_CMD_DISC) {
      log_debug(c->export_name, "client %s: disconnect requested", c->peer);
      return 0;
    }

    int err = validate_request(c, &hdr);
    if (err) {
      log_info(c->export_name,
               "client %s: refused command %u flags 0x%x offset %llu count %u: %s", c->peer,
               hdr.type, hdr.flags, (unsigned long long)hdr.offset, hdr.count,
               strerror_short(err));
      if (hdr.type == NBD_CMD_WRITE) {
        /* Keep the stream in step by skipping the payload, within reason. */
        if (hdr.count > DISCARD_LIMIT) {
          log_warn(c->export_name, "client %s: oversized write payload of %u bytes, "
                   "disconnecting", c->peer, hdr.count);
          return -1;
        }
        /* Reply only after the payload is consumed: clients (libnbd) treat
         * a reply to a command they are still sending as a protocol error. */
        if (conn_discard(c, hdr.count) < 0)
          return -1;
        batch_flush(c);
        send_error(c, hdr.cookie, err, strerror_short(err));
        continue;
      }
      batch_flush(c);
      send_error(c, hdr.cookie, err, strerror_short(err));
      continue;
    }

    const void *payload = NULL;
    char *owned = NULL;
    if (hdr.type == NBD_CMD_WRITE && hdr.count > 0) {
      if (c->in_end - c->in_start >= hdr.count) {
        payload = c->inbuf + c->in_start;   /* zero copy from the input buffer */
      } else {
        if (hdr.count > INBUF_SIZE / 2 || c->nworkers > 0) {
          owned = malloc(hdr.count);
          if (!owned) {
            log_error(c->export_name, "out of memory for a %u byte write", hdr.count);
            return -1;
          }
          if (conn_read(c, owned, hdr.count) < 0) {
            free(owned);
            return -1;
          }
          payload = owned;
        } else {
          if (conn_fill(c, hdr.count) < 0)
            return -1;
          payload = c->inbuf + c->in_start;
        }
      }
    }

    if (try_inline(c, &hdr, payload)) {
      if (payload && !owned)
        c->in_start += hdr.count;
      free(owned);
      continue;
    }

    /* Goes to a worker: it needs its own copy of everything. */
    struct request *r = malloc(sizeof *r);
    if (!r) {
      free(owned);
      return -1;
    }
    *r = hdr;
    r->buf = NULL;
    if (hdr.type == NBD_CMD_WRITE) {
      if (owned) {
        r->buf = owned;
      } else if (hdr.count) {
        r->buf = malloc(hdr.count);
        if (!r->buf) {
          free(r);
          return -1;
        }
        memcpy(r->buf, payload, hdr.count);
        c->in_start += hdr.count;
      }
    } else if (hdr.type == NBD_CMD_READ) {
      r->buf = malloc(hdr.count ? hdr.count : 1);
      if (!r->buf) {
        batch_flush(c);
        send_error(c, hdr.cookie, ENOMEM, "out of memory");
        free(r);
        continue;
      }
    }
    batch_flush(c);   /* earlier inline replies go first: keeps latency fair */
    dispatch(c, r);
  }
}

static void *conn_alloc_buffers(struct nbd_conn *c)
{
  c->inbuf = malloc(INBUF_SIZE);
  c->arena = malloc(ARENA_SIZE);
  c->ext_buf = malloc(4 + 8 * MAX_EXTENTS);
  return (c->inbuf && c->arena && c->ext_buf) ? c : NULL;
}

static void conn_start_workers(struct nbd_conn *c, unsigned n)
{
  c->workers = calloc(n, sizeof *c->workers);
  if (!c->workers)
    return;
  for (unsigned i = 0; i < n; i++) {
    if (pthread_create(&c->workers[i], NULL, worker_main, c) != 0) {
      log_warn(c->export_name, "could not start NBD worker thread: %s", strerror(errno));
      break;
    }
    c->nworkers++;
  }
}

/* Waits for every request handed to workers, then ends the workers. */
static void conn_stop_workers(struct nbd_conn *c)
{
  pthread_mutex_lock(&c->queue_lock);
  while (c->inflight_reqs > 0)
    pthread_cond_wait(&c->done_cond, &c->queue_lock);
  c->workers_stop = true;
  pthread_cond_broadcast(&c->queue_cond);
  pthread_mutex_unlock(&c->queue_lock);
  for (unsigned i = 0; i < c->nworkers; i++)
    pthread_join(c->workers[i], NULL);
  free(c->workers);
  c->workers = NULL;
  c->nworkers = 0;
}

static void set_handshake_timeout(int fd, int seconds)
{
  struct timeval tv = { seconds, 0 };
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);   /* fails harmlessly on pipes */
}

int nbd_serve_fds(const struct nbd_exports *ex, int in_fd, int out_fd,
                  const struct nbd_conn_options *opt)
{
  struct nbd_conn *c = calloc(1, sizeof *c);
  int result = -1;
  if (!c) {
    close(in_fd);
    if (out_fd != in_fd)
      close(out_fd);
    return -1;
  }
  c->ex = ex;
  c->in_fd = in_fd;
  c->out_fd = out_fd;
  struct stat st;
  c->out_is_socket = fstat(out_fd, &st) == 0 && S_ISSOCK(st.st_mode);
  c->peer = opt && opt->peer ? opt->peer : "client";
  pthread_mutex_init(&c->queue_lock, NULL);
  pthread_cond_init(&c->queue_cond, NULL);
  pthread_cond_init(&c->done_cond, NULL);
  pthread_mutex_init(&c->send_lock, NULL);

  if (!conn_alloc_buffers(c)) {
    log_error(NULL, "client %s: out of memory", c->peer);
    goto out;
  }

  set_handshake_timeout(in_fd, HANDSHAKE_TIMEOUT_S);
  int h = handshake(c);
  if (h <= 0) {
    result = h == 0 ? 0 : -1;
    if (h < 0 && errno == EAGAIN)
      log_info(NULL, "client %s: handshake timed out", c->peer);
    goto out;
  }
  set_handshake_timeout(in_fd, 0);

  log_info(c->export_name, "client %s connected (%s replies%s)", c->peer,
           c->structured ? "structured" : "simple",
           c->n_meta_selected ? ", block status" : "");
  if (opt && opt->workers)
    conn_start_workers(c, opt->workers);

  result = transmission(c);

  batch_flush(c);
  conn_stop_workers(c);
  log_info(c->export_name, "client %s disconnected", c->peer);

out:
  if (c->attached && ex->detached)
    ex->detached(c->handle, c);
  if (c->handle)
    ex->close(c->handle);
  close(in_fd);
  if (out_fd != in_fd)
    close(out_fd);
  pthread_mutex_destroy(&c->queue_lock);
  pthread_cond_destroy(&c->queue_cond);
  pthread_cond_destroy(&c->done_cond);
  pthread_mutex_destroy(&c->send_lock);
  free(c->inbuf);
  free(c->arena);
  free(c->ext_buf);
  free(c->export_name);
  free(c->meta_export);
  free(c);
  return result;
}

int nbd_serve_connection(const struct nbd_exports *ex, int fd, const struct nbd_conn_options *opt)
{
  return nbd_serve_fds(ex, fd, fd, opt);
}

void nbd_conn_shutdown(struct nbd_conn *c)
{
  atomic_store(&c->stopping, true);
  shutdown(c->in_fd, SHUT_RD);   /* wakes the reader; replies still go out */
}

const char *nbd_conn_export_name(const struct nbd_conn *c)
{
  return c->export_name;
}
