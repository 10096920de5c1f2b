/* tunnel: carries a QEMU migration stream (the VM's RAM and device state)
 * over the site link, so that it crosses the WAN with the same TLS, pinned
 * certificates, checksums and compression as the disks (docs/protocol.md,
 * "Tunnel").
 *
 *   source QEMU --unix--> source ferryd ==site link==> destination ferryd
 *                                                      --unix--> dest QEMU
 *
 * The source side listens on a unix socket in DATA_DIR/run that the source
 * QEMU's `migrate unix:PATH` connects to, dials a fresh link connection of its
 * own (not the replication session's: RAM must not queue behind disk data,
 * and a broken tunnel just fails this RAM migration, which the cutover
 * retries) and opens it with TUNNEL_OPEN {"migration"}.  The destination
 * checks that the caller is the peer of that migration and that it has a VM
 * waiting for it, connects to the incoming QEMU's socket and answers
 * TUNNEL_OPEN {"ok":true}.  Then bytes flow both ways as TUNNEL_DATA frames
 * (QEMU's return path is used by postcopy only, but the pump is symmetric);
 * an end of stream is TUNNEL_EOF, which half-closes the other side.
 *
 * Invariant: a tunnel never changes a disk.  A damaged frame (-EBADMSG)
 * ends the tunnel: QEMU's stream has no resend, the RAM migration fails and
 * is started again from the beginning.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/proto.h"
#include "replicate/tunnel.h"
#include "site/site.h"

#define TUNNEL_PIECE (256u * 1024)
#define TUNNEL_SEND_TIMEOUT_MS 30000
#define TUNNEL_OPEN_TIMEOUT_MS 15000
#define TUNNEL_ZSTD_LEVEL 1        /* RAM pages: cheap compression keeps up with the link */

struct tunnel {
  char path[108];
  int listen_fd;                 /* source: QEMU connects here */
  struct link_identity *id;
  char link_addr[256], fingerprint[LINK_FINGERPRINT_LEN];
  char migration[MIG_ID_LEN];
  char vm[65];

  pthread_t thread;
  bool thread_started;
  atomic_bool stop;
  atomic_uint_fast64_t bytes_out, bytes_in;
  atomic_uint_fast64_t wire_bytes;
  pthread_mutex_t lock;
  char error[256];               /* (lock) first failure */
  bool done;                     /* (lock) the pump ended */
};

/* ---- the pump, shared by both sides ---- */

struct pump {
  struct link_conn *conn;
  int fd;                        /* the QEMU socket */
  atomic_bool *stop;
  atomic_uint_fast64_t *to_link, *from_link;
  char err[256];                 /* reader's failure (read after the join) */
  atomic_bool eof_sent;          /* set by the reader, polled by the other side */
};

/* QEMU -> link, on its own thread. */
static void *pump_fd_to_link(void *arg)
{
  struct pump *p = arg;
  uint8_t *buf = malloc(TUNNEL_PIECE);
  if (!buf) {
    link_conn_shutdown(p->conn);
    return NULL;
  }
  while (!atomic_load(p->stop)) {
    struct pollfd pf = { .fd = p->fd, .events = POLLIN };
    int pr = poll(&pf, 1, 200);
    if (pr < 0 && errno == EINTR)
      continue;
    if (pr <= 0)
      continue;
    ssize_t n = read(p->fd, buf, TUNNEL_PIECE);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (n <= 0) {
      /* End of QEMU's stream: tell the other side, which half-closes. */
      link_send(p->conn, MSG_TUNNEL_EOF, 0, NULL, 0, 0, TUNNEL_SEND_TIMEOUT_MS);
      atomic_store(&p->eof_sent, true);
      break;
    }
    int r = link_send(p->conn, MSG_TUNNEL_DATA, 0, buf, (uint32_t)n, TUNNEL_ZSTD_LEVEL,
                      TUNNEL_SEND_TIMEOUT_MS);
    if (r < 0) {
      snprintf(p->err, sizeof p->err, "sending over the site link: %s", strerror(-r));
      link_conn_shutdown(p->conn);
      break;
    }
    atomic_fetch_add(p->to_link, (uint64_t)n);
  }
  free(buf);
  return NULL;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0) {
      if (errno == EAGAIN) {
        struct pollfd pf = { .fd = fd, .events = POLLOUT };
        poll(&pf, 1, 200);
        continue;
      }
      return -errno;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Runs until both directions ended or something failed.  Returns 0 when
 * the link side sent its TUNNEL_EOF and ours went out too. */
static int pump_run(struct link_conn *conn, int fd, atomic_bool *stop,
                    atomic_uint_fast64_t *to_link, atomic_uint_fast64_t *from_link, char *err,
                    size_t errlen)
{
  struct pump p = { .conn = conn, .fd = fd, .stop = stop, .to_link = to_link,
                    .from_link = from_link };
  pthread_t reader;
  if (pthread_create(&reader, NULL, pump_fd_to_link, &p) != 0) {
    snprintf(err, errlen, "cannot start the tunnel thread");
    return -EAGAIN;
  }
  int r = 0;
  bool peer_eof = false;
  while (!atomic_load(stop)) {
    struct link_msg lm;
    char e[256];
    r = link_recv(conn, &lm, 500, e, sizeof e);
    if (r == -ETIMEDOUT) {
      r = 0;
      if (peer_eof && atomic_load(&p.eof_sent))
        break;
      continue;
    }
    if (r < 0) {
      if (peer_eof && (r == -ECONNRESET || r == -EPIPE)) {
        r = 0;            /* the other side closed after both EOFs */
        break;
      }
      snprintf(err, errlen, "site link: %s", r == -EBADMSG ? "a damaged frame" : e);
      break;
    }
    if (lm.type == MSG_TUNNEL_DATA) {
      if ((r = write_all(fd, lm.data, lm.len)) < 0) {
        snprintf(err, errlen, "writing to QEMU: %s", strerror(-r));
        break;
      }
      atomic_fetch_add(from_link, lm.len);
    } else if (lm.type == MSG_TUNNEL_EOF) {
      peer_eof = true;
      shutdown(fd, SHUT_WR);
      /* Our direction may still carry QEMU's last bytes; wait for its end. */
    } else if (lm.type == MSG_ERROR) {
      char e2[256];
      json_t *j = proto_json_parse(lm.data, lm.len, e2, sizeof e2);
      const char *msg = json_string_value(json_object_get(j, "error"));
      snprintf(err, errlen, "the peer: %s", msg ? msg : "error");
      json_decref(j);
      r = -EREMOTEIO;
      break;
    } else {
      snprintf(err, errlen, "unexpected %s frame in a tunnel", proto_type_name(lm.type));
      r = -EPROTO;
      break;
    }
    if (peer_eof && atomic_load(&p.eof_sent))
      break;
  }
  if (r != 0 || atomic_load(stop))
    link_conn_shutdown(conn);
  /* The reader ends at QEMU's EOF, on a send failure, or on stop. */
  if (r != 0 || !atomic_load(&p.eof_sent))
    shutdown(fd, SHUT_RDWR);
  pthread_join(reader, NULL);
  if (r == 0 && p.err[0]) {
    snprintf(err, errlen, "%s", p.err);
    r = -EIO;
  }
  if (r == 0 && atomic_load(stop) && !(peer_eof && atomic_load(&p.eof_sent))) {
    snprintf(err, errlen, "stopped");
    r = -ECANCELED;
  }
  return r;
}

/* ---- source ---- */

static void tunnel_fail(struct tunnel *t, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void tunnel_fail(struct tunnel *t, const char *fmt, ...)
{
  pthread_mutex_lock(&t->lock);
  if (!t->error[0]) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->error, sizeof t->error, fmt, ap);
    va_end(ap);
  }
  pthread_mutex_unlock(&t->lock);
}

static void *source_tunnel_main(void *arg)
{
  struct tunnel *t = arg;
  int fd = -1;
  struct link_conn *conn = NULL;
  char err[512];

  /* QEMU connects once `migrate` runs. */
  while (!atomic_load(&t->stop)) {
    struct pollfd pf = { .fd = t->listen_fd, .events = POLLIN };
    if (poll(&pf, 1, 200) > 0) {
      fd = accept4(t->listen_fd, NULL, NULL, SOCK_CLOEXEC);
      if (fd >= 0)
        break;
    }
  }
  if (fd < 0)
    goto out;
  conn = link_connect(t->id, t->link_addr, t->fingerprint, TUNNEL_OPEN_TIMEOUT_MS, err,
                      sizeof err);
  if (!conn) {
    tunnel_fail(t, "cannot reach the destination: %s", err);
    goto out;
  }
  char open[128];
  int n = snprintf(open, sizeof open, "{\"migration\":\"%s\"}", t->migration);
  int r = link_send(conn, MSG_TUNNEL_OPEN, 0, open, (uint32_t)n, 0, TUNNEL_SEND_TIMEOUT_MS);
  struct link_msg lm;
  if (r == 0)
    r = link_recv(conn, &lm, TUNNEL_OPEN_TIMEOUT_MS, err, sizeof err);
  if (r < 0) {
    tunnel_fail(t, "opening the tunnel: %s", err);
    goto out;
  }
  if (lm.type != MSG_TUNNEL_OPEN) {
    json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
    const char *msg = json_string_value(json_object_get(j, "error"));
    tunnel_fail(t, "the destination refused the tunnel: %s", msg ? msg : "no reason");
    json_decref(j);
    goto out;
  }
  r = pump_run(conn, fd, &t->stop, &t->bytes_out, &t->bytes_in, err, sizeof err);
  if (r < 0 && r != -ECANCELED)
    tunnel_fail(t, "%s", err);
out:
  if (conn) {
    struct link_stats st;
    link_conn_stats(conn, &st);
    atomic_store(&t->wire_bytes, st.wire_bytes_sent);
    link_conn_close(conn);
  }
  if (fd >= 0)
    close(fd);
  pthread_mutex_lock(&t->lock);
  t->done = true;
  pthread_mutex_unlock(&t->lock);
  return NULL;
}

struct tunnel *tunnel_source_open(struct migration *m, const char *sock_path, char *err,
                                  size_t errlen)
{
  const struct migrations_shared *sh = mig_shared(m);
  struct tunnel *t = calloc(1, sizeof *t);
  if (!t) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  t->listen_fd = -1;
  pthread_mutex_init(&t->lock, NULL);
  snprintf(t->migration, sizeof t->migration, "%s", m->id);
  snprintf(t->vm, sizeof t->vm, "%s", m->vm);
  mig_get_peer_link(m, t->link_addr, sizeof t->link_addr, t->fingerprint,
                    sizeof t->fingerprint);
  t->id = site_identity(sh->site);
  if (!t->link_addr[0] || !t->id) {
    snprintf(err, errlen, "site '%s' is not paired", m->peer);
    goto fail;
  }
  if (strlen(sock_path) >= sizeof t->path) {
    snprintf(err, errlen, "socket path %s is too long for a unix socket", sock_path);
    goto fail;
  }
  snprintf(t->path, sizeof t->path, "%s", sock_path);
  unlink(t->path);
  t->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  memcpy(sa.sun_path, t->path, sizeof t->path);
  if (t->listen_fd < 0 || bind(t->listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
      listen(t->listen_fd, 1) < 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", t->path, strerror(errno));
    goto fail;
  }
  if (pthread_create(&t->thread, NULL, source_tunnel_main, t) != 0) {
    snprintf(err, errlen, "cannot start the tunnel thread");
    goto fail;
  }
  t->thread_started = true;
  return t;
fail:
  tunnel_close(t);
  return NULL;
}

bool tunnel_failed(struct tunnel *t, char *err, size_t errlen)
{
  pthread_mutex_lock(&t->lock);
  bool failed = t->error[0] != '\0';
  if (failed)
    snprintf(err, errlen, "%s", t->error);
  pthread_mutex_unlock(&t->lock);
  return failed;
}

bool tunnel_done(struct tunnel *t)
{
  pthread_mutex_lock(&t->lock);
  bool d = t->done;
  pthread_mutex_unlock(&t->lock);
  return d;
}

uint64_t tunnel_bytes_out(struct tunnel *t) { return atomic_load(&t->bytes_out); }
uint64_t tunnel_wire_bytes(struct tunnel *t) { return atomic_load(&t->wire_bytes); }

void tunnel_close(struct tunnel *t)
{
  if (!t)
    return;
  atomic_store(&t->stop, true);
  if (t->thread_started)
    pthread_join(t->thread, NULL);
  if (t->listen_fd >= 0)
    close(t->listen_fd);
  if (t->path[0])
    unlink(t->path);
  pthread_mutex_destroy(&t->lock);
  free(t);
}

/* ---- destination ---- */

void tunnel_incoming_path(const char *data_dir, const char *migration_id, char *buf,
                          size_t len)
{
  fmt_into(buf, len, "%s/run/%s.in", data_dir, migration_id);
}

static void refuse(struct link_conn *conn, const char *msg)
{
  json_t *j = json_pack("{s:s, s:b}", "error", msg, "fatal", true);
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (text)
    link_send(conn, MSG_ERROR, 0, text, (uint32_t)strlen(text), 0, 5000);
  free(text);
}

void tunnel_serve_dest(struct migrations *ms, struct link_conn *conn, const void *open,
                       uint32_t openlen)
{
  const struct migrations_shared *sh = migrations_shared(ms);
  char err[512], peer[65] = "";
  json_t *j = proto_json_parse(open, openlen, err, sizeof err);
  const char *id = json_string_value(json_object_get(j, "migration"));
  struct migration *m = id && proto_id_is_valid(id) ? mig_find(ms, id) : NULL;
  if (!m || strcmp(m->role, "destination") != 0) {
    refuse(conn, "no such incoming migration here");
    goto out;
  }
  if (!site_trust(sh->site, link_conn_peer_fingerprint(conn), peer, sizeof peer) ||
      strcmp(peer, m->peer) != 0) {
    refuse(conn, "this migration belongs to another site");
    goto out;
  }
  char path[PATH_MAX];
  tunnel_incoming_path(sh->data_dir, m->id, path, sizeof path);
  int fd = -1;
  /* QEMU listens once migrate-incoming ran; allow it a moment. */
  for (int attempt = 0; attempt < 50 && fd < 0; attempt++) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    fmt_into(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
      break;
    if (fd >= 0)
      close(fd);
    fd = -1;
    usleep(100000);
  }
  if (fd < 0) {
    snprintf(err, sizeof err, "no incoming VM is listening for migration %s", m->id);
    refuse(conn, err);
    goto out;
  }
  const char ok[] = "{\"ok\":true}";
  if (link_send(conn, MSG_TUNNEL_OPEN, 0, ok, sizeof ok - 1, 0, TUNNEL_SEND_TIMEOUT_MS) == 0) {
    atomic_bool stop = false;
    atomic_uint_fast64_t out_bytes = 0, in_bytes = 0;
    log_info(m->vm, "migration %s: VM state tunnel open from site '%s'", m->id, peer);
    int r = pump_run(conn, fd, &stop, &out_bytes, &in_bytes, err, sizeof err);
    char b[32];
    format_size(atomic_load(&in_bytes), b, sizeof b);
    if (r < 0)
      log_warn(m->vm, "migration %s: VM state tunnel ended after %s: %s", m->id, b, err);
    else
      log_info(m->vm, "migration %s: VM state tunnel closed after %s", m->id, b);
  }
  close(fd);
out:
  json_decref(j);
  link_conn_close(conn);
}
