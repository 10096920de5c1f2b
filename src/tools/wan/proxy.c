/* proxy: ferry-wan's event loop and its forwarded connections.
 *
 * DESIGN
 * One thread, one epoll set, level-triggered.  Each accepted connection gets
 * one outgoing connection to the target; each of its two directions (a
 * `half`) owns one ring buffer: bytes are read from the source socket into
 * the ring and written from the ring to the destination socket, never copied
 * in between.  Beside the bytes, a half keeps a FIFO of chunks: each read
 * becomes a chunk stamped with release_ns = read time + delay, and a chunk's
 * bytes may leave only once release_ns has passed.  Reads that land within
 * MERGE_NS of the tail chunk's first release time join it (its release time
 * becomes the later one), so chunks stay few and no byte ever leaves early.
 * The FIFO never reorders: a delay lowered at run time makes new chunks wait
 * behind older ones, as a real path would.
 *
 * Queue bound: a half (one connection, one direction) reads only while it
 * holds fewer than queue_limit() = max(4 MiB, 2 x rate x delay) bytes (at
 * most QUEUE_MAX); past that, the source socket is no longer polled and TCP
 * backpressure reaches the sender.  The kernel's socket buffers come on top.
 * The ring starts at RING_INITIAL when first used and grows by doubling (a
 * rare copy) up to the bound, so memory follows what is actually queued.
 *
 * Rate: one virtual-time token bucket per direction, shared by every
 * connection (a WAN pipe).  pipe.next_free_ns is the end of the last
 * transmission on the CLOCK_MONOTONIC axis; the allowance at `now` is what
 * the rate carries in [max(next_free_ns, now - burst), now), burst being
 * max(10 ms, 64 KiB at the rate).  While a pipe is short of a quantum
 * (max(16 KiB, 1 ms at the rate)) the loop sleeps until the quantum is due;
 * each write takes at most a quantum and the connection list rotates, so
 * connections share the pipe fairly.  A rate change starts a new schedule.
 *
 * Timers: pump_all() writes what may leave and returns the earliest moment
 * something else may (a chunk's release, a quantum of tokens, a delayed FIN,
 * the end of a `cut DURATION`); one absolute CLOCK_MONOTONIC timerfd is armed
 * for it.  Nothing polls.
 *
 * Stall: nothing is written (FINs included); reads go on up to the bound.
 * Cut: every connection is reset (SO_LINGER 0, both sides) and new ones are
 * accepted only to be reset, until restore.  Flip: when a chunk's first
 * bytes are about to be written and the direction has flips pending, one
 * random bit of that chunk (still in the ring) is inverted.
 *
 * End of stream: a source's EOF is stamped like a chunk (read time + delay);
 * once the half has drained past it, the destination gets shutdown(SHUT_WR).
 * When both halves are shut the connection is closed.  A read or write
 * error on either socket resets both (the reset travels on).
 *
 * Lifetime: a connection that ends is unlinked and put on a dead list at
 * once (its fds closed), and freed after the current epoll batch, since
 * later events of the same batch may still point into it.  Control clients
 * (control.c) have one fd each, so they are freed on the spot. */
#include "tools/wan/wan.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"

#define KiB 1024ull
#define MiB (1024ull * KiB)

#define QUEUE_MIN        (4 * MiB)      /* queue bound with no rate or no delay */
#define QUEUE_MAX        (512 * MiB)    /* ... and at most (huge rate x delay) */
#define RING_INITIAL     (256 * KiB)
#define READ_MAX         (1 * MiB)      /* one read(2) */
#define READ_MIN         (64 * KiB)     /* the ring grows when less is free */
#define CHUNKS_INITIAL   64
#define CHUNK_LEN_MAX    (1u << 30)
#define MERGE_NS         (200 * 1000ull)
#define BURST_NS         (10 * NS_PER_MS)
#define BURST_MIN_BYTES  (64 * KiB)
#define QUANTUM_NS       NS_PER_MS
#define QUANTUM_MIN      (16 * KiB)
#define PUMP_PASSES      64             /* rounds of fair sharing per wake-up */
#define ACCEPT_PAUSE_NS  (100 * NS_PER_MS) /* after EMFILE */
#define MAX_EVENTS       64
#define NO_DEADLINE      UINT64_MAX

struct chunk {
  uint64_t release_ns;       /* its bytes leave at or after this */
  uint64_t first_ns;         /* release time of its first read (bounds merging) */
  uint32_t len;              /* bytes not yet written */
  bool started;              /* writing began (and a flip was considered) */
};

/* One direction of one connection: src socket -> ring -> dst socket. */
struct half {
  char *buf;                 /* ring of cap bytes (power of two), NULL until used */
  uint64_t cap;
  uint64_t head, tail;       /* byte positions, tail - head = queued */
  struct chunk *chunks;      /* ring of chunk_cap (power of two) */
  uint64_t chunk_cap;
  uint64_t chead, ctail;     /* chunk indices */
  uint64_t ready_n;          /* chunks from chead known released ... */
  uint64_t ready_bytes;      /* ... and their bytes not yet written */
  uint64_t eof_ns;           /* when eof: the FIN leaves at or after this */
  uint64_t bytes;            /* written to dst */
  bool eof;                  /* src has ended */
  bool shut;                 /* dst has been shut down for writing */
  bool want_out;             /* dst is full: wait for EPOLLOUT */
};

struct conn;

struct endpoint {
  struct wan_handler h;      /* first: the loop hands us &h */
  struct conn *c;
  int side;                  /* 0: accepted (listen side), 1: connect side */
  int fd;
  uint32_t events;           /* current epoll interest */
};

struct conn {
  struct endpoint ep[2];
  struct half half[2];       /* [WAN_UP]: ep[0] -> ep[1]; [WAN_DOWN]: ep[1] -> ep[0] */
  uint64_t id;
  bool connecting;           /* ep[1]'s connect(2) is in progress */
  bool dead;                 /* unlinked, fds closed; freed after the batch */
  struct conn *prev, *next;  /* live list, or (next) dead list */
};

/* One direction of the emulated WAN pipe, shared by every connection. */
struct pipe_dir {
  uint64_t next_free_ns;     /* end of the last transmission (virtual time) */
  uint64_t bytes;            /* forwarded */
  uint64_t chunks;           /* chunks whose writing began */
  uint64_t flip_pending;
  uint64_t flipped;          /* bits inverted */
};

struct wan {
  int epfd, timerfd, sigfd, listen_fd;
  struct wan_handler listen_h, timer_h, sig_h;
  uint32_t listen_events, timer_events, sig_events;
  uint64_t timer_armed_ns;   /* 0: disarmed or expired */
  struct sockaddr_storage target;
  socklen_t target_len;
  char listen_addr[300];
  char connect_addr[300];
  struct wan_control *ctl;

  uint64_t delay_ns, rate_bps;
  bool stalled, cut, quit;
  uint64_t cut_until_ns;     /* 0: until restore */
  uint64_t accept_paused_until_ns;
  int spare_sock;            /* made for the next client, before its accept */
  bool accept_starved;       /* EMFILE was logged; quiet until an accept works */
  struct pipe_dir pipe[2];

  struct conn *conns;        /* live connections, served in this order */
  struct conn *dead;
  uint64_t next_id;
  uint64_t accepted, active, closed, resets, refused, connect_failed, cuts;
  uint64_t rng;
  uint64_t started_ns;
};

static const char *const dir_names[2] = { "up", "down" };

/* --- small helpers ------------------------------------------------------ */

static uint64_t rng_next(struct wan *w)
{
  uint64_t x = w->rng;       /* xorshift64: flips need no cryptography */
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return w->rng = x;
}

static void close_rst(int fd)
{
  struct linger l = { .l_onoff = 1, .l_linger = 0 };
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  close(fd);
}

static void set_nodelay(int fd)
{
  int one = 1;       /* the sender already chose its segment sizes */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void deadline_min(uint64_t *deadline, uint64_t t)
{
  if (t < *deadline)
    *deadline = t;
}

int wan_watch(struct wan *w, int fd, struct wan_handler *h, uint32_t events, uint32_t *current)
{
  if (events == *current)
    return 0;
  /* Never registered with an empty mask: EPOLLHUP would still be reported
   * and, level-triggered, spin the loop while we do not want to read. */
  int op = *current == 0 ? EPOLL_CTL_ADD : events == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
  struct epoll_event ev = { .events = events, .data.ptr = h };
  if (epoll_ctl(w->epfd, op, fd, &ev) < 0) {
    int e = errno;
    log_error(NULL, "epoll_ctl(fd %d): %s", fd, strerror(e));
    return -e;
  }
  *current = events;
  return 0;
}

/* --- rate --------------------------------------------------------------- */

/* Nanoseconds that bytes take at bps (bps > 0), rounded up. */
static uint64_t cost_ns(uint64_t bytes, uint64_t bps)
{
  unsigned __int128 ns = ((unsigned __int128)bytes * 8 * NS_PER_S + bps - 1) / bps;
  return ns > UINT64_MAX / 4 ? UINT64_MAX / 4 : (uint64_t)ns;
}

/* Bytes that ns carries at bps, rounded down. */
static uint64_t bytes_in(uint64_t ns, uint64_t bps)
{
  unsigned __int128 b = (unsigned __int128)ns * bps / (8 * NS_PER_S);
  return b > UINT64_MAX / 4 ? UINT64_MAX / 4 : (uint64_t)b;
}

static uint64_t burst_ns(const struct wan *w)
{
  return MAX(BURST_NS, cost_ns(BURST_MIN_BYTES, w->rate_bps));
}

static uint64_t quantum(const struct wan *w)
{
  uint64_t q = MAX(QUANTUM_MIN, bytes_in(QUANTUM_NS, w->rate_bps));
  return MIN(q, bytes_in(burst_ns(w), w->rate_bps));
}

/* Where the pipe's schedule starts at now: it lags by at most the burst. */
static uint64_t pipe_start(const struct wan *w, enum wan_dir d, uint64_t now)
{
  uint64_t b = burst_ns(w);
  return MAX(w->pipe[d].next_free_ns, now > b ? now - b : 0);
}

static uint64_t queue_limit(const struct wan *w)
{
  uint64_t bdp2 = w->rate_bps ? 2 * bytes_in(w->delay_ns, w->rate_bps) : 0;
  return MIN(MAX(QUEUE_MIN, bdp2), QUEUE_MAX);
}

/* --- rings and chunks --------------------------------------------------- */

/* Makes the ring at least want bytes (power of two); 0 or -ENOMEM. */
static int ring_grow(struct half *h, uint64_t want)
{
  uint64_t cap = h->cap ? h->cap : RING_INITIAL;
  while (cap < want)
    cap *= 2;
  if (cap == h->cap)
    return 0;
  char *nb = malloc(cap);
  if (!nb)
    return -ENOMEM;
  uint64_t queued = h->tail - h->head;
  if (queued) {              /* unwrap into the new ring */
    uint64_t pos = h->head & (h->cap - 1);
    uint64_t first = MIN(queued, h->cap - pos);
    memcpy(nb, h->buf + pos, first);
    memcpy(nb + first, h->buf, queued - first);
  }
  free(h->buf);
  h->buf = nb;
  h->cap = cap;
  h->head = 0;
  h->tail = queued;
  return 0;
}

static struct chunk *chunk_at(const struct half *h, uint64_t i)
{
  return &h->chunks[i & (h->chunk_cap - 1)];
}

static int chunks_grow(struct half *h)
{
  uint64_t cap = h->chunk_cap ? h->chunk_cap * 2 : CHUNKS_INITIAL;
  struct chunk *nc = malloc(cap * sizeof *nc);
  if (!nc)
    return -ENOMEM;
  uint64_t n = h->ctail - h->chead;
  for (uint64_t i = 0; i < n; i++)
    nc[i] = *chunk_at(h, h->chead + i);
  free(h->chunks);
  h->chunks = nc;
  h->chunk_cap = cap;
  h->chead = 0;
  h->ctail = n;
  return 0;
}

/* Records n bytes just read at now as a chunk (or part of the tail one). */
static int chunk_add(struct half *h, uint64_t n, uint64_t release)
{
  if (h->ctail > h->chead + h->ready_n) {
    struct chunk *t = chunk_at(h, h->ctail - 1);
    if (!t->started && release - t->first_ns <= MERGE_NS && t->len + n <= CHUNK_LEN_MAX) {
      t->len += (uint32_t)n;
      t->release_ns = MAX(t->release_ns, release);
      return 0;
    }
  }
  if (h->ctail - h->chead == h->chunk_cap && chunks_grow(h) < 0)
    return -ENOMEM;
  *chunk_at(h, h->ctail++) = (struct chunk){ .release_ns = release, .first_ns = release,
                                             .len = (uint32_t)n };
  return 0;
}

/* Counts the chunks whose release time has come. */
static void half_advance(struct half *h, uint64_t now)
{
  while (h->chead + h->ready_n < h->ctail) {
    struct chunk *c = chunk_at(h, h->chead + h->ready_n);
    if (c->release_ns > now)
      break;
    h->ready_n++;
    h->ready_bytes += c->len;
  }
}

/* Drops n written bytes from the front. */
static void half_consume(struct half *h, uint64_t n)
{
  h->head += n;
  h->ready_bytes -= n;
  while (n) {
    struct chunk *c = chunk_at(h, h->chead);
    uint64_t take = MIN(n, c->len);
    c->len -= (uint32_t)take;
    n -= take;
    if (c->len == 0) {
      h->chead++;
      h->ready_n--;
    }
  }
}

/* Marks the chunks that the next n bytes touch as started, and inverts one
 * random bit in each of them while the direction has flips pending. */
static void half_flip(struct wan *w, struct half *h, enum wan_dir d, uint64_t n)
{
  struct pipe_dir *p = &w->pipe[d];
  uint64_t off = 0;          /* from h->head */
  for (uint64_t i = h->chead; i < h->ctail && off < n; i++) {
    struct chunk *c = chunk_at(h, i);
    if (!c->started) {
      c->started = true;
      p->chunks++;
      if (p->flip_pending && c->len) {
        uint64_t r = rng_next(w);
        uint64_t pos = (h->head + off + r % c->len) & (h->cap - 1);
        h->buf[pos] ^= (char)(1u << ((r >> 32) & 7));
        p->flip_pending--;
        p->flipped++;
        log_debug(NULL, "flipped a bit %s at stream byte %llu", dir_names[d],
                  (unsigned long long)(h->bytes + off + r % c->len));
      }
    }
    off += c->len;
  }
}

/* --- connections -------------------------------------------------------- */

static void ep_event(struct wan *w, struct wan_handler *hd, uint32_t events);

/* Ends c: both fds closed (reset when rst), c moved to the dead list. */
static void conn_end(struct wan *w, struct conn *c, bool rst, const char *why)
{
  if (c->dead)
    return;
  for (int s = 0; s < 2; s++) {
    struct endpoint *ep = &c->ep[s];
    if (ep->fd < 0)
      continue;
    wan_watch(w, ep->fd, &ep->h, 0, &ep->events);
    if (rst)
      close_rst(ep->fd);
    else
      close(ep->fd);
    ep->fd = -1;
  }
  log_debug(NULL, "conn %llu: %s (%s): %llu bytes up, %llu down",
            (unsigned long long)c->id, rst ? "reset" : "closed", why,
            (unsigned long long)c->half[WAN_UP].bytes,
            (unsigned long long)c->half[WAN_DOWN].bytes);
  if (rst)
    w->resets++;
  else
    w->closed++;
  w->active--;
  c->dead = true;
  if (w->ctl)
    wan_control_resume(w->ctl);   /* its fds are free again */
  if (c->prev)
    c->prev->next = c->next;
  else
    w->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = NULL;
  c->next = w->dead;
  w->dead = c;
}

static void conn_free(struct conn *c)
{
  for (int d = 0; d < 2; d++) {
    free(c->half[d].buf);
    free(c->half[d].chunks);
  }
  free(c);
}

static void reap_dead(struct wan *w)
{
  while (w->dead) {
    struct conn *c = w->dead;
    w->dead = c->next;
    conn_free(c);
  }
}

static bool half_can_read(const struct half *h, uint64_t limit)
{
  return !h->eof && h->tail - h->head < limit;
}

/* Sets both endpoints' epoll interest from the state of the halves. */
static void conn_update(struct wan *w, struct conn *c)
{
  uint64_t limit = queue_limit(w);
  uint32_t ev0 = 0, ev1 = 0;
  if (half_can_read(&c->half[WAN_UP], limit))
    ev0 |= EPOLLIN;
  if (c->half[WAN_DOWN].want_out)
    ev0 |= EPOLLOUT;
  if (c->connecting) {
    ev1 = EPOLLOUT;
  } else {
    if (half_can_read(&c->half[WAN_DOWN], limit))
      ev1 |= EPOLLIN;
    if (c->half[WAN_UP].want_out)
      ev1 |= EPOLLOUT;
  }
  if (wan_watch(w, c->ep[0].fd, &c->ep[0].h, ev0, &c->ep[0].events) < 0 ||
      wan_watch(w, c->ep[1].fd, &c->ep[1].h, ev1, &c->ep[1].events) < 0)
    conn_end(w, c, true, "epoll failed");
}

/* Reads what the source of half d offers.  0, or -errno to end c. */
static int half_read(struct wan *w, struct conn *c, enum wan_dir d, uint64_t now)
{
  struct half *h = &c->half[d];
  int fd = c->ep[d == WAN_UP ? 0 : 1].fd;
  uint64_t limit = queue_limit(w);
  uint64_t queued = h->tail - h->head;
  if (!half_can_read(h, limit))
    return 0;
  if ((!h->buf || h->cap - queued < READ_MIN) && h->cap < limit &&
      ring_grow(h, h->cap ? h->cap * 2 : RING_INITIAL) < 0)
    return -ENOMEM;
  uint64_t room = MIN(MIN(h->cap - queued, limit - queued), READ_MAX);
  if (room == 0)
    return 0;
  uint64_t pos = h->tail & (h->cap - 1);
  uint64_t first = MIN(room, h->cap - pos);
  struct iovec iov[2] = { { h->buf + pos, first }, { h->buf, room - first } };
  ssize_t r = readv(fd, iov, room > first ? 2 : 1);
  if (r < 0)
    return errno == EAGAIN || errno == EINTR ? 0 : -errno;
  if (r == 0) {
    h->eof = true;
    h->eof_ns = now + w->delay_ns;
    return 0;
  }
  h->tail += (uint64_t)r;
  return chunk_add(h, (uint64_t)r, now + w->delay_ns);
}

/* Half d has nothing released to write: lowers *deadline to the next
 * release, or passes the source's EOF on once its time has come. */
static void half_idle(struct half *h, int fd, uint64_t now, uint64_t *deadline)
{
  if (h->chead < h->ctail) {
    deadline_min(deadline, chunk_at(h, h->chead + h->ready_n)->release_ns);
  } else if (h->eof && !h->shut) {
    if (now < h->eof_ns) {
      deadline_min(deadline, h->eof_ns);
    } else {
      shutdown(fd, SHUT_WR);
      h->shut = true;
    }
  }
}

/* Writes what half d may send now: released bytes, within the pipe's
 * allowance.  Returns bytes written, or -errno to end c; lowers *deadline
 * to when it may next write. */
static int64_t half_pump(struct wan *w, struct conn *c, enum wan_dir d, uint64_t now,
                         uint64_t *deadline)
{
  struct half *h = &c->half[d];
  int fd = c->ep[d == WAN_UP ? 1 : 0].fd;
  if (h->shut || h->want_out || (d == WAN_UP && c->connecting))
    return 0;
  half_advance(h, now);
  if (h->ready_bytes == 0) {
    half_idle(h, fd, now, deadline);
    return 0;
  }
  uint64_t n = h->ready_bytes;
  uint64_t start = 0;
  if (w->rate_bps) {
    uint64_t q = quantum(w);
    start = pipe_start(w, d, now);
    uint64_t allow = start < now ? bytes_in(now - start, w->rate_bps) : 0;
    if (allow < MIN(n, q)) {
      deadline_min(deadline, start + cost_ns(MIN(n, q), w->rate_bps));
      return 0;
    }
    n = MIN(MIN(n, allow), q);
  }
  half_flip(w, h, d, n);
  uint64_t pos = h->head & (h->cap - 1);
  uint64_t first = MIN(n, h->cap - pos);
  struct iovec iov[2] = { { h->buf + pos, first }, { h->buf, n - first } };
  struct msghdr msg = { .msg_iov = iov, .msg_iovlen = n > first ? 2 : 1 };
  ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (r < 0) {
    if (errno == EAGAIN) {
      h->want_out = true;
      return 0;
    }
    return errno == EINTR ? 0 : -errno;
  }
  half_consume(h, (uint64_t)r);
  h->bytes += (uint64_t)r;
  w->pipe[d].bytes += (uint64_t)r;
  if (w->rate_bps)
    w->pipe[d].next_free_ns = start + cost_ns((uint64_t)r, w->rate_bps);
  if ((uint64_t)r < n)
    h->want_out = true;      /* the socket is full: EPOLLOUT tells us when not */
  else if (h->ready_bytes == 0)
    half_idle(h, fd, now, deadline);   /* drained: the next release, or the FIN */
  return r;
}

static void conn_connected(struct wan *w, struct conn *c)
{
  int e = 0;
  socklen_t el = sizeof e;
  if (getsockopt(c->ep[1].fd, SOL_SOCKET, SO_ERROR, &e, &el) < 0)
    e = errno;
  if (e) {
    log_warn(NULL, "conn %llu: cannot connect to %s: %s", (unsigned long long)c->id,
             w->connect_addr, strerror(e));
    w->connect_failed++;
    conn_end(w, c, true, "connect failed");
    return;
  }
  c->connecting = false;
  log_debug(NULL, "conn %llu: connected to %s", (unsigned long long)c->id, w->connect_addr);
}

static void ep_event(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  struct endpoint *ep = container_of(hd, struct endpoint, h);
  struct conn *c = ep->c;
  if (c->dead)
    return;
  if (ep->side == 1 && c->connecting) {
    conn_connected(w, c);
    return;
  }
  /* ep is the source of half[side] and the destination of the other. */
  if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
    c->half[1 - ep->side].want_out = false;
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    int r = half_read(w, c, (enum wan_dir)ep->side, now_ns());
    if (r < 0)
      conn_end(w, c, true, strerror(-r));
  }
}

/* Out of fds or memory.  Level-triggered, the listener would spin: look
 * again a bit later; new clients wait in the backlog meanwhile. */
static void accept_pause(struct wan *w, const char *what, int e)
{
  if (!w->accept_starved)
    log_warn(NULL, "%s: %s: new connections wait until resources are freed", what,
             strerror(e));
  w->accept_starved = true;
  wan_watch(w, w->listen_fd, &w->listen_h, 0, &w->listen_events);
  w->accept_paused_until_ns = now_ns() + ACCEPT_PAUSE_NS;
}

/* Starts forwarding accepted cfd through the unconnected socket sfd. */
static void conn_start(struct wan *w, int cfd, int sfd)
{
  struct conn *c = calloc(1, sizeof *c);
  if (!c) {
    log_warn(NULL, "out of memory: connection refused");
    close_rst(cfd);
    close(sfd);
    w->refused++;
    return;
  }
  c->id = ++w->next_id;
  for (int s = 0; s < 2; s++)
    c->ep[s] = (struct endpoint){ .h.fn = ep_event, .c = c, .side = s, .fd = -1 };
  c->ep[0].fd = cfd;
  c->ep[1].fd = sfd;
  c->next = w->conns;
  if (w->conns)
    w->conns->prev = c;
  w->conns = c;
  w->accepted++;
  w->active++;
  set_nodelay(cfd);
  set_nodelay(sfd);
  if (connect(sfd, (struct sockaddr *)&w->target, w->target_len) < 0) {
    if (errno != EINPROGRESS) {
      log_warn(NULL, "conn %llu: cannot connect to %s: %s", (unsigned long long)c->id,
               w->connect_addr, strerror(errno));
      w->connect_failed++;
      conn_end(w, c, true, "connect failed");
      return;
    }
    c->connecting = true;
  }
  log_debug(NULL, "conn %llu: accepted", (unsigned long long)c->id);
  conn_update(w, c);
}

/* Accepts while the backlog holds clients.  The outgoing socket is made
 * before the accept, so running out of fds leaves clients waiting in the
 * backlog instead of accepting them only to drop them; an unused one is
 * kept (spare_sock) for the next client. */
static void listen_event(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  for (;;) {
    if (w->spare_sock < 0 && !w->cut) {
      w->spare_sock = socket(w->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                             0);
      if (w->spare_sock < 0) {
        accept_pause(w, "socket", errno);
        return;
      }
    }
    int fd = accept4(w->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EINTR)
        return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        accept_pause(w, "accept", errno);
        return;
      }
      continue;              /* ECONNABORTED and the like: that one is gone */
    }
    if (w->cut) {
      close_rst(fd);
      w->refused++;
      continue;
    }
    w->accept_starved = false;
    conn_start(w, fd, w->spare_sock);
    w->spare_sock = -1;
  }
}

/* Writes what may leave now on every connection, updates their epoll
 * interest, and returns the next moment something may leave. */
static uint64_t pump_all(struct wan *w, uint64_t now)
{
  uint64_t deadline = NO_DEADLINE;
  if (w->cut && w->cut_until_ns) {
    if (now >= w->cut_until_ns) {
      log_info(NULL, "cut over: accepting and forwarding again");
      w->cut = false;
      w->cut_until_ns = 0;
    } else {
      deadline_min(&deadline, w->cut_until_ns);
    }
  }
  if (w->accept_paused_until_ns) {
    if (now >= w->accept_paused_until_ns) {
      w->accept_paused_until_ns = 0;
      wan_watch(w, w->listen_fd, &w->listen_h, EPOLLIN, &w->listen_events);
    } else {
      deadline_min(&deadline, w->accept_paused_until_ns);
    }
  }
  if (!w->stalled) {
    for (int pass = 0; pass < PUMP_PASSES; pass++) {
      bool progress = false;
      for (struct conn *c = w->conns, *next; c; c = next) {
        next = c->next;
        for (int d = 0; d < 2 && !c->dead; d++) {
          int64_t r = half_pump(w, c, (enum wan_dir)d, now, &deadline);
          if (r < 0)
            conn_end(w, c, true, strerror((int)-r));
          else if (r > 0)
            progress = true;
        }
      }
      if (!progress || !w->rate_bps)
        break;               /* unlimited: one pass wrote all it could */
      if (pass == PUMP_PASSES - 1)
        deadline_min(&deadline, now);   /* more to share: go round again at once */
    }
  }
  for (struct conn *c = w->conns, *next; c; c = next) {
    next = c->next;
    if (c->half[WAN_UP].shut && c->half[WAN_DOWN].shut)
      conn_end(w, c, false, "both sides done");
    else
      conn_update(w, c);
  }
  /* Rotate: whoever went first this time goes last next time. */
  if (w->conns && w->conns->next) {
    struct conn *first = w->conns, *last = first;
    while (last->next)
      last = last->next;
    w->conns = first->next;
    w->conns->prev = NULL;
    first->prev = last;
    first->next = NULL;
    last->next = first;
  }
  return deadline;
}

/* --- timer and signals -------------------------------------------------- */

static void timer_fn(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  uint64_t expirations;
  if (read(w->timerfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
    log_warn(NULL, "timerfd read: %s", strerror(errno));
  w->timer_armed_ns = 0;
}

/* Arms the timer for deadline.  With no deadline an armed timer is left
 * alone: waking once for nothing costs less than disarming every round. */
static void timer_arm(struct wan *w, uint64_t deadline)
{
  if (deadline == NO_DEADLINE || deadline == w->timer_armed_ns)
    return;
  struct itimerspec its = { .it_value = { .tv_sec = (time_t)(deadline / NS_PER_S),
                                          .tv_nsec = (long)(deadline % NS_PER_S) } };
  if (timerfd_settime(w->timerfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) {
    log_error(NULL, "timerfd_settime: %s", strerror(errno));
    return;
  }
  w->timer_armed_ns = deadline;
}

static void sig_fn(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  struct signalfd_siginfo si;
  if (read(w->sigfd, &si, sizeof si) != (ssize_t)sizeof si)
    return;
  log_info(NULL, "%s: exiting", strsignal((int)si.ssi_signo));
  w->quit = true;
}

/* --- control operations ------------------------------------------------- */

void wan_set_delay(struct wan *w, uint64_t ns)
{
  w->delay_ns = ns;
}

void wan_set_rate(struct wan *w, uint64_t bps)
{
  w->rate_bps = bps;
  for (int d = 0; d < 2; d++)
    w->pipe[d].next_free_ns = 0;   /* a new rate starts a new schedule */
}

void wan_set_stall(struct wan *w, bool stalled)
{
  w->stalled = stalled;
}

unsigned wan_cut(struct wan *w, uint64_t duration_ns)
{
  unsigned n = 0;
  while (w->conns) {
    conn_end(w, w->conns, true, "cut");
    n++;
  }
  w->cut = true;
  w->cut_until_ns = duration_ns ? now_ns() + duration_ns : 0;
  w->cuts += n;
  return n;
}

void wan_restore(struct wan *w)
{
  w->cut = false;
  w->cut_until_ns = 0;
  w->stalled = false;
}

void wan_flip(struct wan *w, bool up, bool down, uint64_t n)
{
  if (up)
    w->pipe[WAN_UP].flip_pending = MIN(w->pipe[WAN_UP].flip_pending + n, WAN_FLIP_MAX);
  if (down)
    w->pipe[WAN_DOWN].flip_pending = MIN(w->pipe[WAN_DOWN].flip_pending + n, WAN_FLIP_MAX);
}

void wan_quit(struct wan *w)
{
  w->quit = true;
}

size_t wan_stats_json(struct wan *w, char *buf, size_t len)
{
  uint64_t queued[2] = { 0, 0 };
  for (struct conn *c = w->conns; c; c = c->next)
    for (int d = 0; d < 2; d++)
      queued[d] += c->half[d].tail - c->half[d].head;
  uint64_t now = now_ns();
  char delay[32], rate[32];
  wan_format_duration(w->delay_ns, delay, sizeof delay);
  wan_format_rate(w->rate_bps, rate, sizeof rate);
  const char *state = w->cut ? "cut" : w->stalled ? "stalled" : "forwarding";
  uint64_t cut_left_ms = w->cut && w->cut_until_ns > now
                           ? (w->cut_until_ns - now + NS_PER_MS - 1) / NS_PER_MS : 0;
#define U(x) ((unsigned long long)(x))
  int n = snprintf(buf, len,
    "{\"bytes_up\":%llu,\"bytes_down\":%llu,\"chunks_up\":%llu,\"chunks_down\":%llu,"
    "\"flipped_up\":%llu,\"flipped_down\":%llu,"
    "\"flip_pending_up\":%llu,\"flip_pending_down\":%llu,"
    "\"queued_up\":%llu,\"queued_down\":%llu,\"queue_limit\":%llu,"
    "\"accepted\":%llu,\"active\":%llu,\"closed\":%llu,\"reset\":%llu,\"cut_resets\":%llu,"
    "\"refused\":%llu,\"connect_failed\":%llu,"
    "\"delay\":\"%s\",\"delay_ns\":%llu,\"rate\":\"%s\",\"rate_bps\":%llu,"
    "\"state\":\"%s\",\"stalled\":%s,\"cut_remaining_ms\":%llu,\"uptime_ms\":%llu}",
    U(w->pipe[0].bytes), U(w->pipe[1].bytes), U(w->pipe[0].chunks), U(w->pipe[1].chunks),
    U(w->pipe[0].flipped), U(w->pipe[1].flipped),
    U(w->pipe[0].flip_pending), U(w->pipe[1].flip_pending),
    U(queued[0]), U(queued[1]), U(queue_limit(w)),
    U(w->accepted), U(w->active), U(w->closed), U(w->resets), U(w->cuts),
    U(w->refused), U(w->connect_failed),
    delay, U(w->delay_ns), rate, U(w->rate_bps),
    state, w->stalled ? "true" : "false", U(cut_left_ms), U((now - w->started_ns) / NS_PER_MS));
#undef U
  if (n < 0)
    return 0;
  return (size_t)n < len ? (size_t)n : len - 1;
}

/* --- life cycle --------------------------------------------------------- */

static int resolve_target(struct wan *w, const char *spec, char *err, size_t errlen)
{
  char host[256];
  uint16_t port;
  if (parse_host_port(spec, host, sizeof host, &port) < 0) {
    snprintf(err, errlen, "bad --connect address '%s': expected HOST:PORT or [V6]:PORT", spec);
    return -1;
  }
  char portstr[8];
  snprintf(portstr, sizeof portstr, "%u", port);
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_NUMERICSERV };
  struct addrinfo *ai;
  int gai = getaddrinfo(host, portstr, &hints, &ai);
  if (gai) {
    snprintf(err, errlen, "cannot resolve --connect host '%s': %s", host, gai_strerror(gai));
    return -1;
  }
  memcpy(&w->target, ai->ai_addr, ai->ai_addrlen);
  w->target_len = ai->ai_addrlen;
  freeaddrinfo(ai);
  snprintf(w->connect_addr, sizeof w->connect_addr, "%s", spec);
  return 0;
}

/* "127.0.0.1:PORT" or "[::1]:PORT" of a bound socket. */
static void socket_address(int fd, char *buf, size_t len)
{
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0 ||
      getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    snprintf(buf, len, "?");
    return;
  }
  snprintf(buf, len, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

struct wan *wan_create(const struct wan_config *cfg, char *err, size_t errlen)
{
  struct wan *w = calloc(1, sizeof *w);
  if (!w) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  w->epfd = w->timerfd = w->sigfd = w->listen_fd = w->spare_sock = -1;
  w->listen_h.fn = listen_event;
  w->timer_h.fn = timer_fn;
  w->sig_h.fn = sig_fn;
  w->delay_ns = cfg->delay_ns;
  w->rate_bps = cfg->rate_bps;
  w->started_ns = now_ns();
  w->rng = w->started_ns ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15ull;
  if (!w->rng)
    w->rng = 1;

  if (resolve_target(w, cfg->connect, err, errlen) < 0)
    goto fail;
  w->epfd = epoll_create1(EPOLL_CLOEXEC);
  w->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGHUP);
  w->sigfd = signalfd(-1, &stop, SFD_NONBLOCK | SFD_CLOEXEC);
  if (w->epfd < 0 || w->timerfd < 0 || w->sigfd < 0) {
    snprintf(err, errlen, "cannot set up the event loop: %s", strerror(errno));
    goto fail;
  }
  int family;
  uint16_t port;
  w->listen_fd = net_listen_tcp(cfg->listen, SOCK_NONBLOCK, "listen", SOMAXCONN, &family,
                                &port, err, errlen);
  if (w->listen_fd < 0)
    goto fail;
  socket_address(w->listen_fd, w->listen_addr, sizeof w->listen_addr);
  if (wan_watch(w, w->listen_fd, &w->listen_h, EPOLLIN, &w->listen_events) < 0 ||
      wan_watch(w, w->timerfd, &w->timer_h, EPOLLIN, &w->timer_events) < 0 ||
      wan_watch(w, w->sigfd, &w->sig_h, EPOLLIN, &w->sig_events) < 0) {
    snprintf(err, errlen, "cannot set up the event loop: epoll_ctl failed");
    goto fail;
  }
  if (cfg->control) {
    w->ctl = wan_control_start(w, cfg->control, err, errlen);
    if (!w->ctl)
      goto fail;
  }
  return w;
fail:
  wan_destroy(w);
  return NULL;
}

int wan_run(struct wan *w)
{
  struct epoll_event evs[MAX_EVENTS];
  while (!w->quit) {
    uint64_t now = now_ns();
    uint64_t deadline = pump_all(w, now);
    reap_dead(w);
    int timeout = -1;
    if (deadline <= now)
      timeout = 0;           /* more may leave at once (shared pipe, next round) */
    else
      timer_arm(w, deadline);
    int n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      log_error(NULL, "epoll_wait: %s", strerror(e));
      return -e;
    }
    for (int i = 0; i < n; i++) {
      struct wan_handler *h = evs[i].data.ptr;
      h->fn(w, h, evs[i].events);
    }
    reap_dead(w);
  }
  return 0;
}

void wan_destroy(struct wan *w)
{
  if (!w)
    return;
  if (w->ctl)
    wan_control_stop(w->ctl);
  w->ctl = NULL;
  while (w->conns)
    conn_end(w, w->conns, false, "exiting");
  reap_dead(w);
  if (w->listen_fd >= 0)
    close(w->listen_fd);
  if (w->spare_sock >= 0)
    close(w->spare_sock);
  if (w->sigfd >= 0)
    close(w->sigfd);
  if (w->timerfd >= 0)
    close(w->timerfd);
  if (w->epfd >= 0)
    close(w->epfd);
  free(w);
}

const char *wan_listen_address(const struct wan *w)
{
  return w->listen_addr;
}

const char *wan_control_address(const struct wan *w)
{
  return w->ctl ? wan_control_addr(w->ctl) : NULL;
}
