/* test_link_conn: the site link end to end over loopback TCP: listeners on
 * ports the OS picks, identities in a temp dir, real TLS.
 *
 * Site A listens and trusts B only; B is paired both ways; C is unknown.
 * Covered: many frames both ways with several sender threads per side and
 * one receiver (order per sender and content checked), the largest frames,
 * refusals at either end (unpaired client, client pinned to another
 * fingerprint, client without certificate, a plain TCP client sending
 * garbage) with the listener's WARN line checked, a silent client that must
 * not hold up another's handshake, timeouts, link_conn_shutdown waking a
 * blocked receiver and blocked senders, listener stop with live
 * connections and a pending handshake, link_test_corrupt_every (the
 * receiver sees -EBADMSG exactly for the damaged frames and goes on), a
 * client written with plain OpenSSL that sends a documented frame and then a
 * broken header (-EPROTO, for good), link_accept without a listener, IPv6,
 * and a server that never answers the handshake. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"
#include "link/frame.h"
#include "link/link.h"

#include "check.h"
#include "link_test.h"

/* CHECK for threads other than main: failures counted atomically. */
static _Atomic int thread_failures;
#define TCHECK(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      atomic_fetch_add(&thread_failures, 1);                                   \
    }                                                                          \
  } while (0)

#define NSENDERS   4
#define NFRAMES    300
#define MAX_SMALL  40000
#define IO_MS      30000

static char *tmp;
static struct link_identity *id_a, *id_b, *id_c;
static char fp_a[LINK_FINGERPRINT_LEN], fp_b[LINK_FINGERPRINT_LEN], fp_c[LINK_FINGERPRINT_LEN];
static _Atomic int trust_calls;

static bool trust_b(void *opaque, const char *fp, char *name, size_t namelen)
{
  atomic_fetch_add(&trust_calls, 1);
  if (strcmp(fp, fp_b) != 0)
    return false;
  snprintf(name, namelen, "site-b");
  return true;
}

static double ms_since(uint64_t t0) { return (double)(now_ns() - t0) / 1e6; }

static void sleep_ms(unsigned ms)
{
  struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
  nanosleep(&ts, NULL);
}

/* ---- the exchange: frames (sender, i) with known content ---- */

static uint32_t frame_len(int sender, uint32_t i)
{
  if (i % 17 == 0)
    return 0;
  return (uint32_t)((i * 7919u + (unsigned)sender * 104729u) % MAX_SMALL);
}

static void frame_fill(int sender, uint32_t i, uint8_t *buf, uint32_t len)
{
  uint64_t seed = ((uint64_t)sender << 32) | i;
  if (i % 3 == 0)
    fill_pattern(buf, len, seed);
  else
    fill_random(buf, len, seed);
}

struct sender {
  struct link_conn *c;
  int id;
  int nframes;
  int rc;
  pthread_t thread;
};

static void *sender_main(void *arg)
{
  struct sender *s = arg;
  static const int levels[] = { 0, 1, 3, -1 };
  uint8_t *buf = malloc(MAX_SMALL);
  for (uint32_t i = 0; i < (uint32_t)s->nframes && s->rc == 0; i++) {
    uint32_t len = frame_len(s->id, i);
    frame_fill(s->id, i, buf, len);
    s->rc = link_send(s->c, (uint8_t)(10 + s->id), ((uint64_t)s->id << 32) | i, buf, len,
                      levels[(i + (uint32_t)s->id) % 4], IO_MS);
  }
  free(buf);
  return NULL;
}

/* nsenders threads send nframes each while this thread receives as many
 * from the peer, which does the same.  Returns the number of problems. */
static int peer_run(struct link_conn *c, int nsenders, int nframes)
{
  int bad = 0;
  struct sender s[NSENDERS];
  for (int k = 0; k < nsenders; k++) {
    s[k] = (struct sender){ .c = c, .id = k, .nframes = nframes };
    pthread_create(&s[k].thread, NULL, sender_main, &s[k]);
  }
  uint32_t next[NSENDERS] = { 0 };
  uint8_t *want = malloc(MAX_SMALL);
  for (int n = 0; n < nsenders * nframes; n++) {
    struct link_msg m;
    char err[256];
    int rc = link_recv(c, &m, IO_MS, err, sizeof err);
    if (rc) {
      fprintf(stderr, "peer_run: recv %d: %s\n", rc, err);
      bad++;
      break;
    }
    int sender = m.type - 10;
    uint32_t i = (uint32_t)m.seq;
    if (sender < 0 || sender >= nsenders || (m.seq >> 32) != (uint64_t)sender || i != next[sender]) {
      fprintf(stderr, "peer_run: frame type %u seq %llx out of order\n", m.type,
              (unsigned long long)m.seq);
      bad++;
      break;
    }
    next[sender]++;
    uint32_t len = frame_len(sender, i);
    frame_fill(sender, i, want, len);
    if (m.len != len || (len && memcmp(m.data, want, len) != 0)) {
      fprintf(stderr, "peer_run: frame %d/%u: %u bytes, want %u, or content differs\n", sender, i,
              m.len, len);
      bad++;
    }
  }
  free(want);
  for (int k = 0; k < nsenders; k++) {
    pthread_join(s[k].thread, NULL);
    if (s[k].rc) {
      fprintf(stderr, "peer_run: sender %d: %d\n", k, s[k].rc);
      bad++;
    }
  }
  return bad;
}

/* ---- the server side ---- */

enum mode { M_EXCHANGE, M_ECHO, M_HOLD, M_RECV_UNTIL_ERR, M_CORRUPT, M_PROTO };

#define CORRUPT_N      3
#define CORRUPT_FRAMES 30

struct server {
  enum mode mode;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started, returned;
  int rcs[16];                  /* last rc of each returned callback */
  struct link_conn *held;       /* M_HOLD */
  bool release;
};

static struct server srv = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static void srv_reset(enum mode mode)
{
  pthread_mutex_lock(&srv.mu);
  srv.mode = mode;
  srv.started = srv.returned = 0;
  srv.held = NULL;
  srv.release = false;
  pthread_mutex_unlock(&srv.mu);
}

/* Waits until *counter reaches n (srv.mu), at most ms; true if it did. */
static bool srv_wait(int *counter, int n, unsigned ms)
{
  uint64_t end = now_ns() + ms * 1000000ull;
  pthread_mutex_lock(&srv.mu);
  while (*counter < n && now_ns() < end) {
    pthread_mutex_unlock(&srv.mu);
    sleep_ms(5);
    pthread_mutex_lock(&srv.mu);
  }
  bool ok = *counter >= n;
  pthread_mutex_unlock(&srv.mu);
  return ok;
}

static int recv_until_error(struct link_conn *c)
{
  struct link_msg m;
  int rc;
  while ((rc = link_recv(c, &m, 0, NULL, 0)) == 0 || rc == -EBADMSG)
    ;
  return rc;
}

/* M_CORRUPT: CORRUPT_FRAMES payload frames with empty ones between; every
 * CORRUPT_N-th payload frame arrives damaged.  Replies with the number of
 * frames that were not as expected. */
static void serve_corrupt(struct link_conn *c)
{
  uint32_t wrong = 0, nbad = 0;
  uint8_t *want = malloc(MAX_SMALL);
  for (uint32_t k = 0, got = 0; got < CORRUPT_FRAMES; k++) {
    struct link_msg m;
    char err[256] = "";
    int rc = link_recv(c, &m, IO_MS, err, sizeof err);
    if (rc != 0 && rc != -EBADMSG) {
      TCHECK(rc == 0);
      wrong++;
      break;
    }
    if (m.type == 2) {                       /* an empty frame: never damaged */
      TCHECK(rc == 0 && m.len == 0);
      continue;
    }
    uint32_t i = (uint32_t)m.seq;
    bool damaged = (got + 1) % CORRUPT_N == 0;
    if (i != got || m.type != 1 || (rc == -EBADMSG) != damaged) {
      fprintf(stderr, "corrupt: frame %u (seq %u, type %u): rc %d (%s)\n", got, i, m.type, rc, err);
      wrong++;
    } else if (rc == 0) {
      uint32_t len = frame_len(0, i) + 1;
      frame_fill(0, i, want, len);
      if (m.len != len || memcmp(m.data, want, len) != 0)
        wrong++;
    } else {
      nbad++;
      TCHECK(strstr(err, "hash mismatch") != NULL);
    }
    got++;
  }
  free(want);
  struct link_stats st;
  link_conn_stats(c, &st);
  TCHECK(st.bad_payloads == nbad && nbad == CORRUPT_FRAMES / CORRUPT_N);
  link_test_corrupt_every(0);
  uint32_t reply[2] = { wrong, nbad };
  TCHECK(link_send(c, 3, 0, reply, sizeof reply, 0, IO_MS) == 0);
  recv_until_error(c);
}

static void on_conn(void *opaque, struct link_conn *c)
{
  struct server *s = opaque;
  pthread_mutex_lock(&s->mu);
  s->started++;
  enum mode mode = s->mode;
  pthread_mutex_unlock(&s->mu);
  TCHECK(strcmp(link_conn_peer_fingerprint(c), fp_b) == 0);
  int rc = 0;
  struct link_msg m;
  switch (mode) {
  case M_EXCHANGE:
    TCHECK(peer_run(c, NSENDERS, NFRAMES) == 0);
    /* Wait for the client to go: closing first could reset what it still reads. */
    rc = recv_until_error(c);
    break;
  case M_ECHO:
    while ((rc = link_recv(c, &m, 0, NULL, 0)) == 0) {
      if ((rc = link_send(c, m.type, m.seq, m.data, m.len, 1, IO_MS)) < 0)
        break;
    }
    break;
  case M_HOLD:
    pthread_mutex_lock(&s->mu);
    s->held = c;
    while (!s->release)
      pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    rc = recv_until_error(c);
    break;
  case M_RECV_UNTIL_ERR:
    rc = recv_until_error(c);
    break;
  case M_CORRUPT:
    serve_corrupt(c);
    break;
  case M_PROTO: {
    /* A sound frame, then a header that breaks the format: -EPROTO, for
     * good. */
    char err[256] = "";
    TCHECK(link_recv(c, &m, IO_MS, err, sizeof err) == 0 && m.seq == 1 && m.len == 5 &&
           memcmp(m.data, "hello", 5) == 0);
    rc = link_recv(c, &m, IO_MS, err, sizeof err);
    TCHECK(rc == -EPROTO && strstr(err, "bad frame magic"));
    TCHECK(link_recv(c, &m, IO_MS, err, sizeof err) == -EPROTO);
    break;
  }
  }
  pthread_mutex_lock(&s->mu);
  if (s->returned < 16)
    s->rcs[s->returned] = rc;
  s->returned++;
  pthread_mutex_unlock(&s->mu);
  link_conn_close(c);
}

static void srv_release(void)
{
  pthread_mutex_lock(&srv.mu);
  srv.release = true;
  pthread_cond_broadcast(&srv.cv);
  pthread_mutex_unlock(&srv.mu);
}

static struct link_listener *start_listener(const char *addr, unsigned handshake_ms)
{
  char err[256];
  struct link_listener *l =
    link_listener_start(id_a, addr, trust_b, NULL, on_conn, &srv, handshake_ms, err, sizeof err);
  if (!l)
    fprintf(stderr, "listener on %s: %s\n", addr, err);
  return l;
}

static struct link_conn *connect_b(struct link_listener *l)
{
  char addr[64], err[512];
  snprintf(addr, sizeof addr, "127.0.0.1:%u", link_listener_port(l));
  struct link_conn *c = link_connect(id_b, addr, fp_a, 10000, err, sizeof err);
  if (!c)
    fprintf(stderr, "connect %s: %s\n", addr, err);
  return c;
}

/* A plain TCP socket to the listener (blocking). */
static int tcp_to(struct link_listener *l)
{
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(link_listener_port(l)) };
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    perror("connect");
    close(fd);
    return -1;
  }
  return fd;
}

/* Reads until EOF or error within ms; true if the server ended it. */
static bool closed_by_peer(int fd, unsigned ms)
{
  uint64_t end = now_ns() + ms * 1000000ull;
  char buf[4096];
  while (now_ns() < end) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    if (poll(&p, 1, 50) <= 0)
      continue;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0)
      return true;
  }
  return false;
}

/* ---- stderr capture, for the listener's WARN lines ---- */

static char *log_path;
static int saved_stderr = -1;

static void capture_start(void)
{
  fflush(stderr);
  saved_stderr = dup(2);
  int fd = open(log_path, O_CREAT | O_TRUNC | O_WRONLY | O_APPEND | O_CLOEXEC, 0600);
  dup2(fd, 2);
  close(fd);
}

/* Waits (up to 3 s) for a log line holding all of a, b, c; restores stderr. */
static bool capture_expect(const char *a, const char *b, const char *c)
{
  bool found = false;
  char *text = NULL;
  for (int t = 0; t < 150 && !found; t++) {
    free(text);
    FILE *f = fopen(log_path, "r");
    text = calloc(1, 65536);
    if (f) {
      fread(text, 1, 65535, f);
      fclose(f);
    }
    for (char *line = strtok(text, "\n"); line && !found; line = strtok(NULL, "\n")) {
      found = strstr(line, a) && (!b || strstr(line, b)) && (!c || strstr(line, c));
      if (found)
        printf("logged: %s\n", line);
    }
    if (!found)
      sleep_ms(20);
  }
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr);
  if (!found) {
    FILE *f = fopen(log_path, "r");
    fprintf(stderr, "no log line with '%s' '%s' '%s'; the log:\n", a, b ? b : "", c ? c : "");
    if (f) {
      char line[1024];
      while (fgets(line, sizeof line, f))
        fputs(line, stderr);
      fclose(f);
    }
  }
  free(text);
  return found;
}

/* ---- tests ---- */

static void test_exchange(struct link_listener *l)
{
  srv_reset(M_EXCHANGE);
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  CHECK(strcmp(link_conn_peer_fingerprint(c), fp_a) == 0);
  CHECK(strncmp(link_conn_peer_address(c), "127.0.0.1:", 10) == 0);
  uint64_t t0 = now_ns();
  CHECK(peer_run(c, NSENDERS, NFRAMES) == 0);
  struct link_stats st;
  link_conn_stats(c, &st);
  CHECK(st.frames_sent == NSENDERS * NFRAMES && st.frames_received == NSENDERS * NFRAMES);
  CHECK(st.raw_bytes_sent == st.raw_bytes_received);   /* both sides send the same set */
  CHECK(st.wire_bytes_sent < st.raw_bytes_sent);       /* a third of it compresses */
  CHECK(st.bad_payloads == 0);
  printf("exchange: %d frames each way, %d senders a side, %.0f ms, %llu raw / %llu wire bytes\n",
         NSENDERS * NFRAMES, NSENDERS, ms_since(t0), (unsigned long long)st.raw_bytes_sent,
         (unsigned long long)st.wire_bytes_sent);
  link_conn_close(c);
  CHECK(srv_wait(&srv.returned, 1, 10000));
  CHECK(srv.rcs[0] == -ECONNRESET);   /* the orderly close, seen by the server */
}

static void test_large(struct link_listener *l)
{
  srv_reset(M_ECHO);
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  uint8_t *buf = malloc(FRAME_MAX_RAW + 1);
  struct { int kind, level; uint32_t len; } cases[] = {
    { 0, 0, FRAME_MAX_RAW }, { 0, 3, FRAME_MAX_RAW }, { 1, 1, FRAME_MAX_RAW },
    { 2, 3, FRAME_MAX_RAW }, { 0, -1, FRAME_MAX_RAW - 1 }, { 0, 3, 0 }, { 2, 1, 1 << 20 },
  };
  for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
    uint32_t len = cases[k].len;
    if (cases[k].kind == 0)
      fill_random(buf, len, k);
    else if (cases[k].kind == 1)
      memset(buf, 0, len);
    else
      fill_pattern(buf, len, k);
    CHECK(link_send(c, 5, k, buf, len, cases[k].level, IO_MS) == 0);
    struct link_msg m;
    char err[256];
    int rc = link_recv(c, &m, IO_MS, err, sizeof err);
    CHECK(rc == 0 && m.seq == k && m.type == 5 && m.len == len);
    if (rc == 0 && m.len == len)
      CHECK(len == 0 || memcmp(m.data, buf, len) == 0);
  }
  CHECK(link_send(c, 5, 99, buf, FRAME_MAX_RAW + 1, 0, IO_MS) == -EINVAL);
  CHECK(link_send(c, 5, 99, NULL, 1, 0, IO_MS) == -EINVAL);
  /* The link is still fine after refusing those. */
  CHECK(link_send(c, 6, 100, "x", 1, 0, IO_MS) == 0);
  struct link_msg m;
  CHECK(link_recv(c, &m, IO_MS, NULL, 0) == 0 && m.seq == 100 && m.len == 1);
  free(buf);
  link_conn_close(c);
  CHECK(srv_wait(&srv.returned, 1, 10000));
}

static void test_timeouts(struct link_listener *l)
{
  srv_reset(M_ECHO);
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  struct link_msg m;
  char err[256];
  uint64_t t0 = now_ns();
  CHECK(link_recv(c, &m, 150, err, sizeof err) == -ETIMEDOUT);
  double ms = ms_since(t0);
  CHECK(ms >= 140 && ms < 2000);
  CHECK(strstr(err, "within 150 ms") != NULL);
  /* Still usable: a frame goes and comes back. */
  CHECK(link_send(c, 1, 42, "hello", 5, 0, IO_MS) == 0);
  CHECK(link_recv(c, &m, IO_MS, err, sizeof err) == 0 && m.seq == 42 && m.len == 5 &&
        memcmp(m.data, "hello", 5) == 0);
  link_conn_close(c);
  CHECK(srv_wait(&srv.returned, 1, 10000));

  /* A peer that does not read: a send times out, and the link is then
   * broken for sending (half a frame may be out). */
  srv_reset(M_HOLD);
  c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  uint8_t *buf = malloc(1 << 20);
  fill_random(buf, 1 << 20, 7);
  int rc = 0, n = 0;
  t0 = now_ns();
  while (n < 1000 && (rc = link_send(c, 1, n, buf, 1 << 20, 0, 300)) == 0)
    n++;
  CHECK(rc == -ETIMEDOUT && n > 0);
  CHECK(link_send(c, 1, n, buf, 100, 0, 300) == -EPIPE);
  link_conn_close(c);
  srv_release();
  CHECK(srv_wait(&srv.returned, 1, 10000));
  free(buf);
}

struct blocked {
  struct link_conn *c;
  int rc;
  _Atomic int progress;
  _Atomic bool done;
  uint8_t *buf;
  pthread_t thread;
};

static void *blocked_recv(void *arg)
{
  struct blocked *b = arg;
  struct link_msg m;
  b->rc = link_recv(b->c, &m, 0, NULL, 0);
  atomic_store(&b->done, true);
  return NULL;
}

static void *blocked_send(void *arg)
{
  struct blocked *b = arg;
  while ((b->rc = link_send(b->c, 1, 0, b->buf, 1 << 20, 0, 0)) == 0)
    atomic_fetch_add(&b->progress, 1);
  atomic_store(&b->done, true);
  return NULL;
}

static void test_shutdown(struct link_listener *l)
{
  /* A receiver blocked without a timeout. */
  srv_reset(M_HOLD);
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  struct blocked r = { .c = c };
  pthread_create(&r.thread, NULL, blocked_recv, &r);
  sleep_ms(200);
  CHECK(!atomic_load(&r.done));
  uint64_t t0 = now_ns();
  link_conn_shutdown(c);
  pthread_join(r.thread, NULL);
  CHECK(r.rc == -ESHUTDOWN && ms_since(t0) < 1000);
  struct link_msg m;
  CHECK(link_recv(c, &m, 100, NULL, 0) == -ESHUTDOWN);
  CHECK(link_send(c, 1, 1, "x", 1, 0, 100) == -ESHUTDOWN);
  link_conn_shutdown(c);   /* twice is fine */
  link_conn_close(c);
  srv_release();
  CHECK(srv_wait(&srv.returned, 1, 10000));

  /* Senders blocked on a full socket (one in the write, two waiting for
   * their turn) and a receiver, all at once. */
  srv_reset(M_HOLD);
  c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  uint8_t *buf = malloc(1 << 20);
  fill_random(buf, 1 << 20, 8);
  struct blocked s[3];
  for (int k = 0; k < 3; k++) {
    s[k] = (struct blocked){ .c = c, .buf = buf };
    pthread_create(&s[k].thread, NULL, blocked_send, &s[k]);
  }
  r = (struct blocked){ .c = c };
  pthread_create(&r.thread, NULL, blocked_recv, &r);
  /* Wait until nothing moves any more: the socket buffers are full. */
  int last = -1, now = 0;
  for (int t = 0; t < 100; t++) {
    sleep_ms(100);
    now = s[0].progress + s[1].progress + s[2].progress;
    if (now == last)
      break;
    last = now;
  }
  CHECK(now == last);
  for (int k = 0; k < 3; k++)
    CHECK(!atomic_load(&s[k].done));
  t0 = now_ns();
  link_conn_shutdown(c);
  for (int k = 0; k < 3; k++) {
    pthread_join(s[k].thread, NULL);
    CHECK(s[k].rc == -ESHUTDOWN);
  }
  pthread_join(r.thread, NULL);
  CHECK(r.rc == -ESHUTDOWN);
  CHECK(ms_since(t0) < 1000);
  link_conn_close(c);
  srv_release();
  CHECK(srv_wait(&srv.returned, 1, 10000));
  free(buf);
}

static void test_refusals(struct link_listener *l)
{
  char addr[64], err[512];
  snprintf(addr, sizeof addr, "127.0.0.1:%u", link_listener_port(l));
  srv_reset(M_ECHO);

  /* C is not paired at A. */
  capture_start();
  int calls = atomic_load(&trust_calls);
  struct link_conn *c = link_connect(id_c, addr, fp_a, 10000, err, sizeof err);
  CHECK(c == NULL);
  bool logged = capture_expect("WARN", "refused connection from 127.0.0.1:", fp_c);
  CHECK(logged);
  CHECK(strstr(err, "refused our certificate") && strstr(err, fp_c));
  printf("refused: unpaired client: %s\n", err);
  CHECK(atomic_load(&trust_calls) == calls + 1);
  link_conn_close(c);

  /* B expects another server. */
  capture_start();
  c = link_connect(id_b, addr, fp_c, 10000, err, sizeof err);
  CHECK(c == NULL);
  CHECK(capture_expect("WARN", "refused connection from 127.0.0.1:", "refused our certificate"));
  char want[300];
  snprintf(want, sizeof want, "peer presented %s but %s is paired", fp_a, fp_c);
  CHECK(strstr(err, want) != NULL);
  printf("refused: client pinned to another server: %s\n", err);

  /* A TLS client without a certificate. */
  capture_start();
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  int fd = tcp_to(l);
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  int hs = SSL_connect(ssl);
  char b;
  int rd = hs == 1 ? SSL_read(ssl, &b, 1) : -1;   /* TLS 1.3: the verdict comes after */
  CHECK(rd <= 0);
  CHECK(capture_expect("WARN", "refused connection from 127.0.0.1:", "no certificate"));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  ERR_clear_error();
  close(fd);

  /* Plain TCP with garbage: refused, and the listener goes on. */
  capture_start();
  fd = tcp_to(l);
  const char junk[] = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
  CHECK(write(fd, junk, sizeof junk - 1) == (ssize_t)(sizeof junk - 1));
  CHECK(closed_by_peer(fd, 5000));
  CHECK(capture_expect("WARN", "refused connection from 127.0.0.1:", "no certificate"));
  close(fd);
  fd = tcp_to(l);
  uint8_t noise[4096];
  fill_random(noise, sizeof noise, 99);
  noise[0] = 0x16;   /* looks like a handshake record, is not one */
  ssize_t wr = write(fd, noise, sizeof noise);
  CHECK(wr > 0);
  CHECK(closed_by_peer(fd, 5000));
  close(fd);
  fd = tcp_to(l);
  close(fd);          /* connect and go: nothing to see */

  c = connect_b(l);
  CHECK(c != NULL);
  struct link_msg m;
  CHECK(c && link_send(c, 1, 7, "ok", 2, 0, IO_MS) == 0);
  CHECK(c && link_recv(c, &m, IO_MS, NULL, 0) == 0 && m.seq == 7);
  link_conn_close(c);
  CHECK(srv_wait(&srv.returned, 1, 10000));

  /* Bad arguments. */
  CHECK(link_connect(id_b, addr, "sha256:xyz", 1000, err, sizeof err) == NULL &&
        strstr(err, "bad peer fingerprint"));
  CHECK(link_connect(id_b, "nowhere", fp_a, 1000, err, sizeof err) == NULL &&
        strstr(err, "bad site link address"));
  /* Nobody listening. */
  int lfd, fam;
  uint16_t port;
  lfd = net_listen_tcp("127.0.0.1:0", 0, "test", 1, &fam, &port, err, sizeof err);
  close(lfd);
  snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
  CHECK(link_connect(id_b, addr, fp_a, 1000, err, sizeof err) == NULL &&
        strstr(err, "connection refused"));
  printf("refused: nobody listening: %s\n", err);
}

static void test_silent(void)
{
  struct link_listener *l = start_listener("127.0.0.1:0", 800);
  CHECK(l != NULL);
  if (!l)
    return;
  srv_reset(M_ECHO);
  int silent[5];
  uint64_t t0 = now_ns();
  for (int k = 0; k < 5; k++)
    silent[k] = tcp_to(l);
  /* A half-sent ClientHello, too: stalls inside the TLS parser. */
  int half = tcp_to(l);
  const uint8_t hello_start[] = { 0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc };
  CHECK(write(half, hello_start, sizeof hello_start) == sizeof hello_start);

  uint64_t t1 = now_ns();
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  double ms = ms_since(t1);
  CHECK(ms < 700);   /* not behind the silent ones */
  link_conn_close(c);

  capture_start();
  for (int k = 0; k < 5; k++) {
    CHECK(closed_by_peer(silent[k], 5000));
    close(silent[k]);
  }
  CHECK(closed_by_peer(half, 5000));
  double waited = ms_since(t0);
  CHECK(capture_expect("WARN", "timed out after 800 ms", NULL));
  close(half);
  CHECK(waited >= 750);
  printf("silent: a paired client got through in %.0f ms past 6 stalled ones; they were cut "
         "after %.0f ms\n", ms, waited);
  link_listener_stop(l);
  CHECK(srv_wait(&srv.returned, 1, 1000));
}

static void test_stop_live(void)
{
  struct link_listener *l = start_listener("127.0.0.1:0", 60000);
  CHECK(l != NULL);
  if (!l)
    return;
  CHECK(strncmp(link_listener_address(l), "127.0.0.1:", 10) == 0);
  CHECK(atoi(link_listener_address(l) + 10) == link_listener_port(l));
  srv_reset(M_RECV_UNTIL_ERR);
  struct link_conn *c[3];
  for (int k = 0; k < 3; k++) {
    c[k] = connect_b(l);
    CHECK(c[k] != NULL);
  }
  CHECK(srv_wait(&srv.started, 3, 5000));
  int pending = tcp_to(l);   /* a handshake that would take a minute */
  sleep_ms(100);
  uint64_t t0 = now_ns();
  link_listener_stop(l);
  double ms = ms_since(t0);
  CHECK(ms < 3000);
  CHECK(srv.returned == 3);
  for (int k = 0; k < 3; k++)
    CHECK(srv.rcs[k] == -ESHUTDOWN);
  CHECK(closed_by_peer(pending, 2000));
  close(pending);
  for (int k = 0; k < 3; k++) {
    if (!c[k])
      continue;
    struct link_msg m;
    int rc = link_recv(c[k], &m, 5000, NULL, 0);
    CHECK(rc == -ECONNRESET);
    link_conn_close(c[k]);
  }
  printf("stop: 3 live connections and a pending handshake ended and joined in %.1f ms\n", ms);
}

static void test_corrupt(struct link_listener *l)
{
  srv_reset(M_CORRUPT);
  struct link_conn *c = connect_b(l);
  CHECK(c != NULL);
  if (!c)
    return;
  link_test_corrupt_every(CORRUPT_N);
  uint8_t *buf = malloc(MAX_SMALL + 1);
  for (uint32_t i = 0; i < CORRUPT_FRAMES; i++) {
    if (i % 4 == 0)
      CHECK(link_send(c, 2, 1000 + i, NULL, 0, 3, IO_MS) == 0);   /* not counted */
    uint32_t len = frame_len(0, i) + 1;
    frame_fill(0, i, buf, len);
    CHECK(link_send(c, 1, i, buf, len, i % 2 ? 1 : 0, IO_MS) == 0);
  }
  struct link_msg m;
  char err[256];
  int rc = link_recv(c, &m, IO_MS, err, sizeof err);
  CHECK(rc == 0 && m.type == 3 && m.len == 8);
  if (rc == 0 && m.len == 8) {
    uint32_t reply[2];
    memcpy(reply, m.data, 8);
    CHECK(reply[0] == 0);
    CHECK(reply[1] == CORRUPT_FRAMES / CORRUPT_N);
  }
  link_test_corrupt_every(0);
  link_conn_close(c);
  CHECK(srv_wait(&srv.returned, 1, 10000));
  free(buf);
}

/* A TLS client made here with OpenSSL alone, holding B's key: the wire
 * format as documented, and a header that breaks it. */
static void test_raw_tls(struct link_listener *l)
{
  srv_reset(M_PROTO);
  char crt[600], key[600];
  snprintf(crt, sizeof crt, "%s/site-b/site.crt", tmp);
  snprintf(key, sizeof key, "%s/site-b/site.key", tmp);
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  CHECK(SSL_CTX_use_certificate_file(ctx, crt, SSL_FILETYPE_PEM) == 1);
  CHECK(SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  int fd = tcp_to(l);
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  CHECK(SSL_connect(ssl) == 1);
  struct frame_codec *enc = frame_codec_new();
  uint8_t hdr[FRAME_HEADER_SIZE];
  const void *wire;
  uint32_t wire_len;
  CHECK(frame_encode(enc, 1, 1, "hello", 5, 0, hdr, &wire, &wire_len) == 0);
  CHECK(SSL_write(ssl, hdr, sizeof hdr) == sizeof hdr);
  CHECK(SSL_write(ssl, wire, (int)wire_len) == (int)wire_len);
  memcpy(hdr, "FRY2", 4);
  CHECK(SSL_write(ssl, hdr, sizeof hdr) == sizeof hdr);
  CHECK(srv_wait(&srv.returned, 1, 10000));
  CHECK(srv.rcs[0] == -EPROTO);
  frame_codec_free(enc);
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  ERR_clear_error();
  close(fd);
}

/* A server that accepts TCP and never speaks TLS: the client's handshake
 * times out. */
static void test_connect_timeout(void)
{
  char err[512], addr[64];
  int fam;
  uint16_t port;
  int lfd = net_listen_tcp("127.0.0.1:0", 0, "test", 4, &fam, &port, err, sizeof err);
  CHECK(lfd >= 0);
  snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
  uint64_t t0 = now_ns();
  struct link_conn *c = link_connect(id_b, addr, fp_a, 300, err, sizeof err);
  double ms = ms_since(t0);
  CHECK(c == NULL && strstr(err, "timed out after 300 ms"));
  CHECK(ms >= 290 && ms < 2000);
  printf("refused: silent server: %s\n", err);
  close(lfd);
}

struct direct {
  int lfd;
  struct link_conn *conn;
  char err[512];
};

static void *direct_accept(void *arg)
{
  struct direct *d = arg;
  int fd = accept4(d->lfd, NULL, NULL, SOCK_CLOEXEC);
  d->conn = fd < 0 ? NULL : link_accept(id_a, fd, trust_b, NULL, 5000, d->err, sizeof d->err);
  return NULL;
}

/* link_accept without a listener, and IPv6 where there is a loopback. */
static void test_direct_accept(void)
{
  char err[512], addr[64];
  int fam;
  uint16_t port;
  struct direct d = { .lfd = net_listen_tcp("127.0.0.1:0", 0, "test", 4, &fam, &port, err, sizeof err) };
  CHECK(d.lfd >= 0);
  snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
  pthread_t t;
  pthread_create(&t, NULL, direct_accept, &d);
  struct link_conn *c = link_connect(id_b, addr, fp_a, 5000, err, sizeof err);
  pthread_join(t, NULL);
  CHECK(c && d.conn);
  if (c && d.conn) {
    struct link_msg m;
    CHECK(link_send(c, 1, 1, "ping", 4, 0, IO_MS) == 0);
    CHECK(link_recv(d.conn, &m, IO_MS, NULL, 0) == 0 && m.len == 4 && memcmp(m.data, "ping", 4) == 0);
    CHECK(link_send(d.conn, 1, 2, "pong", 4, 3, IO_MS) == 0);
    CHECK(link_recv(c, &m, IO_MS, NULL, 0) == 0 && m.len == 4 && memcmp(m.data, "pong", 4) == 0);
    CHECK(strcmp(link_conn_peer_fingerprint(d.conn), fp_b) == 0);
  }
  link_conn_close(c);
  link_conn_close(d.conn);

  d.conn = NULL;
  pthread_create(&t, NULL, direct_accept, &d);
  c = link_connect(id_c, addr, fp_a, 5000, err, sizeof err);
  pthread_join(t, NULL);
  CHECK(c == NULL && d.conn == NULL);
  char want[200];
  snprintf(want, sizeof want, "peer presented %s, which is not paired", fp_c);
  CHECK(strstr(d.err, want) != NULL);
  printf("refused: link_accept: %s\n", d.err);
  close(d.lfd);

  d.lfd = net_listen_tcp("[::1]:0", 0, "test", 4, &fam, &port, err, sizeof err);
  if (d.lfd < 0) {
    printf("direct: no IPv6 loopback, skipped\n");
    return;
  }
  snprintf(addr, sizeof addr, "[::1]:%u", port);
  pthread_create(&t, NULL, direct_accept, &d);
  c = link_connect(id_b, addr, fp_a, 5000, err, sizeof err);
  pthread_join(t, NULL);
  CHECK(c && d.conn);
  if (c)
    CHECK(strncmp(link_conn_peer_address(c), "[::1]:", 6) == 0);
  link_conn_close(c);
  link_conn_close(d.conn);
  close(d.lfd);
}

int main(void)
{
  log_init("test_link_conn");
  tmp = make_tmpdir("link-conn");
  log_path = NULL;
  if (asprintf(&log_path, "%s/log", tmp) < 0)
    return 1;
  const char *names[3] = { "site-a", "site-b", "site-c" };
  struct link_identity **ids[3] = { &id_a, &id_b, &id_c };
  char *fps[3] = { fp_a, fp_b, fp_c };
  for (int k = 0; k < 3; k++) {
    char dir[512], err[512];
    bool created;
    snprintf(dir, sizeof dir, "%s/%s", tmp, names[k]);
    if (link_identity_init(dir, names[k], &created, err, sizeof err) < 0 ||
        !(*ids[k] = link_identity_load(dir, err, sizeof err))) {
      fprintf(stderr, "identity %s: %s\n", names[k], err);
      return 1;
    }
    strcpy(fps[k], link_identity_fingerprint(*ids[k]));
  }

  struct link_listener *l = start_listener("127.0.0.1:0", 5000);
  CHECK(l != NULL);
  if (l) {
    test_exchange(l);
    test_large(l);
    test_timeouts(l);
    test_shutdown(l);
    test_refusals(l);
    test_corrupt(l);
    test_raw_tls(l);
    link_listener_stop(l);
  }
  test_silent();
  test_stop_live();
  test_direct_accept();
  test_connect_timeout();

  for (int k = 0; k < 3; k++)
    link_identity_free(*ids[k]);
  remove_tree(tmp);
  free(log_path);
  failures += atomic_load(&thread_failures);
  if (failures) {
    fprintf(stderr, "test_link_conn: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_link_conn: ok\n");
  return 0;
}
