/* conn: one site link connection: TCP, TLS 1.3 with pinned certificates,
 * and frames over it (link.h).
 *
 * TRUST
 * Both ends present their certificate (the server requires one).  The X.509
 * chain is never verified against a CA: every site's certificate is
 * self-signed, so a chain check could only fail.  Instead the whole chain
 * verification is replaced (SSL_CTX_set_cert_verify_callback) by
 * verify_peer(), which accepts the chain as such and decides on the SHA-256
 * fingerprint of the peer's leaf certificate alone: the client requires the
 * fingerprint it was told to expect, the server asks its link_trust_fn.
 * TLS itself still proves that the peer holds the private key of that
 * certificate (CertificateVerify), which is what pinning needs; names,
 * dates and extensions are not looked at.  A refusal names the fingerprint
 * presented, so the operator can see which side to pair.
 *
 * In TLS 1.3 the client finishes its handshake before the server has seen
 * the client's certificate, so a refused client would only learn of it at
 * its first read.  link_connect therefore waits (within its timeout) for the
 * server's verdict: the server sends one NewSessionTicket after it accepted
 * the client, or an alert if it did not.  The ticket is only that signal:
 * the server keeps no session cache and issues stateful tickets (so none can
 * ever be resumed, and a resumed session, which would skip the certificate
 * check, is refused anyway), and the client never offers one.
 *
 * I/O
 * The socket is non-blocking.  Every SSL_* call on the connection runs under
 * ssl_mu (OpenSSL forbids concurrent calls on one SSL), and never waits:
 * when it would block, the caller drops the lock and poll()s the socket
 * together with wake_fd, an eventfd that link_conn_shutdown makes readable
 * for good (and the socket is shut down too), so nobody sleeps through a
 * shutdown.  A read is always tried before polling, and when OpenSSL still
 * holds unprocessed bytes (SSL_has_pending: it reads ahead 64 KiB at a time)
 * it is tried once more, so a record already in its buffer is never waited
 * for.  TLS 1.3 writes never need a read, and reads only rarely a write; both
 * are handled.
 * The socket BIO is our own (send with MSG_NOSIGNAL), so a peer that went
 * away is -EPIPE and never SIGPIPE, whatever the process does with signals.
 *
 * Senders take a turn (send_mu + send_cv) for a whole frame, so frames of
 * several threads never interleave; the turn holder owns the tx codec and
 * buffers.  The header and the start of the payload go out as one TLS record
 * of 16 KiB, the rest of the payload straight from where it is.  A send that
 * fails after its first byte left the frame half sent: the link is then
 * broken for sending (later sends fail with the same error) and the write
 * side is shut, so the peer sees the end instead of waiting for the rest.
 * The receiver (one at a time, recv_mu) reads the header, checks it, then
 * reads the payload directly into a buffer sized by wire_len; both buffers
 * persist, so a receive that timed out half way resumes where it stopped.
 *
 * Errors: -ECONNRESET when the peer closed or the connection was lost while
 * receiving, -EPIPE when sending; -EIO for a TLS failure (the message says
 * which); -ESHUTDOWN after link_conn_shutdown, whatever happened meanwhile.
 *
 * Thread model: one receiving thread, any number of sending threads,
 * link_conn_shutdown and link_conn_stats from anywhere; link_conn_close when
 * no other thread uses the connection any more.  Lock order: recv_mu or the
 * send turn, then ssl_mu; ssl_mu is never held while waiting.
 * Naming: link_* in link.h are public, link_conn_server_* / link_tls_ctx_new
 * internal (link_int.h); the rest is static. */
#include "link/link_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "common/log.h"
#include "common/util.h"

#define TX_FIRST       16384            /* header + payload start: one full TLS record */
#define RX_BUF_MIN     (64 * 1024)
#define READ_AHEAD     (64 * 1024)      /* OpenSSL's socket read size */
#define WANT_READ_MS   10               /* a sender whose write wants a read re-tries this often */
#define KEEPALIVE_IDLE 30               /* s before the first probe */
#define KEEPALIVE_INTV 10               /* s between probes */
#define KEEPALIVE_CNT  6                /* probes lost before the connection is dead */
#define NS_PER_MS      UINT64_C(1000000)
#define WANT_PENDING   0x4000           /* ssl_io: OpenSSL holds unprocessed bytes */

static const char ciphersuites[] =
  "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/* link_test_corrupt_every */
static _Atomic unsigned corrupt_every;
static _Atomic uint64_t corrupt_count;

struct link_conn {
  int fd;                          /* the TCP socket, non-blocking */
  int wake_fd;                     /* eventfd: readable once shut down */
  SSL *ssl;
  bool server;
  bool established;                /* handshake done (then constant) */

  /* Trust: set before the handshake, peer_* by it, then constant. */
  link_trust_fn trust;             /* server */
  void *trust_opaque;
  char expected_fp[LINK_FINGERPRINT_LEN];   /* client: the pinned server */
  char our_fp[LINK_FINGERPRINT_LEN];
  char peer_fp[LINK_FINGERPRINT_LEN];       /* "" until a certificate was seen */
  char peer_name[128];             /* from the trust function */
  char peer_addr[INET6_ADDRSTRLEN + 16];
  char refusal[256];               /* why verify_peer refused ("" if it did not) */
  bool peer_ok;                    /* verify_peer accepted the peer */
  bool ticket_seen;                /* client: the server accepted us */

  _Atomic bool shut;

  pthread_mutex_t ssl_mu;          /* every SSL_* call on ssl, and: */
  int sock_errno;                  /*   the BIO's last socket error */
  bool sock_eof;                   /*   the BIO saw the end of the stream */
  int dead;                        /*   0 or -errno: fatal, both directions */
  unsigned long dead_code;         /*   OpenSSL's error code of it */
  char dead_why[200];

  pthread_mutex_t send_mu;         /* guards sending; send_cv waits for the turn */
  pthread_cond_t send_cv;
  bool sending;                    /* a sender holds the turn */
  _Atomic uint64_t send_progress_ns;   /* last time a send moved (timeouts) */
  int tx_broken;                   /* turn: 0, or the error that broke a frame */
  struct frame_codec *tx;          /* turn */
  uint8_t *tx_first;               /* turn: [TX_FIRST] header + payload start */
  uint8_t *tx_copy;                /* turn: damaged copy (link_test_corrupt_every) */
  size_t tx_copy_cap;

  pthread_mutex_t recv_mu;         /* the receiver, and all rx_*: */
  struct frame_codec *rx;
  uint8_t rx_hdr[FRAME_HEADER_SIZE];
  uint32_t rx_hdr_got;             /* header bytes in */
  bool rx_have_hdr;                /* rx_h decoded, payload coming */
  struct frame_header rx_h;
  uint8_t *rx_buf;                 /* payload as on the wire */
  size_t rx_cap;
  uint32_t rx_got;                 /* payload bytes in */
  int rx_broken;                   /* -EPROTO after a bad header (or -ENOMEM) */
  char rx_why[256];

  _Atomic uint64_t frames_sent, frames_received, raw_sent, wire_sent, raw_received,
    wire_received, bad_payloads;

  struct link_conn_node node;      /* listener.c's */
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static uint64_t deadline_of(unsigned timeout_ms)
{
  return timeout_ms ? now_ns() + timeout_ms * NS_PER_MS : 0;
}

/* Milliseconds until deadline for poll(): -1 when there is none. */
static int ms_left(uint64_t deadline)
{
  if (!deadline)
    return -1;
  uint64_t now = now_ns();
  if (now >= deadline)
    return 0;
  uint64_t ms = (deadline - now + NS_PER_MS - 1) / NS_PER_MS;
  return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* ---- the socket BIO ---- */

static BIO_METHOD *sock_method;
static pthread_once_t sock_once = PTHREAD_ONCE_INIT;

static int sock_write(BIO *b, const char *buf, size_t len, size_t *written)
{
  struct link_conn *c = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  *written = 0;
  for (;;) {
    ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
    if (n >= 0) {
      *written = (size_t)n;
      return 1;
    }
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      BIO_set_retry_write(b);
    else
      c->sock_errno = errno;
    return 0;
  }
}

static int sock_read(BIO *b, char *buf, size_t len, size_t *got)
{
  struct link_conn *c = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  *got = 0;
  for (;;) {
    ssize_t n = recv(c->fd, buf, len, 0);
    if (n > 0) {
      *got = (size_t)n;
      return 1;
    }
    if (n == 0) {
      c->sock_eof = true;
      return 0;
    }
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      BIO_set_retry_read(b);
    else
      c->sock_errno = errno;
    return 0;
  }
}

static long sock_ctrl(BIO *b, int cmd, long num, void *ptr)
{
  struct link_conn *c = BIO_get_data(b);
  switch (cmd) {
  case BIO_CTRL_FLUSH:
    return 1;
  case BIO_CTRL_EOF:
    return c && c->sock_eof;
  case BIO_C_GET_FD:
    if (c && ptr)
      *(int *)ptr = c->fd;
    return c ? c->fd : -1;
  default:
    return 0;
  }
}

static int sock_create(BIO *b)
{
  BIO_set_init(b, 1);
  return 1;
}

static int sock_destroy(BIO *b) { return 1; }   /* the fd is the connection's */

static void sock_method_init(void)
{
  BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                               "ferry link socket");
  if (m && BIO_meth_set_write_ex(m, sock_write) && BIO_meth_set_read_ex(m, sock_read) &&
      BIO_meth_set_ctrl(m, sock_ctrl) && BIO_meth_set_create(m, sock_create) &&
      BIO_meth_set_destroy(m, sock_destroy)) {
    sock_method = m;
    return;
  }
  BIO_meth_free(m);
}

/* ---- TLS policy ---- */

/* Replaces X.509 chain verification (see TRUST above). */
static int verify_peer(X509_STORE_CTX *store, void *arg)
{
  SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
  struct link_conn *c = ssl ? SSL_get_app_data(ssl) : NULL;
  X509 *leaf = X509_STORE_CTX_get0_cert(store);
  if (!c || !leaf || link_fingerprint_of_x509(leaf, c->peer_fp) < 0) {
    if (c)
      snprintf(c->refusal, sizeof c->refusal, "cannot read the peer's certificate");
    X509_STORE_CTX_set_error(store, X509_V_ERR_UNSPECIFIED);
    return 0;
  }
  if (c->server) {
    char name[sizeof c->peer_name] = "";
    if (!c->trust(c->trust_opaque, c->peer_fp, name, sizeof name)) {
      snprintf(c->refusal, sizeof c->refusal, "peer presented %s, which is not paired",
               c->peer_fp);
      X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
      return 0;
    }
    name[sizeof name - 1] = '\0';
    memcpy(c->peer_name, name, sizeof name);
  } else if (strcmp(c->peer_fp, c->expected_fp) != 0) {
    snprintf(c->refusal, sizeof c->refusal, "peer presented %s but %s is paired", c->peer_fp,
             c->expected_fp);
    X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
    return 0;
  }
  c->peer_ok = true;
  X509_STORE_CTX_set_error(store, X509_V_OK);
  return 1;
}

/* Client: the server's NewSessionTicket, its sign that it accepted us. */
static int on_ticket(SSL *ssl, SSL_SESSION *sess)
{
  struct link_conn *c = SSL_get_app_data(ssl);
  if (c)
    c->ticket_seen = true;
  return 0;   /* not kept: sessions are never resumed */
}

SSL_CTX *link_tls_ctx_new(X509 *cert, EVP_PKEY *key, bool server, char *err, size_t errlen)
{
  SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  bool ok = ctx && SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) &&
            SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) &&
            SSL_CTX_set_ciphersuites(ctx, ciphersuites) &&
            SSL_CTX_use_certificate(ctx, cert) == 1 && SSL_CTX_use_PrivateKey(ctx, key) == 1 &&
            SSL_CTX_check_private_key(ctx) == 1;
  if (!ok) {
    unsigned long e = ERR_peek_last_error();
    set_err(err, errlen, "cannot set up TLS: %s",
            e && ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "unknown error");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                     NULL);
  SSL_CTX_set_cert_verify_callback(ctx, verify_peer, NULL);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, READ_AHEAD);
  if (server) {
    /* One stateful ticket from a server without a cache: the client's
     * "accepted" signal, never a way to resume (see TRUST). */
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 1);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_ticket);
  }
  return ctx;
}

/* ---- SSL calls and waiting ---- */

enum io_op { IO_HANDSHAKE, IO_READ, IO_PEEK, IO_WRITE };

/* Records a fatal failure of an SSL call (ssl_mu held). */
static int io_fail(struct link_conn *c, enum io_op op, int ssl_error)
{
  int rc;
  unsigned long code = ERR_peek_last_error();
  if (ssl_error == SSL_ERROR_ZERO_RETURN) {
    rc = op == IO_WRITE ? -EPIPE : -ECONNRESET;
    snprintf(c->dead_why, sizeof c->dead_why, "peer closed the link");
  } else if (c->sock_errno) {
    int e = c->sock_errno;
    rc = e == EPIPE || (op == IO_WRITE && e != ECONNRESET) ? -EPIPE : -ECONNRESET;
    snprintf(c->dead_why, sizeof c->dead_why, "connection lost: %s", strerror(c->sock_errno));
  } else if (c->sock_eof || ssl_error == SSL_ERROR_SYSCALL) {
    rc = op == IO_WRITE ? -EPIPE : -ECONNRESET;
    snprintf(c->dead_why, sizeof c->dead_why, "peer closed the connection");
  } else {
    rc = -EIO;
    const char *r = code ? ERR_reason_error_string(code) : NULL;
    snprintf(c->dead_why, sizeof c->dead_why, "TLS error: %s", r ? r : "unknown");
  }
  c->dead = rc;
  c->dead_code = code;
  ERR_clear_error();
  return rc;
}

/* One SSL call under ssl_mu.  Returns 1 with *done bytes moved (0 for the
 * handshake), 0 with *want (POLLIN/POLLOUT, plus WANT_PENDING when OpenSSL
 * holds bytes it has not processed) when it would block, or -errno. */
static int ssl_io(struct link_conn *c, enum io_op op, void *buf, size_t len, size_t *done,
                  short *want)
{
  int rc;
  pthread_mutex_lock(&c->ssl_mu);
  if (atomic_load(&c->shut)) {
    rc = -ESHUTDOWN;
  } else if (c->dead) {
    rc = c->dead;
  } else {
    size_t n = 0;
    int ret;
    ERR_clear_error();
    c->sock_errno = 0;
    switch (op) {
    case IO_READ:  ret = SSL_read_ex(c->ssl, buf, len, &n); break;
    case IO_PEEK:  ret = SSL_peek_ex(c->ssl, buf, len, &n); break;
    case IO_WRITE: ret = SSL_write_ex(c->ssl, buf, len, &n); break;
    default:       ret = SSL_do_handshake(c->ssl); break;
    }
    if (ret == 1) {
      *done = n;
      rc = 1;
    } else {
      int e = SSL_get_error(c->ssl, ret);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        *want = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        if (e == SSL_ERROR_WANT_READ && SSL_has_pending(c->ssl))
          *want |= WANT_PENDING;
        rc = 0;
      } else {
        rc = atomic_load(&c->shut) ? -ESHUTDOWN : io_fail(c, op, e);
      }
    }
  }
  pthread_mutex_unlock(&c->ssl_mu);
  return rc;
}

/* Waits for events on the socket (none: only for shutdown) for at most
 * timeout_ms (-1: no bound).  0 when something may have changed,
 * -ETIMEDOUT, -ESHUTDOWN. */
static int conn_wait(struct link_conn *c, short events, int timeout_ms)
{
  struct pollfd p[2] = { { .fd = c->wake_fd, .events = POLLIN },
                         { .fd = c->fd, .events = events } };
  int r = poll(p, events ? 2 : 1, timeout_ms);
  if (atomic_load(&c->shut))
    return -ESHUTDOWN;
  if (r == 0)
    return -ETIMEDOUT;
  return 0;   /* ready, or EINTR: the caller tries again */
}

/* Waits after an SSL read or handshake step that wanted `want`.  Bytes that
 * OpenSSL already holds are tried once more before sleeping: poll() cannot
 * see them, and sleeping on a socket that has nothing more to give would
 * stall a record that is complete in the buffer.  When the retry gets no
 * further, what is buffered is part of a record and the socket must bring
 * the rest. */
static int ssl_wait(struct link_conn *c, short want, uint64_t deadline, bool *retried)
{
  if ((want & WANT_PENDING) && !*retried) {
    *retried = true;
    return 0;
  }
  *retried = false;
  return conn_wait(c, want & (POLLIN | POLLOUT), ms_left(deadline));
}

/* ---- creating, closing ---- */

static void set_sock_options(int fd)
{
  int one = 1, idle = KEEPALIVE_IDLE, intv = KEEPALIVE_INTV, cnt = KEEPALIVE_CNT;
  /* Fails harmlessly on a unix socket (tests); on TCP, a dead peer is found
   * within a few minutes even when nothing is sent. */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intv, sizeof intv);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

static void format_addr(const struct sockaddr *sa, socklen_t len, char *out, size_t outlen)
{
  char host[INET6_ADDRSTRLEN + 8], port[16];
  if ((sa->sa_family != AF_INET && sa->sa_family != AF_INET6) ||
      getnameinfo(sa, len, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    snprintf(out, outlen, sa->sa_family == AF_UNIX ? "local" : "unknown");
    return;
  }
  set_err(out, outlen, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

static void conn_free(struct link_conn *c)
{
  SSL_free(c->ssl);   /* frees the BIO too */
  if (c->fd >= 0)
    close(c->fd);
  if (c->wake_fd >= 0)
    close(c->wake_fd);
  frame_codec_free(c->tx);
  frame_codec_free(c->rx);
  free(c->tx_first);
  free(c->tx_copy);
  free(c->rx_buf);
  pthread_mutex_destroy(&c->ssl_mu);
  pthread_mutex_destroy(&c->send_mu);
  pthread_cond_destroy(&c->send_cv);
  pthread_mutex_destroy(&c->recv_mu);
  free(c);
}

/* A connection around fd (taken: closed on failure), before its handshake. */
static struct link_conn *conn_new(struct link_identity *id, int fd, bool server, char *err,
                                  size_t errlen)
{
  pthread_once(&sock_once, sock_method_init);
  struct link_conn *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  c->fd = fd;
  c->server = server;
  pthread_mutex_init(&c->ssl_mu, NULL);
  pthread_mutex_init(&c->send_mu, NULL);
  pthread_mutex_init(&c->recv_mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&c->send_cv, &ca);
  pthread_condattr_destroy(&ca);
  snprintf(c->our_fp, sizeof c->our_fp, "%s", link_identity_fingerprint(id));

  c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int fl = fcntl(fd, F_GETFL);
  if (c->wake_fd < 0 || fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    set_err(err, errlen, "cannot set up the connection: %s", strerror(errno));
    conn_free(c);
    return NULL;
  }
  set_sock_options(fd);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0)
    format_addr((struct sockaddr *)&ss, sl, c->peer_addr, sizeof c->peer_addr);
  else
    snprintf(c->peer_addr, sizeof c->peer_addr, "unknown");

  c->tx = frame_codec_new();
  c->rx = frame_codec_new();
  c->tx_first = malloc(TX_FIRST);
  if (!c->tx || !c->rx || !c->tx_first || !sock_method) {
    set_err(err, errlen, "out of memory");
    conn_free(c);
    return NULL;
  }
  BIO *bio = NULL;
  c->ssl = SSL_new(link_identity_ssl_ctx(id, server));
  if (c->ssl)
    bio = BIO_new(sock_method);
  if (!bio) {
    ERR_clear_error();
    set_err(err, errlen, "cannot set up TLS: out of memory");
    conn_free(c);
    return NULL;
  }
  BIO_set_data(bio, c);
  SSL_set_bio(c->ssl, bio, bio);
  SSL_set_app_data(c->ssl, c);
  if (server)
    SSL_set_accept_state(c->ssl);
  else
    SSL_set_connect_state(c->ssl);
  return c;
}

void link_conn_shutdown(struct link_conn *c)
{
  atomic_store(&c->shut, true);
  uint64_t one = 1;
  ssize_t r = write(c->wake_fd, &one, sizeof one);
  (void)r;   /* fails only when already readable */
  shutdown(c->fd, SHUT_RDWR);
  pthread_mutex_lock(&c->send_mu);
  pthread_cond_broadcast(&c->send_cv);
  pthread_mutex_unlock(&c->send_mu);
}

void link_conn_close(struct link_conn *c)
{
  if (!c)
    return;
  link_listener_forget(c);
  /* An orderly end (close_notify) when the link is sound: the peer then
   * tells a close from a lost connection.  Best effort, never waits. */
  if (c->established && !atomic_load(&c->shut) && !c->dead && !c->tx_broken) {
    pthread_mutex_lock(&c->ssl_mu);
    SSL_shutdown(c->ssl);
    ERR_clear_error();
    pthread_mutex_unlock(&c->ssl_mu);
  }
  conn_free(c);
}

/* ---- handshake ---- */

static bool is_cert_alert(unsigned long code)
{
  if (ERR_GET_LIB(code) != ERR_LIB_SSL)
    return false;
  switch (ERR_GET_REASON(code)) {
  case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
  case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
  case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
  case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
  case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
  case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    return true;
  default:
    return false;
  }
}

static int handshake_error(struct link_conn *c, int rc, unsigned timeout_ms, bool confirming,
                           char *err, size_t errlen)
{
  const char *peer = c->server ? "client" : "server";
  if (rc == -ESHUTDOWN)
    set_err(err, errlen, "link shut down during the TLS handshake with %s", c->peer_addr);
  else if (c->refusal[0])
    set_err(err, errlen, "%s", c->refusal);
  else if (rc == -ETIMEDOUT && confirming)
    set_err(err, errlen, "server %s neither accepted nor refused our certificate %s within %u ms",
            c->peer_addr, c->our_fp, timeout_ms);
  else if (rc == -ETIMEDOUT)
    set_err(err, errlen, "TLS handshake with %s timed out after %u ms", c->peer_addr, timeout_ms);
  else if (is_cert_alert(c->dead_code))
    set_err(err, errlen, "%s %s refused our certificate %s (is this site paired there?): %s",
            peer, c->peer_addr, c->our_fp, c->dead_why);
  else if (rc == -ECONNRESET || rc == -EPIPE)
    set_err(err, errlen, "%s %s closed the connection during the TLS handshake (%s)", peer,
            c->peer_addr, c->dead_why);
  else
    set_err(err, errlen, "TLS handshake with %s failed: %s", c->peer_addr, c->dead_why);
  return rc;
}

/* Runs the handshake, and on the client waits for the server's verdict. */
static int conn_handshake(struct link_conn *c, uint64_t deadline, unsigned timeout_ms, char *err,
                          size_t errlen)
{
  int rc;
  short want = 0;
  size_t n;
  bool retried = false;
  while ((rc = ssl_io(c, IO_HANDSHAKE, NULL, 0, &n, &want)) == 0) {
    if ((rc = ssl_wait(c, want, deadline, &retried)) < 0)
      return handshake_error(c, rc, timeout_ms, false, err, errlen);
  }
  if (rc < 0)
    return handshake_error(c, rc, timeout_ms, false, err, errlen);

  /* TLS 1.3: the server judges our certificate after we are done. */
  while (!c->server && !c->ticket_seen) {
    char b;
    rc = ssl_io(c, IO_PEEK, &b, 1, &n, &want);
    if (rc > 0 || c->ticket_seen)
      break;   /* application data also means it accepted us */
    if (rc == 0)
      rc = ssl_wait(c, want, deadline, &retried);
    if (rc < 0)
      return handshake_error(c, rc, timeout_ms, true, err, errlen);
  }

  /* The verdict came from verify_peer, on this very certificate, on a full
   * handshake: checked again rather than assumed. */
  pthread_mutex_lock(&c->ssl_mu);
  X509 *peer = SSL_get0_peer_certificate(c->ssl);
  char fp[LINK_FINGERPRINT_LEN];
  bool ok = peer && c->peer_ok && !SSL_session_reused(c->ssl) &&
            link_fingerprint_of_x509(peer, fp) == 0 && strcmp(fp, c->peer_fp) == 0;
  pthread_mutex_unlock(&c->ssl_mu);
  if (!ok) {
    set_err(err, errlen, "TLS handshake with %s ended without a verified peer certificate",
            c->peer_addr);
    return -EPROTO;
  }
  c->established = true;
  return 0;
}

struct link_conn *link_conn_server_new(struct link_identity *id, int fd, link_trust_fn trust,
                                       void *opaque, char *err, size_t errlen)
{
  if (!trust) {
    close(fd);
    set_err(err, errlen, "no trust function");
    return NULL;
  }
  struct link_conn *c = conn_new(id, fd, true, err, errlen);
  if (c) {
    c->trust = trust;
    c->trust_opaque = opaque;
  }
  return c;
}

int link_conn_server_handshake(struct link_conn *c, unsigned timeout_ms, char *err,
                               size_t errlen)
{
  return conn_handshake(c, deadline_of(timeout_ms), timeout_ms, err, errlen);
}

struct link_conn *link_accept(struct link_identity *id, int fd, link_trust_fn trust,
                              void *opaque, unsigned timeout_ms, char *err, size_t errlen)
{
  struct link_conn *c = link_conn_server_new(id, fd, trust, opaque, err, errlen);
  if (c && link_conn_server_handshake(c, timeout_ms, err, errlen) < 0) {
    link_conn_close(c);
    return NULL;
  }
  return c;
}

/* strerror, starting lower case: it ends a sentence of ours. */
static void errno_text(int e, char *out, size_t len)
{
  snprintf(out, len, "%s", strerror(e));
  if (out[0] >= 'A' && out[0] <= 'Z' && !(out[1] >= 'A' && out[1] <= 'Z'))
    out[0] = (char)(out[0] - 'A' + 'a');
}

/* A connected non-blocking TCP socket to host:port, or -1 with err. */
static int tcp_connect(const char *host_port, const char *host, uint16_t port, uint64_t deadline,
                       unsigned timeout_ms, char *err, size_t errlen)
{
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_NUMERICSERV };
  struct addrinfo *ai, *a;
  char portstr[8];
  snprintf(portstr, sizeof portstr, "%u", port);
  int gai = getaddrinfo(host, portstr, &hints, &ai);
  if (gai) {
    set_err(err, errlen, "cannot resolve '%s': %s", host, gai_strerror(gai));
    return -1;
  }
  int fd = -1, last = ECONNREFUSED;
  for (a = ai; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last = errno;
      continue;
    }
    int r = connect(fd, a->ai_addr, a->ai_addrlen);
    if (r < 0 && errno == EINPROGRESS) {
      struct pollfd p = { .fd = fd, .events = POLLOUT };
      do
        r = poll(&p, 1, ms_left(deadline));
      while (r < 0 && errno == EINTR);
      if (r == 0) {
        last = ETIMEDOUT;
      } else {
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        last = soerr;
      }
      r = last ? -1 : 0;
    } else if (r < 0) {
      last = errno;
    }
    if (r < 0) {
      close(fd);
      fd = -1;
      if (last == ETIMEDOUT)
        break;   /* the time is used up: no other address would get any */
    }
  }
  freeaddrinfo(ai);
  if (fd < 0) {
    char why[128];
    if (last == ETIMEDOUT)
      snprintf(why, sizeof why, "timed out after %u ms", timeout_ms);
    else
      errno_text(last, why, sizeof why);
    set_err(err, errlen, "cannot connect to %s: %s", host_port, why);
  }
  return fd;
}

struct link_conn *link_connect(struct link_identity *id, const char *host_port,
                               const char *expected_fingerprint, unsigned timeout_ms,
                               char *err, size_t errlen)
{
  if (!link_fingerprint_is_valid(expected_fingerprint)) {
    set_err(err, errlen, "bad peer fingerprint '%s': expected sha256:<64 lowercase hex>",
            expected_fingerprint ? expected_fingerprint : "");
    return NULL;
  }
  char host[256];
  uint16_t port;
  if (!host_port || parse_host_port(host_port, host, sizeof host, &port) < 0 || port == 0) {
    set_err(err, errlen, "bad site link address '%s': expected HOST:PORT or [V6]:PORT",
            host_port ? host_port : "");
    return NULL;
  }
  uint64_t deadline = deadline_of(timeout_ms);
  int fd = tcp_connect(host_port, host, port, deadline, timeout_ms, err, errlen);
  if (fd < 0)
    return NULL;
  struct link_conn *c = conn_new(id, fd, false, err, errlen);
  if (!c)
    return NULL;
  snprintf(c->expected_fp, sizeof c->expected_fp, "%s", expected_fingerprint);
  if (conn_handshake(c, deadline, timeout_ms, err, errlen) < 0) {
    link_conn_close(c);
    return NULL;
  }
  return c;
}

/* ---- sending ---- */

static int turn_take(struct link_conn *c, unsigned timeout_ms)
{
  int rc = 0;
  pthread_mutex_lock(&c->send_mu);
  while (c->sending && !atomic_load(&c->shut)) {
    if (!timeout_ms) {
      pthread_cond_wait(&c->send_cv, &c->send_mu);
      continue;
    }
    /* Bounded by the link's lack of progress, not by our place in line. */
    uint64_t dl = atomic_load(&c->send_progress_ns) + timeout_ms * NS_PER_MS;
    if (now_ns() >= dl) {
      rc = -ETIMEDOUT;
      break;
    }
    struct timespec ts = { .tv_sec = (time_t)(dl / 1000000000u),
                           .tv_nsec = (long)(dl % 1000000000u) };
    pthread_cond_timedwait(&c->send_cv, &c->send_mu, &ts);
  }
  if (rc == 0 && atomic_load(&c->shut))
    rc = -ESHUTDOWN;
  if (rc == 0) {
    c->sending = true;
    atomic_store(&c->send_progress_ns, now_ns());
  }
  pthread_mutex_unlock(&c->send_mu);
  return rc;
}

static void turn_give(struct link_conn *c)
{
  pthread_mutex_lock(&c->send_mu);
  c->sending = false;
  atomic_store(&c->send_progress_ns, now_ns());
  pthread_cond_signal(&c->send_cv);
  pthread_mutex_unlock(&c->send_mu);
}

/* Writes all of p; timeout_ms bounds each stretch without progress. */
static int write_all(struct link_conn *c, const uint8_t *p, size_t len, unsigned timeout_ms)
{
  while (len > 0) {
    short want = 0;
    size_t n = 0;
    int rc = ssl_io(c, IO_WRITE, (void *)p, len, &n, &want);
    if (rc < 0)
      return rc;
    if (rc > 0) {
      p += n;
      len -= n;
      atomic_store(&c->send_progress_ns, now_ns());
      continue;
    }
    uint64_t dl = timeout_ms ? atomic_load(&c->send_progress_ns) + timeout_ms * NS_PER_MS : 0;
    if (dl && now_ns() >= dl)
      return -ETIMEDOUT;
    int ms = ms_left(dl);
    if (want & POLLIN) {
      /* The receiver thread may take the data that would wake us: do not
       * poll for it, try again shortly. */
      rc = conn_wait(c, 0, ms < 0 || ms > WANT_READ_MS ? WANT_READ_MS : ms);
    } else {
      rc = conn_wait(c, POLLOUT, ms);
    }
    if (rc == -ESHUTDOWN)
      return rc;
  }
  return 0;
}

static int send_frame(struct link_conn *c, uint8_t type, uint64_t seq, const void *payload,
                      uint32_t len, int level, unsigned timeout_ms)
{
  if (c->tx_broken)
    return c->tx_broken;
  const void *wire;
  uint32_t wire_len;
  int rc = frame_encode(c->tx, type, seq, payload, len, level, c->tx_first, &wire, &wire_len);
  if (rc < 0)
    return rc;

  unsigned every = atomic_load(&corrupt_every);
  if (every && wire_len) {
    uint64_t k = atomic_fetch_add(&corrupt_count, 1) + 1;
    if (k % every == 0) {
      if (c->tx_copy_cap < wire_len) {
        uint8_t *p = realloc(c->tx_copy, wire_len);
        if (!p)
          return -ENOMEM;
        c->tx_copy = p;
        c->tx_copy_cap = wire_len;
      }
      memcpy(c->tx_copy, wire, wire_len);
      uint64_t bit = (k * 2654435761u) % ((uint64_t)wire_len * 8);
      c->tx_copy[bit / 8] ^= (uint8_t)(1u << (bit % 8));
      wire = c->tx_copy;
    }
  }

  uint32_t head = MIN(wire_len, (uint32_t)(TX_FIRST - FRAME_HEADER_SIZE));
  memcpy(c->tx_first + FRAME_HEADER_SIZE, wire, head);
  rc = write_all(c, c->tx_first, FRAME_HEADER_SIZE + head, timeout_ms);
  if (rc == 0 && wire_len > head)
    rc = write_all(c, (const uint8_t *)wire + head, wire_len - head, timeout_ms);
  if (rc < 0) {
    /* Part of the frame may be out (or buffered inside OpenSSL): nothing
     * more can be sent in step.  Tell the peer by ending our side. */
    c->tx_broken = rc == -ETIMEDOUT ? -EPIPE : rc;
    shutdown(c->fd, SHUT_WR);
    return rc;
  }
  atomic_fetch_add_explicit(&c->frames_sent, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&c->raw_sent, len, memory_order_relaxed);
  atomic_fetch_add_explicit(&c->wire_sent, wire_len, memory_order_relaxed);
  return 0;
}

int link_send(struct link_conn *c, uint8_t type, uint64_t seq, const void *payload,
              uint32_t len, int level, unsigned timeout_ms)
{
  if (len > FRAME_MAX_RAW || (len && !payload))
    return -EINVAL;
  int rc = turn_take(c, timeout_ms);
  if (rc < 0)
    return rc;
  rc = send_frame(c, type, seq, payload, len, level, timeout_ms);
  turn_give(c);
  return rc;
}

/* ---- receiving ---- */

/* Reads at least one byte, at most len, by deadline (0: none). */
static int read_some(struct link_conn *c, void *buf, size_t len, uint64_t deadline, size_t *got)
{
  bool retried = false;
  for (;;) {
    short want = 0;
    int rc = ssl_io(c, IO_READ, buf, len, got, &want);
    if (rc != 0)
      return rc < 0 ? rc : 0;
    if ((rc = ssl_wait(c, want, deadline, &retried)) < 0)
      return rc;
  }
}

static int rx_reserve(struct link_conn *c, size_t need)
{
  if (need <= c->rx_cap)
    return 0;
  size_t n = c->rx_cap ? c->rx_cap : RX_BUF_MIN;
  while (n < need)
    n *= 2;
  if (n > FRAME_MAX_WIRE)
    n = FRAME_MAX_WIRE;
  uint8_t *p = malloc(n);   /* nothing of the old buffer is kept */
  if (!p)
    return -ENOMEM;
  free(c->rx_buf);
  c->rx_buf = p;
  c->rx_cap = n;
  return 0;
}

static int rx_fail(struct link_conn *c, int rc, unsigned timeout_ms, char *err, size_t errlen)
{
  if (rc == -ETIMEDOUT) {
    set_err(err, errlen, "no complete frame from %s within %u ms", c->peer_addr, timeout_ms);
  } else if (rc == -ESHUTDOWN) {
    set_err(err, errlen, "link to %s shut down", c->peer_addr);
  } else {
    pthread_mutex_lock(&c->ssl_mu);
    bool mid = c->rx_hdr_got > 0;
    set_err(err, errlen, "link to %s: %s%s", c->peer_addr, c->dead_why,
            mid ? " in the middle of a frame" : "");
    pthread_mutex_unlock(&c->ssl_mu);
  }
  return rc;
}

static int recv_frame(struct link_conn *c, struct link_msg *m, unsigned timeout_ms, char *err,
                      size_t errlen)
{
  if (atomic_load(&c->shut))
    return rx_fail(c, -ESHUTDOWN, timeout_ms, err, errlen);
  if (c->rx_broken) {
    set_err(err, errlen, "%s", c->rx_why);
    return c->rx_broken;
  }
  uint64_t deadline = deadline_of(timeout_ms);
  int rc;
  size_t n;
  while (c->rx_hdr_got < FRAME_HEADER_SIZE) {
    rc = read_some(c, c->rx_hdr + c->rx_hdr_got, FRAME_HEADER_SIZE - c->rx_hdr_got, deadline, &n);
    if (rc < 0)
      return rx_fail(c, rc, timeout_ms, err, errlen);
    c->rx_hdr_got += (uint32_t)n;
  }
  if (!c->rx_have_hdr) {
    char why[160];
    if (frame_header_decode(c->rx_hdr, &c->rx_h, why, sizeof why) < 0) {
      c->rx_broken = -EPROTO;
      set_err(c->rx_why, sizeof c->rx_why, "link to %s out of step: %s", c->peer_addr, why);
      set_err(err, errlen, "%s", c->rx_why);
      return -EPROTO;
    }
    if (rx_reserve(c, c->rx_h.wire_len) < 0) {
      c->rx_broken = -ENOMEM;
      snprintf(c->rx_why, sizeof c->rx_why, "link to %s: no memory for a frame of %u bytes",
               c->peer_addr, c->rx_h.wire_len);
      set_err(err, errlen, "%s", c->rx_why);
      return -ENOMEM;
    }
    c->rx_have_hdr = true;
    c->rx_got = 0;
  }
  while (c->rx_got < c->rx_h.wire_len) {
    rc = read_some(c, c->rx_buf + c->rx_got, c->rx_h.wire_len - c->rx_got, deadline, &n);
    if (rc < 0)
      return rx_fail(c, rc, timeout_ms, err, errlen);
    c->rx_got += (uint32_t)n;
  }
  /* The whole frame is in: whatever its payload, the next one starts here. */
  c->rx_hdr_got = 0;
  c->rx_have_hdr = false;
  const struct frame_header *h = &c->rx_h;
  m->type = h->type;
  m->seq = h->seq;
  const void *raw;
  rc = frame_decode_payload(c->rx, h, c->rx_buf, &raw, err, errlen);
  if (rc < 0) {
    if (rc == -EBADMSG)
      atomic_fetch_add_explicit(&c->bad_payloads, 1, memory_order_relaxed);
    return rc;
  }
  m->data = raw;
  m->len = h->raw_len;
  atomic_fetch_add_explicit(&c->frames_received, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&c->raw_received, h->raw_len, memory_order_relaxed);
  atomic_fetch_add_explicit(&c->wire_received, h->wire_len, memory_order_relaxed);
  return 0;
}

int link_recv(struct link_conn *c, struct link_msg *m, unsigned timeout_ms, char *err,
              size_t errlen)
{
  if (err && errlen)
    err[0] = '\0';
  m->type = 0;
  m->seq = 0;
  m->data = NULL;
  m->len = 0;
  pthread_mutex_lock(&c->recv_mu);
  int rc = recv_frame(c, m, timeout_ms, err, errlen);
  pthread_mutex_unlock(&c->recv_mu);
  return rc;
}

/* ---- accessors ---- */

const char *link_conn_peer_fingerprint(const struct link_conn *c) { return c->peer_fp; }
const char *link_conn_peer_address(const struct link_conn *c) { return c->peer_addr; }
const char *link_conn_peer_name(const struct link_conn *c) { return c->peer_name; }
struct link_conn_node *link_conn_node(struct link_conn *c) { return &c->node; }

void link_conn_stats(struct link_conn *c, struct link_stats *out)
{
  out->frames_sent = atomic_load_explicit(&c->frames_sent, memory_order_relaxed);
  out->frames_received = atomic_load_explicit(&c->frames_received, memory_order_relaxed);
  out->raw_bytes_sent = atomic_load_explicit(&c->raw_sent, memory_order_relaxed);
  out->wire_bytes_sent = atomic_load_explicit(&c->wire_sent, memory_order_relaxed);
  out->raw_bytes_received = atomic_load_explicit(&c->raw_received, memory_order_relaxed);
  out->wire_bytes_received = atomic_load_explicit(&c->wire_received, memory_order_relaxed);
  out->bad_payloads = atomic_load_explicit(&c->bad_payloads, memory_order_relaxed);
}

void link_test_corrupt_every(unsigned n)
{
  atomic_store(&corrupt_count, 0);
  atomic_store(&corrupt_every, n);
}
