/* nbd_glue: ferryd's NBD front (see nbd_glue.h).
 *
 * One accept thread; one thread per client connection, which runs
 * nbd_serve_connection() with `workers` helper threads of its own.  Every
 * connection thread has an entry in the listener's list from accept to exit;
 * the entry keeps a dup of the socket so that stop and forced removal can
 * shut it down without racing the close in the connection thread.
 *
 * Export ops map NBD onto the disk service: the export handle is a
 * referenced struct disk, so a disk removed while a client is connected stays
 * alive until that client is gone. */
#include "ferryd/nbd_glue.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "nbd/server.h"

struct conn_entry {
  struct conn_entry *next;
  struct nbd_listener *l;
  int fd;                     /* the connection's socket (closed by the server) */
  int fd_keep;                /* dup of it, for shutdown(); closed when the entry goes */
  struct nbd_conn *conn;      /* set while attached to an export */
  char peer[80];
};

struct nbd_listener {
  struct registry *reg;
  struct nbd_exports exports;
  int listen_fd;
  int wake[2];                /* pipe that wakes the accept thread */
  char address[160];          /* "unix:PATH" or "HOST:PORT" */
  char unix_path[108];        /* empty for TCP */
  char host[64];
  uint16_t port;
  unsigned workers;
  pthread_t accept_thread;

  pthread_mutex_t lock;       /* guards conns, nconns, and entry->conn */
  pthread_cond_t changed;     /* a connection attached, detached or ended */
  struct conn_entry *conns;
  unsigned nconns;
};

static __thread struct conn_entry *current_entry;

/* ---- export ops ---- */

static const char *const meta_contexts[] = { "base:allocation", "ferry:dirty" };

static void *export_open(void *ctx, const char *name)
{
  struct nbd_listener *l = ctx;
  struct disk *d = registry_get(l->reg, name);
  if (d && !disk_admits_clients(d)) {
    /* Another site is authoritative (or will be): no new client may attach. */
    char why[160];
    disk_fence_reason(d, why, sizeof why);
    log_warn(name, "NBD client refused: the disk is fenced (%s)", why);
    disk_unref(d);
    return NULL;
  }
  return d;
}

static void export_close(void *h) { disk_unref(h); }

static void export_list(void *ctx, void (*fn)(void *, const char *, const char *), void *opaque)
{
  struct nbd_listener *l = ctx;
  size_t n = 0;
  struct disk **disks = registry_list(l->reg, &n);
  for (size_t i = 0; i < n; i++) {
    char size[32], desc[96];
    format_size(disk_size(disks[i]), size, sizeof size);
    snprintf(desc, sizeof desc, "ferry disk, %s", size);
    fn(opaque, disk_name(disks[i]), desc);
    disk_unref(disks[i]);
  }
  free(disks);
}

static uint64_t export_size(void *h) { return disk_size(h); }
static const char *export_description(void *h) { return disk_image_path(h); }

static int export_pread(void *h, void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  return disk_read(h, buf, len, off, flags);
}

static int export_pwrite(void *h, const void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  return disk_write(h, buf, len, off, flags);
}

static int export_flush(void *h) { return disk_flush(h); }

static int export_trim(void *h, uint32_t len, uint64_t off, unsigned flags)
{
  return disk_trim(h, len, off, flags);
}

static int export_zero(void *h, uint32_t len, uint64_t off, unsigned flags)
{
  return disk_zero(h, len, off, flags);
}

static int export_cache(void *h, uint32_t len, uint64_t off) { return disk_cache(h, len, off); }

static int export_block_status(void *h, unsigned context, uint64_t off, uint64_t len,
                               nbd_extent_fn fn, void *opaque)
{
  if (context == 0)
    return disk_extents_allocation(h, off, len, fn, opaque);
  if (context == 1)
    return disk_extents_dirty(h, off, len, fn, opaque);
  return -EINVAL;
}

static void export_attached(void *h, struct nbd_conn *conn)
{
  disk_client_attach(h);
  struct conn_entry *e = current_entry;
  pthread_mutex_lock(&e->l->lock);
  e->conn = conn;
  pthread_cond_broadcast(&e->l->changed);
  pthread_mutex_unlock(&e->l->lock);
}

static void export_detached(void *h, struct nbd_conn *conn)
{
  struct conn_entry *e = current_entry;
  pthread_mutex_lock(&e->l->lock);
  e->conn = NULL;
  pthread_cond_broadcast(&e->l->changed);
  pthread_mutex_unlock(&e->l->lock);
  disk_client_detach(h);
}

/* ---- connections ---- */

static void *conn_thread(void *arg)
{
  struct conn_entry *e = arg;
  struct nbd_listener *l = e->l;
  current_entry = e;
  struct nbd_conn_options opt = { .workers = l->workers, .peer = e->peer };
  nbd_serve_connection(&l->exports, e->fd, &opt);

  pthread_mutex_lock(&l->lock);
  for (struct conn_entry **pp = &l->conns; *pp; pp = &(*pp)->next) {
    if (*pp == e) {
      *pp = e->next;
      break;
    }
  }
  l->nconns--;
  pthread_cond_broadcast(&l->changed);
  pthread_mutex_unlock(&l->lock);
  close(e->fd_keep);
  free(e);
  return NULL;
}

static void start_connection(struct nbd_listener *l, int fd, const struct sockaddr_storage *ss)
{
  struct conn_entry *e = calloc(1, sizeof *e);
  if (!e) {
    close(fd);
    return;
  }
  e->l = l;
  e->fd = fd;
  e->fd_keep = dup(fd);
  if (ss->ss_family == AF_INET || ss->ss_family == AF_INET6) {
    char host[INET6_ADDRSTRLEN] = "?";
    uint16_t port;
    if (ss->ss_family == AF_INET) {
      const struct sockaddr_in *in = (const void *)ss;
      inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
      port = ntohs(in->sin_port);
    } else {
      const struct sockaddr_in6 *in6 = (const void *)ss;
      inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
      port = ntohs(in6->sin6_port);
    }
    snprintf(e->peer, sizeof e->peer, "%s:%u", host, port);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  } else {
    snprintf(e->peer, sizeof e->peer, "unix:fd%d", fd);
  }
  if (e->fd_keep < 0) {
    log_error(NULL, "cannot dup client socket: %s", strerror(errno));
    close(fd);
    free(e);
    return;
  }

  pthread_mutex_lock(&l->lock);
  e->next = l->conns;
  l->conns = e;
  l->nconns++;
  pthread_mutex_unlock(&l->lock);

  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t t;
  int err = pthread_create(&t, &attr, conn_thread, e);
  pthread_attr_destroy(&attr);
  if (err) {
    log_error(NULL, "cannot start a thread for client %s: %s", e->peer, strerror(err));
    pthread_mutex_lock(&l->lock);
    l->conns = e->next;   /* e is still the head: only this thread adds */
    l->nconns--;
    pthread_mutex_unlock(&l->lock);
    close(fd);
    close(e->fd_keep);
    free(e);
  }
}

static void *accept_main(void *arg)
{
  struct nbd_listener *l = arg;
  for (;;) {
    struct pollfd p[2] = { { l->listen_fd, POLLIN, 0 }, { l->wake[0], POLLIN, 0 } };
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      log_error(NULL, "NBD listener poll failed: %s", strerror(errno));
      return NULL;
    }
    if (p[1].revents)
      return NULL;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int fd = accept4(l->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN)
        continue;
      log_error(NULL, "NBD accept failed: %s", strerror(errno));
      if (errno == EMFILE || errno == ENFILE || errno == ENOMEM)
        poll(NULL, 0, 100);   /* out of descriptors: back off instead of spinning */
      continue;
    }
    start_connection(l, fd, &ss);
  }
}

/* ---- listening ---- */

static int listen_unix(struct nbd_listener *l, const char *path, char *err, size_t errlen)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof sa.sun_path) {
    snprintf(err, errlen, "NBD socket path '%s' is too long (max %zu bytes)", path,
             sizeof sa.sun_path - 1);
    return -1;
  }
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  struct stat st;
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      snprintf(err, errlen, "NBD socket path '%s' exists and is not a socket", path);
      close(fd);
      return -1;
    }
    /* A live socket belongs to another server: never steal it. */
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
      snprintf(err, errlen, "another server is listening on '%s'", path);
      close(fd);
      return -1;
    }
    close(fd);
    unlink(path);   /* stale, left by a crash */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      snprintf(err, errlen, "socket: %s", strerror(errno));
      return -1;
    }
  }
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 128) < 0) {
    snprintf(err, errlen, "cannot listen on unix socket '%s': %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  snprintf(l->unix_path, sizeof l->unix_path, "%s", path);
  snprintf(l->address, sizeof l->address, "unix:%s", path);
  return fd;
}

static int listen_tcp(struct nbd_listener *l, const char *spec, char *err, size_t errlen)
{
  int family;
  int fd = net_listen_tcp(spec, 0, "NBD", 128, &family, &l->port, err, errlen);
  if (fd < 0)
    return -1;
  char host[64];
  uint16_t unused;
  parse_host_port(spec, host, sizeof host, &unused);
  snprintf(l->host, sizeof l->host, "%s", host);
  if (strchr(host, ':'))
    snprintf(l->address, sizeof l->address, "[%s]:%u", host, l->port);
  else
    snprintf(l->address, sizeof l->address, "%s:%u", host, l->port);
  return fd;
}

struct nbd_listener *nbd_listener_start(struct registry *reg, const char *spec,
                                        unsigned workers, char *err, size_t errlen)
{
  struct nbd_listener *l = calloc(1, sizeof *l);
  if (!l) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  l->reg = reg;
  l->workers = workers;
  l->exports = (struct nbd_exports){
    .ctx = l,
    .meta_contexts = meta_contexts,
    .n_meta_contexts = ARRAY_SIZE(meta_contexts),
    .open = export_open,
    .close = export_close,
    .list = export_list,
    .size = export_size,
    .description = export_description,
    .pread = export_pread,
    .pwrite = export_pwrite,
    .flush = export_flush,
    .trim = export_trim,
    .zero = export_zero,
    .cache = export_cache,
    .block_status = export_block_status,
    .attached = export_attached,
    .detached = export_detached,
  };
  pthread_mutex_init(&l->lock, NULL);
  pthread_cond_init(&l->changed, NULL);

  if (strncmp(spec, "unix:", 5) == 0)
    l->listen_fd = listen_unix(l, spec + 5, err, errlen);
  else
    l->listen_fd = listen_tcp(l, spec, err, errlen);
  if (l->listen_fd < 0)
    goto fail;
  if (pipe2(l->wake, O_CLOEXEC) < 0) {
    snprintf(err, errlen, "pipe: %s", strerror(errno));
    goto fail_listen;
  }
  int e = pthread_create(&l->accept_thread, NULL, accept_main, l);
  if (e) {
    snprintf(err, errlen, "cannot start the NBD accept thread: %s", strerror(e));
    close(l->wake[0]);
    close(l->wake[1]);
    goto fail_listen;
  }
  log_info(NULL, "NBD listening on %s", l->address);
  return l;

fail_listen:
  close(l->listen_fd);
  if (l->unix_path[0])
    unlink(l->unix_path);
fail:
  pthread_mutex_destroy(&l->lock);
  pthread_cond_destroy(&l->changed);
  free(l);
  return NULL;
}

void nbd_listener_uri(const struct nbd_listener *l, const char *name, char *buf, size_t len)
{
  if (l->unix_path[0])
    snprintf(buf, len, "nbd+unix:///%s?socket=%s", name, l->unix_path);
  else if (strchr(l->host, ':'))
    snprintf(buf, len, "nbd://[%s]:%u/%s", l->host, l->port, name);
  else
    snprintf(buf, len, "nbd://%s:%u/%s", l->host, l->port, name);
}

const char *nbd_listener_address(const struct nbd_listener *l) { return l->address; }

void nbd_listener_disconnect_export(struct nbd_listener *l, const char *name)
{
  pthread_mutex_lock(&l->lock);
  for (;;) {
    bool any = false;
    for (struct conn_entry *e = l->conns; e; e = e->next) {
      if (e->conn && strcmp(nbd_conn_export_name(e->conn), name) == 0) {
        nbd_conn_shutdown(e->conn);
        any = true;
      }
    }
    if (!any)
      break;
    pthread_cond_wait(&l->changed, &l->lock);
  }
  pthread_mutex_unlock(&l->lock);
  log_info(name, "NBD clients disconnected");
}

void nbd_listener_stop(struct nbd_listener *l)
{
  if (write(l->wake[1], "x", 1) < 0)
    log_warn(NULL, "cannot wake the NBD accept thread: %s", strerror(errno));
  pthread_join(l->accept_thread, NULL);
  close(l->listen_fd);
  if (l->unix_path[0])
    unlink(l->unix_path);

  pthread_mutex_lock(&l->lock);
  for (struct conn_entry *e = l->conns; e; e = e->next) {
    if (e->conn)
      nbd_conn_shutdown(e->conn);          /* finishes requests in flight */
    else
      shutdown(e->fd_keep, SHUT_RDWR);     /* still in the handshake */
  }
  while (l->nconns > 0) {
    /* A client may attach between the loop above and now: end it too. */
    for (struct conn_entry *e = l->conns; e; e = e->next)
      if (e->conn)
        nbd_conn_shutdown(e->conn);
    pthread_cond_wait(&l->changed, &l->lock);
  }
  pthread_mutex_unlock(&l->lock);
  close(l->wake[0]);
  close(l->wake[1]);
  pthread_mutex_destroy(&l->lock);
  pthread_cond_destroy(&l->changed);
  free(l);
}
