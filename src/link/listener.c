/* listener: the server side of the site link: accepts TCP connections, runs
 * each TLS handshake on a thread of its own, and hands every connection
 * that passed it to the caller's callback on that same thread (link.h).
 *
 * DESIGN
 * One accept thread.  Each accepted socket becomes a connection at once,
 * listed before its handshake starts, and gets a worker thread that runs
 * the handshake (bounded by handshake_ms) and then the callback.  So a slow
 * or silent client holds up nothing but its own thread, and at most
 * MAX_HANDSHAKES handshakes run at a time (more are refused at accept, with
 * a WARN): a flood of idle sockets cannot make unbounded threads.  A refused
 * handshake is logged at WARN with the peer's address and the fingerprint
 * it presented.
 *
 * Stop: the accept thread is woken (eventfd) and joined; every listed
 * connection is shut down (link_conn_shutdown), which ends handshakes and
 * makes the callbacks' send/recv fail with -ESHUTDOWN, so they return; then
 * every worker is joined.  A connection that a callback handed on to another
 * thread and that is still open afterwards is simply unlisted: it stays
 * valid (shut down) until its owner closes it.
 *
 * Lists: `conns` holds every live connection of the listener (the
 * link_conn_node inside each); link_conn_close unlists it first, under
 * list_mu, so stop never touches a freed connection.  list_mu is one lock
 * for all listeners, because a connection may outlive its listener.
 * `workers` holds every thread not yet joined; finished ones are joined by
 * the accept thread as it goes, so they do not pile up.
 *
 * Thread model: start and stop from one controlling thread; callbacks on
 * the workers; list_mu guards both lists, every node, `handshaking` and
 * `stopping`.  Naming: link_listener_* public (link.h),
 * link_listener_forget internal (link_int.h). */
#include "link/link_int.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"

#define MAX_HANDSHAKES 64
#define BACKLOG        64
#define ACCEPT_PAUSE_MS 100        /* after EMFILE and the like: let fds free up */

struct worker {
  struct worker *next;
  struct link_listener *l;
  struct link_conn *conn;          /* until the callback owns it */
  pthread_t thread;
  bool done;                       /* the thread is about to return */
};

struct link_listener {
  struct link_identity *id;
  link_trust_fn trust;
  void *trust_opaque;
  link_conn_fn on_conn;
  void *conn_opaque;
  unsigned handshake_ms;

  int fd;                          /* listening socket */
  int wake_fd;                     /* eventfd: stop */
  uint16_t port;
  char address[300];
  pthread_t accept_thread;

  /* list_mu: */
  struct link_conn *conns;         /* live connections (node.next chain) */
  struct worker *workers;          /* threads not yet joined */
  unsigned handshaking;
  bool stopping;
};

static pthread_mutex_t list_mu = PTHREAD_MUTEX_INITIALIZER;

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

/* list_mu held. */
static void conn_list(struct link_listener *l, struct link_conn *c)
{
  struct link_conn_node *n = link_conn_node(c);
  n->owner = l;
  n->prev = NULL;
  n->next = l->conns;
  if (l->conns)
    link_conn_node(l->conns)->prev = c;
  l->conns = c;
}

/* list_mu held. */
static void conn_unlist(struct link_conn *c)
{
  struct link_conn_node *n = link_conn_node(c);
  struct link_listener *l = n->owner;
  if (!l)
    return;
  if (n->prev)
    link_conn_node(n->prev)->next = n->next;
  else
    l->conns = n->next;
  if (n->next)
    link_conn_node(n->next)->prev = n->prev;
  n->owner = NULL;
  n->prev = n->next = NULL;
}

void link_listener_forget(struct link_conn *c)
{
  pthread_mutex_lock(&list_mu);
  conn_unlist(c);
  pthread_mutex_unlock(&list_mu);
}

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  struct link_listener *l = w->l;
  struct link_conn *c = w->conn;
  char err[384];
  int rc = link_conn_server_handshake(c, l->handshake_ms, err, sizeof err);
  pthread_mutex_lock(&list_mu);
  l->handshaking--;
  w->conn = NULL;
  pthread_mutex_unlock(&list_mu);
  if (rc < 0) {
    const char *fp = link_conn_peer_fingerprint(c);
    if (rc == -ESHUTDOWN)
      log_debug(NULL, "site link: handshake with %s ended by stop", link_conn_peer_address(c));
    else
      log_warn(NULL, "site link: refused connection from %s (presented %s): %s",
               link_conn_peer_address(c), fp[0] ? fp : "no certificate", err);
    link_conn_close(c);
  } else {
    const char *name = link_conn_peer_name(c);
    if (name[0])
      log_info(NULL, "site link: peer %s connected from %s (%s)", name,
               link_conn_peer_address(c), link_conn_peer_fingerprint(c));
    else
      log_info(NULL, "site link: peer connected from %s (%s)", link_conn_peer_address(c),
               link_conn_peer_fingerprint(c));
    l->on_conn(l->conn_opaque, c);
  }
  pthread_mutex_lock(&list_mu);
  w->done = true;
  pthread_mutex_unlock(&list_mu);
  return NULL;
}

/* Joins and frees the workers that finished (accept thread). */
static void reap_workers(struct link_listener *l)
{
  for (;;) {
    struct worker *done = NULL;
    pthread_mutex_lock(&list_mu);
    for (struct worker **p = &l->workers; *p; p = &(*p)->next) {
      if ((*p)->done) {
        done = *p;
        *p = done->next;
        break;
      }
    }
    pthread_mutex_unlock(&list_mu);
    if (!done)
      return;
    pthread_join(done->thread, NULL);
    free(done);
  }
}

/* Makes a connection of an accepted socket and starts its worker. */
static void start_worker(struct link_listener *l, int fd, const char *peer)
{
  char err[256];
  pthread_mutex_lock(&list_mu);
  bool full = l->handshaking >= MAX_HANDSHAKES;
  pthread_mutex_unlock(&list_mu);
  if (full) {
    log_warn(NULL, "site link: refused connection from %s: %d handshakes already running",
             peer, MAX_HANDSHAKES);
    close(fd);
    return;
  }
  struct worker *w = calloc(1, sizeof *w);
  struct link_conn *c = w ? link_conn_server_new(l->id, fd, l->trust, l->trust_opaque, err,
                                                 sizeof err)
                          : NULL;
  if (!c) {
    if (!w) {
      close(fd);
      snprintf(err, sizeof err, "out of memory");
    }
    log_warn(NULL, "site link: refused connection from %s: %s", peer, err);
    free(w);
    return;
  }
  w->l = l;
  w->conn = c;
  pthread_mutex_lock(&list_mu);
  bool stopping = l->stopping;
  if (!stopping) {
    conn_list(l, c);
    l->handshaking++;
    w->next = l->workers;
    l->workers = w;
  }
  pthread_mutex_unlock(&list_mu);
  if (stopping) {
    link_conn_close(c);
    free(w);
    return;
  }
  int e = pthread_create(&w->thread, NULL, worker_main, w);
  if (e) {
    pthread_mutex_lock(&list_mu);
    for (struct worker **p = &l->workers; *p; p = &(*p)->next) {
      if (*p == w) {
        *p = w->next;
        break;
      }
    }
    l->handshaking--;
    pthread_mutex_unlock(&list_mu);
    log_warn(NULL, "site link: refused connection from %s: cannot start a thread: %s", peer,
             strerror(e));
    link_conn_close(c);
    free(w);
  }
}

static void *accept_main(void *arg)
{
  struct link_listener *l = arg;
  for (;;) {
    struct pollfd p[2] = { { .fd = l->wake_fd, .events = POLLIN },
                           { .fd = l->fd, .events = POLLIN } };
    if (poll(p, 2, -1) < 0 && errno != EINTR) {
      log_error(NULL, "site link: poll on %s: %s", l->address, strerror(errno));
      poll(p, 1, ACCEPT_PAUSE_MS);
    }
    if (p[0].revents)
      break;
    reap_workers(l);
    if (!(p[1].revents & POLLIN))
      continue;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
        continue;
      log_warn(NULL, "site link: accept on %s: %s", l->address, strerror(errno));
      struct pollfd w = { .fd = l->wake_fd, .events = POLLIN };
      poll(&w, 1, ACCEPT_PAUSE_MS);   /* EMFILE, ENOBUFS...: do not spin */
      continue;
    }
    char peer[INET6_ADDRSTRLEN + 16] = "unknown";
    char host[INET6_ADDRSTRLEN + 8], port[16];
    if (getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0)
      set_err(peer, sizeof peer, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
    start_worker(l, fd, peer);
  }
  return NULL;
}

struct link_listener *link_listener_start(struct link_identity *id, const char *host_port,
                                          link_trust_fn trust, void *trust_opaque,
                                          link_conn_fn on_conn, void *conn_opaque,
                                          unsigned handshake_ms, char *err, size_t errlen)
{
  if (!id || !trust || !on_conn || !host_port) {
    set_err(err, errlen, "site link listener: identity, address, trust and callback needed");
    return NULL;
  }
  struct link_listener *l = calloc(1, sizeof *l);
  if (!l) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  *l = (struct link_listener){ .id = id, .trust = trust, .trust_opaque = trust_opaque,
                               .on_conn = on_conn, .conn_opaque = conn_opaque,
                               .handshake_ms = handshake_ms, .fd = -1, .wake_fd = -1 };
  int family;
  l->fd = net_listen_tcp(host_port, SOCK_NONBLOCK, "site link", BACKLOG, &family, &l->port,
                         err, errlen);
  if (l->fd < 0) {
    free(l);
    return NULL;
  }
  char host[256];
  uint16_t unused;
  parse_host_port(host_port, host, sizeof host, &unused);   /* net_listen_tcp parsed it */
  snprintf(l->address, sizeof l->address, family == AF_INET6 ? "[%s]:%u" : "%s:%u", host,
           l->port);
  l->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int e = l->wake_fd < 0 ? errno : pthread_create(&l->accept_thread, NULL, accept_main, l);
  if (e) {
    set_err(err, errlen, "site link listener on %s: %s", l->address, strerror(e));
    if (l->wake_fd >= 0)
      close(l->wake_fd);
    close(l->fd);
    free(l);
    return NULL;
  }
  log_info(NULL, "site link: listening on %s", l->address);
  return l;
}

uint16_t link_listener_port(const struct link_listener *l) { return l->port; }
const char *link_listener_address(const struct link_listener *l) { return l->address; }

void link_listener_stop(struct link_listener *l)
{
  if (!l)
    return;
  uint64_t one = 1;
  ssize_t r = write(l->wake_fd, &one, sizeof one);
  (void)r;
  pthread_join(l->accept_thread, NULL);   /* no new workers from here on */
  close(l->fd);

  pthread_mutex_lock(&list_mu);
  l->stopping = true;
  for (struct link_conn *c = l->conns; c; c = link_conn_node(c)->next)
    link_conn_shutdown(c);
  struct worker *w = l->workers;
  l->workers = NULL;
  pthread_mutex_unlock(&list_mu);

  while (w) {
    struct worker *next = w->next;
    pthread_join(w->thread, NULL);
    free(w);
    w = next;
  }

  /* Left: connections a callback passed to another thread. */
  pthread_mutex_lock(&list_mu);
  while (l->conns)
    conn_unlist(l->conns);
  pthread_mutex_unlock(&list_mu);
  close(l->wake_fd);
  log_info(NULL, "site link: stopped listening on %s", l->address);
  free(l);
}
