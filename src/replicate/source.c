/* source: the source side of a live migration (docs/migration.md).
 *
 * DESIGN
 * One driver thread per migration does everything that reads disks or sends
 * (so per-region ordering is the order of one thread's sends); a receiver
 * thread per link connection takes ACK, NACK, REPLY, HASHES and PONG and
 * wakes the driver.
 *
 *   background copy  a cursor per disk walks it in CHUNK_BYTES steps; a chunk
 *                    the backend reports as a hole (and runs of them) goes as
 *                    one zero range, a data chunk is read and every region of
 *                    zeros in it goes as a zero range, the rest as data,
 *                    compressed at a zstd level that tick() adapts: up while
 *                    the link keeps us waiting, down while the CPU does.
 *   foreground copy  in rounds: when the pending regions behind the cursor
 *                    are all sent (at most every FG_PASS_NS, at least every
 *                    FG_ROUND_MAX_NS), the disk's dirty map is swapped
 *                    (cbt_swap_fast: no IO, no new commits for the guest) and
 *                    its bits ORed into `pending`; a region written many times
 *                    in a round goes once.  A pending region behind
 *                    the cursor is read and sent again; one ahead of it is
 *                    dropped: the cursor will read it, after the write.  A
 *                    write racing a read marks its region before its data
 *                    lands (cbt.h), so it is swapped in again and re-sent.
 *   durability       the map file holds every swapped bit until it is
 *                    rewritten; every REWRITE_NS the swap is a full one whose
 *                    keeper first writes `pending` (plus what is in flight)
 *                    to DATA_DIR/migrations/ID/DISK.pending.  So the map file
 *                    and the pending file together always cover every write
 *                    not known to be at the destination.
 *   window           at most `window` bytes of frames unacknowledged (four
 *                    times what the link moves in a round trip plus the
 *                    destination's sync delay, within WINDOW_MIN..MAX, so
 *                    the link stays full but a cut loses little); each is
 *                    kept (ring) until the destination's ACK says it is
 *                    durable there, and sent again after a NACK (same seq)
 *                    or a reconnect (renumbered after what it holds).
 *   restart          after a restart the destination tells what it holds
 *                    (applied seq, background high-water mark per disk); the
 *                    cursor restarts there, and everything the pending and
 *                    map files mark is "suspect": its hash is compared with
 *                    the destination's first and only what differs is sent.
 *   verify           after the background copy a sweep compares the hash of
 *                    every region on both sides (while the VM runs: a region
 *                    dirty meanwhile is skipped, it is sent again anyway); a
 *                    region that differs and is not dirty is a repair,
 *                    counted and logged.  At cutover, with the VM paused and
 *                    the last dirty regions drained, every region not
 *                    verified since it was last sent (all of them with
 *                    verify_full) is compared again: the cutover goes on
 *                    only if the destination equals the source.
 *   convergence      cutover starts when the backlog, the regions still to
 *                    verify and the VM state fit in max_downtime at the
 *                    measured rates.  When the VM dirties faster than the
 *                    link drains, write backpressure lowers the disks' write
 *                    limit until the backlog shrinks.
 *   cutover          pause the VM, fence its disks (in memory), drain, flush,
 *                    verify, send the VM state; then the point of no return:
 *                    the fence is persisted and the state "committing"
 *                    recorded before the destination is asked to activate.
 *                    Any failure before it resumes the VM here; after it the
 *                    activation is retried until the destination answers.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/cbt.h"
#include "disk/disk.h"
#include "disk/heat.h"
#include "disk/registry.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/tunnel.h"
#include "site/site.h"
#include "vm/vm.h"

#define SEG_BYTES (64ull << 20)             /* allocation accounting unit */
#define ZERO_RUN_MAX (1ull << 30)           /* largest zero range in one frame */
#define FG_PASS_NS (250ull * 1000000)       /* dirty map swaps: at most this often ... */
#define FG_ROUND_MAX_NS (3000ull * 1000000) /* ... and at least this often */
#define REWRITE_NS (30ull * 1000000000)     /* full swap: map file rewritten clean */
#define TICK_NS (1000ull * 1000000)         /* progress, rates, persistence */
#define PING_NS (2000ull * 1000000)
#define STALL_NS (15ull * 1000000000)       /* nothing heard with frames in flight: drop */
#define CONNECT_TIMEOUT_MS 10000
#define SEND_TIMEOUT_MS 15000               /* a send that makes no progress this long */
#define REPLY_TIMEOUT_MS 60000
#define ACTIVATE_TIMEOUT_MS 180000
#define HASH_BATCH 1024                     /* regions per hash request */
#define BLOB_PIECE (FRAME_MAX_RAW - BLOB_HEADER_SIZE)
#define CUTOVER_VERIFY_ROUNDS 3
#define BP_FLOOR (4u * 1024)                /* write backpressure never goes below: a
                                               4 KiB write a second */
#define PENDING_MAGIC "FERRYPND"
#define ZSTD_LEVEL_MIN 1
#define ZSTD_LEVEL_MAX 9                    /* beyond, a few % of bytes for much more CPU */

struct src {
  struct migration *m;
  const struct migrations_shared *sh;
  uint8_t *buf;                    /* DATA_HEADER_SIZE + CHUNK_BYTES */
  void *hashbuf;                   /* one region */
  uint64_t hashbuf_len;
  bool after_restart;              /* first swap after a restart feeds suspects */
  bool bg_done, sweep_done;
  uint64_t fg_pos[PROTO_MAX_DISKS];
  uint64_t reverify_pos[PROTO_MAX_DISKS];
  unsigned reverify_disk;
  struct bitmap suspect[PROTO_MAX_DISKS];
  struct bitmap scratch[PROTO_MAX_DISKS];

  uint64_t last_fg_ns, last_rewrite_ns, last_tick_ns, last_ping_ns;
  uint64_t backoff_ms;
  int level;                       /* zstd level, adapted by tick() */
  uint64_t window_wait_ns;         /* time spent waiting for room in the window */
  uint64_t prev_wait_ns, prev_cpu_ns;

  /* rates (driver only) */
  uint64_t acked_payload;          /* payload bytes acknowledged (receiver adds, under lock) */
  uint64_t prev_acked, prev_wire, prev_dirty, prev_backlog;
  uint64_t dirty_total;            /* bytes newly dirtied, all swaps */
  double e_repl, e_link, e_dirty, e_vmw, e_trend;
  double capacity;                 /* payload bytes/s the link can carry (see tick) */
  double capacity_wire;            /* ... in wire bytes/s */
  double e_ratio;                  /* wire / payload bytes: how well the data compresses */
  uint64_t prev_payload;
  uint64_t idle_ns, prev_idle_ns;  /* time the driver had nothing to do */
  uint64_t rtt_min_cur, rtt_min_prev, rtt_window_ns, rtt_base_ns;
  double fixed_s;                  /* pause + activation of the last cutover, seconds */
  uint64_t rtt_ns;
  double hash_bps;                 /* local hashing speed, measured by the sweep */
  unsigned not_ready_ticks;
  uint64_t bp_limit;
  uint64_t cutover_not_before;

  /* qemu live: the RAM migration of the current cutover */
  struct tunnel *tunnel;
  bool incoming_prepared;          /* the destination has a QEMU waiting */
  uint64_t stopped_at_ns;          /* realtime of QEMU's STOP event */
};

static bool is_qemu(const struct migration *m) { return strcmp(m->vmspec.driver, "qemu") == 0; }
static bool is_cold(const struct migration *m) { return strcmp(m->mode, "cold") == 0; }

/* ---- small helpers ---- */

static bool should_leave(struct migration *m)
{
  pthread_mutex_lock(&m->lock);
  bool r = m->stop || m->cancel;
  pthread_mutex_unlock(&m->lock);
  return r;
}

/* __fn: m->lock held.  Waits on m->cond at most ms milliseconds. */
static void cond_wait_ms(struct migration *m, unsigned ms)
{
  cond_timedwait_ms(&m->cond, &m->lock, ms);
}

static void set_phase(struct migration *m, const char *phase)
{
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.phase, sizeof m->prog.phase, "%s", phase);
  pthread_mutex_unlock(&m->lock);
}

static void set_verdict(struct migration *m, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void set_verdict(struct migration *m, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&m->lock);
  vsnprintf(m->prog.verdict, sizeof m->prog.verdict, fmt, ap);
  pthread_mutex_unlock(&m->lock);
  va_end(ap);
}

static void fmt_bytes(uint64_t b, char *buf, size_t len) { format_size(b, buf, len); }

/* ---- pending files ---- */

/* Header: magic[8], u32 version 1, u32 0, u64 nbits, u64 granularity,
 * u64 XXH64(words), u64 XXH64(bytes 0..39); then the bitmap words, little
 * endian.  Written atomically and durably (write_file_atomic). */
static int pending_write(struct migration *m, struct mig_disk *md, const struct bitmap *bits)
{
  size_t nw = bits->nwords;
  size_t len = 48 + nw * 8;
  uint8_t *buf = calloc(1, len);
  if (!buf)
    return -ENOMEM;
  memcpy(buf, PENDING_MAGIC, 8);
  uint32_t v = htole32(1);
  memcpy(buf + 8, &v, 4);
  uint64_t x = htole64(bits->nbits);
  memcpy(buf + 16, &x, 8);
  x = htole64(md->gran);
  memcpy(buf + 24, &x, 8);
  for (size_t i = 0; i < nw; i++) {
    uint64_t w = htole64(atomic_load_explicit(&bits->words[i], memory_order_relaxed));
    memcpy(buf + 48 + i * 8, &w, 8);
  }
  x = htole64(XXH64(buf + 48, nw * 8, 0));
  memcpy(buf + 32, &x, 8);
  x = htole64(XXH64(buf, 40, 0));
  memcpy(buf + 40, &x, 8);
  char why[PATH_MAX + 64];
  int r = write_file_atomic(md->pending_path, buf, len, 0640, why, sizeof why) < 0 ? -errno : 0;
  if (r < 0)
    log_error(md->name, "migration %s: %s", m->id, why);
  free(buf);
  return r;
}

/* ORs the file's bits into out.  -ENOENT absent, -EBADMSG damaged. */
static int pending_read(struct mig_disk *md, struct bitmap *out)
{
  int fd = open(md->pending_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return -errno;
  size_t nw = out->nwords, len = 48 + nw * 8;
  uint8_t *buf = malloc(len);
  int r = 0;
  if (!buf) {
    close(fd);
    return -ENOMEM;
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != len || pread_full(fd, buf, len, 0) < 0) {
    r = -EBADMSG;                    /* short, long or unreadable: not trusted */
  } else {
    uint64_t nbits, gran, wh, hh;
    uint32_t version, reserved;
    memcpy(&version, buf + 8, 4);
    memcpy(&reserved, buf + 12, 4);
    memcpy(&nbits, buf + 16, 8);
    memcpy(&gran, buf + 24, 8);
    memcpy(&wh, buf + 32, 8);
    memcpy(&hh, buf + 40, 8);
    if (memcmp(buf, PENDING_MAGIC, 8) != 0 || le64toh(hh) != XXH64(buf, 40, 0) ||
        le32toh(version) != 1 || reserved != 0 ||
        le64toh(nbits) != out->nbits || le64toh(gran) != md->gran ||
        le64toh(wh) != XXH64(buf + 48, nw * 8, 0)) {
      r = -EBADMSG;
    } else {
      for (size_t i = 0; i < nw; i++) {
        uint64_t w;
        memcpy(&w, buf + 48 + i * 8, 8);
        atomic_fetch_or(&out->words[i], le64toh(w));
      }
    }
  }
  free(buf);
  close(fd);
  return r;
}

/* pending | the regions of foreground frames in flight (m->lock held). */
static void pending_with_inflight_locked(struct migration *m, unsigned di, struct bitmap *out)
{
  struct mig_disk *md = &m->disks[di];
  bitmap_copy(out, &md->pending);
  for (size_t i = 0; i < m->ring_n; i++) {
    struct ring_entry *e = &m->ring[i];
    if (e->type != MSG_DATA || e->disk != di || e->background)
      continue;
    uint64_t first = e->off / md->gran, last = (e->off + e->len - 1) / md->gran;
    bitmap_set_range(out, first, last - first + 1);
  }
}

struct keep_ctx {
  struct src *s;
  unsigned di;
};

/* cbt keeper: the swapped-out bits join pending, and pending (with what is
 * in flight) is made durable before the map file forgets them. */
static int keep_pending(void *opaque, const struct bitmap *bits)
{
  struct keep_ctx *k = opaque;
  struct migration *m = k->s->m;
  struct mig_disk *md = &m->disks[k->di];
  struct bitmap *tmp = &k->s->scratch[k->di];
  for (uint64_t i = 0; i < bits->nwords; i++) {
    uint64_t w = atomic_load_explicit(&bits->words[i], memory_order_relaxed);
    if (w)
      atomic_fetch_or(&md->pending.words[i], w);
  }
  pthread_mutex_lock(&m->lock);
  pending_with_inflight_locked(m, k->di, tmp);
  pthread_mutex_unlock(&m->lock);
  return pending_write(m, md, tmp);
}

/* ---- the link ---- */

static void drop_ring_locked(struct migration *m, uint64_t upto, uint64_t *acked_payload)
{
  size_t k = 0;
  while (k < m->ring_n && m->ring[k].seq <= upto) {
    struct ring_entry *e = &m->ring[k];
    if (e->type == MSG_DATA && e->background) {
      struct mig_disk *md = &m->disks[e->disk];
      md->acked_bg = MAX(md->acked_bg, e->off + e->len);
    }
    if (acked_payload && e->type == MSG_DATA)
      *acked_payload += e->plen;
    m->ring_bytes -= e->plen;
    free(e->payload);
    k++;
  }
  if (k) {
    memmove(m->ring, m->ring + k, (m->ring_n - k) * sizeof *m->ring);
    m->ring_n -= k;
  }
}

struct receiver_arg {
  struct src *s;
  struct link_conn *conn;
};

static void *receiver_main(void *arg)
{
  struct receiver_arg *ra = arg;
  struct src *s = ra->s;
  struct migration *m = s->m;
  struct link_conn *conn = ra->conn;
  free(ra);
  char err[256];
  for (;;) {
    struct link_msg lm;
    int r = link_recv(conn, &lm, 1000, err, sizeof err);
    if (r == -ETIMEDOUT)
      continue;
    pthread_mutex_lock(&m->lock);
    if (r < 0) {
      if (r != -ESHUTDOWN)
        snprintf(m->prog.link_error, sizeof m->prog.link_error, "%s", err);
      m->conn_dead = true;
      pthread_cond_broadcast(&m->cond);
      pthread_mutex_unlock(&m->lock);
      break;
    }
    m->last_heard_ns = now_ns();
    uint64_t v = 0;
    switch (lm.type) {
    case MSG_ACK:
      if (proto_u64_parse(lm.data, lm.len, &v, err, sizeof err) == 0 && v > m->acked_seq) {
        m->acked_seq = v;
        drop_ring_locked(m, v, &s->acked_payload);
      }
      break;
    case MSG_NACK:
      if (proto_u64_parse(lm.data, lm.len, &v, err, sizeof err) == 0 && v > m->acked_seq &&
          (!m->nack_from || v < m->nack_from)) {
        m->nack_from = v;
        m->prog.nacks++;
      }
      break;
    case MSG_PONG:
      if (proto_u64_parse(lm.data, lm.len, &v, err, sizeof err) == 0 && v <= now_ns())
        s->rtt_ns = now_ns() - v;
      break;
    case MSG_REPLY: {
      json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
      json_t *req = json_object_get(j, "req");
      if (j && json_is_integer(req) && (uint64_t)json_integer_value(req) == m->reply_req) {
        json_decref(m->reply);
        m->reply = j;
      } else {
        json_decref(j);
      }
      break;
    }
    case MSG_HASHES: {
      struct proto_hashes h;
      if (proto_hashes_parse(lm.data, lm.len, &h, err, sizeof err) == 0 &&
          h.req == m->reply_req) {
        free(m->hashes);
        m->hashes = malloc(lm.len);
        if (m->hashes) {
          memcpy(m->hashes, lm.data, lm.len);
          m->hashes_len = lm.len;
        }
      }
      break;
    }
    case MSG_ERROR: {
      json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
      const char *e = json_string_value(json_object_get(j, "error"));
      snprintf(m->prog.link_error, sizeof m->prog.link_error, "destination: %s",
               e ? e : "error");
      if (json_is_true(json_object_get(j, "fatal"))) {
        snprintf(m->error, sizeof m->error, "the destination refused: %s", e ? e : "error");
        m->remote_fatal = true;
      }
      json_decref(j);
      break;
    }
    default:
      log_warn(m->vm, "migration %s: unexpected %s frame from the destination", m->id,
               proto_type_name(lm.type));
      break;
    }
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
  }
  return NULL;
}

static void disconnect(struct src *s)
{
  struct migration *m = s->m;
  pthread_mutex_lock(&m->lock);
  struct link_conn *c = m->conn;
  m->conn = NULL;
  m->conn_dead = false;
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
  pthread_mutex_unlock(&m->lock);
  if (!c)
    return;
  link_conn_shutdown(c);
  if (m->receiver_started) {
    pthread_join(m->receiver, NULL);
    m->receiver_started = false;
  }
  struct link_stats st;
  link_conn_stats(c, &st);
  pthread_mutex_lock(&m->lock);
  m->wire_base += st.wire_bytes_sent;
  m->prog.wire_bytes_sent = m->wire_base;
  pthread_mutex_unlock(&m->lock);
  s->prev_wire = 0;
  link_conn_close(c);
}

static bool link_ok(struct migration *m)
{
  pthread_mutex_lock(&m->lock);
  bool ok = m->conn && !m->conn_dead;
  pthread_mutex_unlock(&m->lock);
  return ok;
}

/* Sends one frame.  Sequenced frames go into the ring first (so an ACK that
 * races the send finds them).  -ECONNRESET when the link is gone. */
static int send_frame(struct src *s, uint8_t type, const void *payload, uint32_t len,
                      bool background, uint32_t disk, uint64_t off, uint64_t rlen)
{
  struct migration *m = s->m;
  pthread_mutex_lock(&m->lock);
  struct link_conn *c = m->conn_dead ? NULL : m->conn;
  uint64_t seq = 0;
  if (c && proto_is_sequenced(type)) {
    if (m->ring_n == m->ring_cap) {
      size_t cap = m->ring_cap ? m->ring_cap * 2 : 64;
      struct ring_entry *r = realloc(m->ring, cap * sizeof *r);
      if (!r) {
        pthread_mutex_unlock(&m->lock);
        return -ENOMEM;
      }
      m->ring = r;
      m->ring_cap = cap;
    }
    void *copy = malloc(len ? len : 1);
    if (!copy) {
      pthread_mutex_unlock(&m->lock);
      return -ENOMEM;
    }
    memcpy(copy, payload, len);
    seq = m->next_seq++;
    m->ring[m->ring_n++] = (struct ring_entry){ .seq = seq, .type = type,
                                                .background = background, .disk = disk,
                                                .off = off, .len = rlen, .payload = copy,
                                                .plen = len };
    m->ring_bytes += len;
  }
  pthread_mutex_unlock(&m->lock);
  if (!c)
    return -ECONNRESET;
  int r = link_send(c, type, seq, payload, len, type == MSG_DATA ? s->level : 0,
                    SEND_TIMEOUT_MS);
  if (r < 0) {
    pthread_mutex_lock(&m->lock);
    m->conn_dead = true;
    if (r != -ESHUTDOWN)
      snprintf(m->prog.link_error, sizeof m->prog.link_error, "send: %s", strerror(-r));
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
    return -ECONNRESET;
  }
  pthread_mutex_lock(&m->lock);
  m->prog.payload_bytes_sent += len;
  pthread_mutex_unlock(&m->lock);
  return 0;
}

/* Sends ring entries again from seq `from` (same numbers), in order. */
static int resend_from(struct src *s, uint64_t from)
{
  struct migration *m = s->m;
  for (size_t i = 0;; i++) {
    pthread_mutex_lock(&m->lock);
    struct link_conn *c = m->conn_dead ? NULL : m->conn;
    if (!c || i >= m->ring_n) {
      pthread_mutex_unlock(&m->lock);
      return c ? 0 : -ECONNRESET;
    }
    struct ring_entry e = m->ring[i];
    if (e.seq < from) {
      pthread_mutex_unlock(&m->lock);
      continue;
    }
    /* The payload stays valid: only an ACK frees entries, and one that
     * frees this entry acknowledges a seq we are sending again, which the
     * destination then takes as a duplicate. */
    void *copy = malloc(e.plen ? e.plen : 1);
    if (copy)
      memcpy(copy, e.payload, e.plen);
    m->prog.resent_frames++;
    if (e.type == MSG_DATA && e.plen > DATA_HEADER_SIZE)
      m->prog.resent_bytes += e.plen - DATA_HEADER_SIZE;   /* data, not zero ranges */
    pthread_mutex_unlock(&m->lock);
    if (!copy)
      return -ENOMEM;
    int r = link_send(c, e.type, e.seq, copy, e.plen, e.type == MSG_DATA ? s->level : 0,
                      SEND_TIMEOUT_MS);
    free(copy);
    if (r < 0) {
      pthread_mutex_lock(&m->lock);
      m->conn_dead = true;
      pthread_mutex_unlock(&m->lock);
      return -ECONNRESET;
    }
  }
}

static json_t *hello_json(struct src *s)
{
  struct migration *m = s->m;
  char site[65];
  site_name(s->sh->site, site, sizeof site);
  json_t *disks = json_array();
  for (unsigned i = 0; i < m->ndisks; i++)
    json_array_append_new(disks, json_pack("{s:s, s:I, s:I}", "name", m->disks[i].name,
                                           "size", (json_int_t)m->disks[i].size,
                                           "granularity", (json_int_t)m->disks[i].gran));
  return json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:o}", "protocol", PROTO_VERSION, "session",
                   m->id, "migration", m->id, "vm", m->vm, "mode", m->mode, "source_site", site,
                   "disks", disks);
}

/* Connects, says HELLO, learns what the destination holds, and lines the
 * ring and the cursors up with it.  0, -EAGAIN (try again later) or a fatal
 * -errno with m->error set. */
static int connect_session(struct src *s)
{
  struct migration *m = s->m;
  char link[256], fp[LINK_FINGERPRINT_LEN], err[512];
  mig_get_peer_link(m, link, sizeof link, fp, sizeof fp);
  if (!link[0]) {
    pthread_mutex_lock(&m->lock);
    snprintf(m->error, sizeof m->error, "site '%s' is no longer paired", m->peer);
    pthread_mutex_unlock(&m->lock);
    return -ENOENT;
  }
  struct link_identity *id = site_identity(s->sh->site);
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "connecting");
  pthread_mutex_unlock(&m->lock);
  struct link_conn *c = id ? link_connect(id, link, fp, CONNECT_TIMEOUT_MS, err, sizeof err)
                           : NULL;
  if (!c) {
    pthread_mutex_lock(&m->lock);
    snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
    fmt_into(m->prog.link_error, sizeof m->prog.link_error, "%s",
             id ? err : "no site identity");
    pthread_mutex_unlock(&m->lock);
    return -EAGAIN;
  }
  json_t *h = hello_json(s);
  char *text = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  int r = text ? link_send(c, MSG_HELLO, 0, text, (uint32_t)strlen(text), 0, SEND_TIMEOUT_MS)
               : -ENOMEM;
  free(text);
  struct link_msg lm;
  if (r == 0)
    r = link_recv(c, &lm, REPLY_TIMEOUT_MS, err, sizeof err);
  json_t *ok = NULL;
  if (r == 0 && lm.type == MSG_ERROR) {
    json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
    const char *e = json_string_value(json_object_get(j, "error"));
    bool fatal = json_is_true(json_object_get(j, "fatal"));
    pthread_mutex_lock(&m->lock);
    snprintf(m->prog.link_error, sizeof m->prog.link_error, "destination: %s", e ? e : "?");
    if (fatal)
      snprintf(m->error, sizeof m->error, "the destination refused the session: %s",
               e ? e : "?");
    pthread_mutex_unlock(&m->lock);
    json_decref(j);
    link_conn_close(c);
    return fatal ? -EPERM : -EAGAIN;
  }
  if (r == 0 && lm.type == MSG_HELLO_OK)
    ok = proto_json_parse(lm.data, lm.len, err, sizeof err);
  if (!ok) {
    pthread_mutex_lock(&m->lock);
    fmt_into(m->prog.link_error, sizeof m->prog.link_error, "handshake: %s",
             r < 0 ? err : "no HELLO_OK");
    pthread_mutex_unlock(&m->lock);
    link_conn_close(c);
    return -EAGAIN;
  }
  uint64_t applied = (uint64_t)json_integer_value(json_object_get(ok, "applied_seq"));
  json_t *disks = json_object_get(ok, "disks");
  char dstate[24];
  const char *ds = json_string_value(json_object_get(ok, "state"));
  snprintf(dstate, sizeof dstate, "%s", ds ? ds : "?");

  pthread_mutex_lock(&m->lock);
  bool fresh = m->next_seq == 0;            /* first connection of this process */
  if (fresh) {
    /* After a restart the ring is empty: go on from what the destination
     * holds; background data past its mark is sent again. */
    m->next_seq = applied + 1;
    m->acked_seq = applied;
    for (unsigned i = 0; i < m->ndisks; i++) {
      struct mig_disk *md = &m->disks[i];
      json_t *dj = json_array_get(disks, i);
      uint64_t hwm = (uint64_t)json_integer_value(json_object_get(dj, "bg_hwm"));
      hwm = MIN(hwm, md->size) / md->gran * md->gran;
      md->acked_bg = hwm;
      s->fg_pos[i] = 0;
      md->sweep = 0;
      /* Background data between the mark and our old cursor was sent before
       * the restart: the cursor sends it again, counted as resent. */
      md->resend_mark = md->cursor > hwm ? md->cursor : 0;
      md->cursor = hwm;
    }
  } else {
    drop_ring_locked(m, applied, &s->acked_payload);
    m->acked_seq = MAX(m->acked_seq, applied);
    /* Frames the destination lacks are renumbered after what it holds; a
     * CTRL or BLOB in flight is asked again by its waiter. */
    size_t k = 0;
    for (size_t i = 0; i < m->ring_n; i++) {
      if (m->ring[i].type == MSG_DATA)
        m->ring[k++] = m->ring[i];
      else {
        m->ring_bytes -= m->ring[i].plen;
        free(m->ring[i].payload);
      }
    }
    m->ring_n = k;
    for (size_t i = 0; i < m->ring_n; i++)
      m->ring[i].seq = applied + 1 + i;
    m->next_seq = applied + 1 + m->ring_n;
    m->prog.reconnects++;
  }
  m->nack_from = 0;
  m->conn = c;
  m->conn_dead = false;
  m->last_heard_ns = now_ns();
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "up");
  m->prog.link_error[0] = '\0';
  pthread_mutex_unlock(&m->lock);
  json_decref(ok);

  struct receiver_arg *ra = malloc(sizeof *ra);
  if (ra) {
    /* Filled before the thread exists: it reads them at once. */
    ra->s = s;
    ra->conn = c;
  }
  if (!ra || pthread_create(&m->receiver, NULL, receiver_main, ra) != 0) {
    free(ra);
    disconnect(s);
    return -EAGAIN;
  }
  m->receiver_started = true;
  log_info(m->vm, "migration %s: site link to '%s' (%s) up; the destination holds %llu "
           "frames (%s)", m->id, m->peer, link, (unsigned long long)applied, dstate);
  s->backoff_ms = 0;
  if (!fresh)
    return resend_from(s, 0) < 0 ? -EAGAIN : 0;
  return 0;
}

/* Waits until the window has room for `need` bytes, or the link fails, or
 * the migration must leave.  Handles NACKs on the way. */
static int wait_window(struct src *s, size_t need)
{
  struct migration *m = s->m;
  for (;;) {
    pthread_mutex_lock(&m->lock);
    uint64_t nack = m->nack_from;
    m->nack_from = 0;
    bool dead = !m->conn || m->conn_dead, leave = m->stop || m->cancel;
    bool room = m->ring_bytes + need <= m->window || m->ring_n == 0;
    bool stalled = m->ring_n && now_ns() - m->last_heard_ns > STALL_NS;
    if (!dead && !leave && !room && !nack && !stalled) {
      uint64_t t0 = now_ns();
      cond_wait_ms(m, 100);
      s->window_wait_ns += now_ns() - t0;         /* the link is the bottleneck */
      pthread_mutex_unlock(&m->lock);
      continue;
    }
    if (stalled) {
      snprintf(m->prog.link_error, sizeof m->prog.link_error,
               "no answer from the destination for %llu s",
               (unsigned long long)(STALL_NS / 1000000000));
      m->conn_dead = true;
    }
    pthread_mutex_unlock(&m->lock);
    if (nack) {
      log_warn(m->vm, "migration %s: the destination asks for frames from %llu again", m->id,
               (unsigned long long)nack);
      if (resend_from(s, nack) < 0)
        return -ECONNRESET;
      continue;
    }
    if (dead || stalled)
      return -ECONNRESET;
    if (leave)
      return -ECANCELED;
    return 0;
  }
}

/* Sends a CTRL request (its "req" id is set here) and arms the answer slot. */
static int ctrl_send(struct src *s, json_t *req)
{
  struct migration *m = s->m;
  uint64_t id = ++m->next_req;
  json_object_set_new(req, "req", json_integer((json_int_t)id));
  char *text = json_dumps(req, JSON_COMPACT);
  json_decref(req);
  if (!text)
    return -ENOMEM;
  pthread_mutex_lock(&m->lock);
  m->reply_req = id;
  json_decref(m->reply);
  m->reply = NULL;
  free(m->hashes);
  m->hashes = NULL;
  pthread_mutex_unlock(&m->lock);
  int r = wait_window(s, strlen(text));
  if (r == 0)
    r = send_frame(s, MSG_CTRL, text, (uint32_t)strlen(text), false, 0, 0, 0);
  free(text);
  return r;
}

/* Waits for the answer to the CTRL last sent: its REPLY, or its HASHES when
 * want_hashes (a REPLY then means the destination refused: -EIO).  NACKs
 * that come meanwhile are served.  The answer is handed over (caller frees);
 * -ECONNRESET when the link fails or no answer comes in time (the link is
 * then treated as dead), -ECANCELED when ferryd stops. */
static int ctrl_await(struct src *s, bool want_hashes, unsigned timeout_ms, json_t **reply,
                      void **hashes, uint32_t *hlen)
{
  struct migration *m = s->m;
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  int r = 0;
  pthread_mutex_lock(&m->lock);
  for (;;) {
    if (want_hashes ? m->hashes != NULL : m->reply != NULL)
      break;
    if (want_hashes && m->reply) {
      r = -EIO;
      break;
    }
    if (!m->conn || m->conn_dead) {
      r = -ECONNRESET;
      break;
    }
    if (m->stop) {
      r = -ECANCELED;
      break;
    }
    if (m->nack_from) {                  /* a resend is due before our answer comes */
      uint64_t from = m->nack_from;
      m->nack_from = 0;
      pthread_mutex_unlock(&m->lock);
      r = resend_from(s, from);
      pthread_mutex_lock(&m->lock);
      if (r < 0)
        break;
      continue;
    }
    if (now_ns() > deadline) {
      snprintf(m->prog.link_error, sizeof m->prog.link_error,
               "no answer from the destination within %u s", timeout_ms / 1000);
      m->conn_dead = true;
      r = -ECONNRESET;
      break;
    }
    cond_wait_ms(m, 100);
  }
  if (r == 0 || r == -EIO) {
    if (reply) {
      *reply = m->reply;
      m->reply = NULL;
    }
    if (hashes && m->hashes) {
      *hashes = m->hashes;
      *hlen = m->hashes_len;
      m->hashes = NULL;
    }
  }
  m->reply_req = 0;
  pthread_mutex_unlock(&m->lock);
  return r;
}

static int ctrl_call(struct src *s, json_t *req, bool want_hashes, unsigned timeout_ms,
                     json_t **reply, void **hashes, uint32_t *hlen)
{
  int r = ctrl_send(s, req);
  return r < 0 ? r : ctrl_await(s, want_hashes, timeout_ms, reply, hashes, hlen);
}

/* A CTRL whose reply must say ok; err gets the destination's reason. */
static int ctrl_ok(struct src *s, json_t *req, unsigned timeout_ms, json_t **reply_out,
                   char *err, size_t errlen)
{
  json_t *reply = NULL;
  int r = ctrl_call(s, req, false, timeout_ms, &reply, NULL, NULL);
  if (r < 0)
    return r;
  if (!json_is_true(json_object_get(reply, "ok"))) {
    const char *e = json_string_value(json_object_get(reply, "error"));
    snprintf(err, errlen, "%s", e ? e : "refused");
    json_decref(reply);
    return -EREMOTEIO;
  }
  if (reply_out)
    *reply_out = reply;
  else
    json_decref(reply);
  return 0;
}

/* Every frame sent so far is durable at the destination. */
static int flush_remote(struct src *s)
{
  char err[256];
  int r = ctrl_ok(s, json_pack("{s:s}", "op", "flush"), REPLY_TIMEOUT_MS, NULL, err,
                  sizeof err);
  if (r == -EREMOTEIO)
    log_error(s->m->vm, "migration %s: flush refused: %s", s->m->id, err);
  return r;
}

/* ---- sending data ---- */

/* Sends [off, off+len) of disk di from s->buf + DATA_HEADER_SIZE (already
 * read), as zero ranges for its regions of zeros and data for the rest. */
static int send_range(struct src *s, unsigned di, uint64_t off, uint64_t len, bool bg)
{
  struct migration *m = s->m;
  struct mig_disk *md = &m->disks[di];
  uint8_t *data = s->buf + DATA_HEADER_SIZE;
  uint64_t pos = 0;
  while (pos < len) {
    uint64_t rl = MIN(md->gran, len - pos);
    bool zero = buffer_is_zero(data + pos, rl);
    uint64_t end = pos + rl;
    while (end < len) {
      uint64_t nl = MIN(md->gran, len - end);
      if (buffer_is_zero(data + end, nl) != zero)
        break;
      end += nl;
    }
    struct proto_data d = { .disk = di, .kind = zero ? DATA_KIND_ZERO : DATA_KIND_DATA,
                            .flags = bg ? DATA_F_BACKGROUND : 0, .offset = off + pos,
                            .length = end - pos };
    int r;
    if (zero) {
      uint8_t hdr[DATA_HEADER_SIZE];
      proto_data_encode(&d, hdr);
      r = send_frame(s, MSG_DATA, hdr, DATA_HEADER_SIZE, bg, di, d.offset, d.length);
    } else {
      /* The header goes right before the data in s->buf: one payload. */
      uint8_t *p = data + pos - DATA_HEADER_SIZE;
      uint8_t save[DATA_HEADER_SIZE];
      memcpy(save, p, DATA_HEADER_SIZE);
      proto_data_encode(&d, p);
      r = send_frame(s, MSG_DATA, p, (uint32_t)(DATA_HEADER_SIZE + d.length), bg, di, d.offset,
                     d.length);
      memcpy(p, save, DATA_HEADER_SIZE);
    }
    if (r < 0)
      return r;
    pthread_mutex_lock(&m->lock);
    if (zero) {
      m->prog.zero_bytes_sent += d.length;
    } else {
      m->prog.data_bytes_sent += d.length;
      if (bg)
        m->prog.bg_data_bytes += d.length;
      else
        m->prog.fg_data_bytes += d.length;
    }
    pthread_mutex_unlock(&m->lock);
    pos = end;
  }
  return 0;
}

struct alloc_probe {
  bool any_data;
};

static int alloc_fn(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  (void)off;
  (void)len;
  struct alloc_probe *p = opaque;
  if (!(flags & DISK_EXTENT_HOLE)) {
    p->any_data = true;
    return 1;
  }
  return 0;
}

static bool chunk_is_hole(struct mig_disk *md, uint64_t off, uint64_t len)
{
  struct alloc_probe p = { false };
  if (disk_extents_allocation(md->d, off, len, alloc_fn, &p) < 0)
    return false;
  return !p.any_data;
}

/* One step of the background copy: a data chunk, or a run of hole chunks. */
static int bg_step(struct src *s)
{
  struct migration *m = s->m;
  unsigned di = 0;
  while (di < m->ndisks && m->disks[di].cursor >= m->disks[di].size)
    di++;
  if (di == m->ndisks) {
    s->bg_done = true;
    return 0;
  }
  struct mig_disk *md = &m->disks[di];
  uint64_t off = md->cursor;
  uint64_t len = MIN((uint64_t)CHUNK_BYTES - off % CHUNK_BYTES, md->size - off);
  int r = wait_window(s, len + DATA_HEADER_SIZE);
  if (r < 0)
    return r;
  if (chunk_is_hole(md, off, len)) {
    uint64_t end = off + len;
    while (end < md->size && end - off < ZERO_RUN_MAX &&
           chunk_is_hole(md, end, MIN((uint64_t)CHUNK_BYTES, md->size - end)))
      end = MIN(end + CHUNK_BYTES, md->size);
    struct proto_data d = { .disk = di, .kind = DATA_KIND_ZERO, .flags = DATA_F_BACKGROUND,
                            .offset = off, .length = end - off };
    uint8_t hdr[DATA_HEADER_SIZE];
    proto_data_encode(&d, hdr);
    if ((r = send_frame(s, MSG_DATA, hdr, DATA_HEADER_SIZE, true, di, off, end - off)) < 0)
      return r;
    pthread_mutex_lock(&m->lock);
    m->prog.zero_bytes_sent += end - off;
    md->cursor = end;
    pthread_mutex_unlock(&m->lock);
    return 0;
  }
  throttle_wait(&m->rate, len, false);            /* replication backpressure */
  if (should_leave(m))
    return -ECANCELED;
  r = disk_read(md->d, s->buf + DATA_HEADER_SIZE, (uint32_t)len, off, DISK_IO_REPLICA);
  if (r < 0) {
    pthread_mutex_lock(&m->lock);
    snprintf(m->error, sizeof m->error, "cannot read disk '%s' at %llu: %s", md->name,
             (unsigned long long)off, strerror(-r));
    pthread_mutex_unlock(&m->lock);
    return -EIO;
  }
  if ((r = send_range(s, di, off, len, true)) < 0)
    return r;
  pthread_mutex_lock(&m->lock);
  if (off < md->resend_mark)          /* sent before a restart, sent again now */
    m->prog.resent_bytes += MIN(len, md->resend_mark - off);
  md->cursor = off + len;
  /* Sent now: whatever the sweep said of these regions before is stale. */
  for (uint64_t rgn = off / md->gran; rgn < DIV_ROUND_UP(off + len, md->gran); rgn++)
    bitmap_clear(&md->verified, rgn);
  pthread_mutex_unlock(&m->lock);
  return 0;
}

/* One step of the foreground copy: the next run of pending regions behind
 * the cursor, on the next disk in turn.  Returns 1 if something was sent. */
static int fg_step(struct src *s)
{
  struct migration *m = s->m;
  for (unsigned k = 0; k < m->ndisks; k++) {
    unsigned di = k;
    struct mig_disk *md = &m->disks[di];
    uint64_t limit = md->cursor / md->gran;          /* regions wholly behind the cursor */
    uint64_t first = bitmap_next(&md->pending, s->fg_pos[di], true);
    if (first >= limit && s->fg_pos[di]) {
      s->fg_pos[di] = 0;
      first = bitmap_next(&md->pending, 0, true);
    }
    if (first >= limit)
      continue;
    uint64_t maxr = CHUNK_BYTES / md->gran;
    uint64_t n = 1;
    while (n < maxr && first + n < limit && bitmap_test(&md->pending, first + n))
      n++;
    uint64_t off = first * md->gran, len = MIN(n * md->gran, md->size - off);
    int r = wait_window(s, len + DATA_HEADER_SIZE);
    if (r < 0)
      return r;
    throttle_wait(&m->rate, len, false);
    for (uint64_t i = 0; i < n; i++) {
      bitmap_clear(&md->pending, first + i);
      bitmap_clear(&md->verified, first + i);
    }
    r = disk_read(md->d, s->buf + DATA_HEADER_SIZE, (uint32_t)len, off, DISK_IO_REPLICA);
    if (r < 0) {
      bitmap_set_range(&md->pending, first, n);      /* re-mark before anything else */
      pthread_mutex_lock(&m->lock);
      snprintf(m->error, sizeof m->error, "cannot read disk '%s' at %llu: %s", md->name,
               (unsigned long long)off, strerror(-r));
      pthread_mutex_unlock(&m->lock);
      return -EIO;
    }
    r = send_range(s, di, off, len, false);
    if (r < 0) {
      /* Not sent, or in the ring: a reconnect sends the ring again; mark
       * anyway (a second send is harmless, a missing one is not). */
      bitmap_set_range(&md->pending, first, n);
      return r;
    }
    s->fg_pos[di] = first + n;
    return 1;
  }
  return 0;
}

/* Takes every disk's dirty bits into pending (or suspect, right after a
 * restart).  full: the map file is rewritten after pending is on disk. */
static int fg_pass(struct src *s, bool full)
{
  struct migration *m = s->m;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    struct bitmap *bits = &s->scratch[di];
    int r;
    uint64_t before = bitmap_count(&md->pending);
    if (full) {
      struct keep_ctx k = { s, di };
      r = disk_dirty_swap_keep(md->d, keep_pending, &k, NULL);
      if (r < 0)
        return r;
      /* keep_pending ORed the bits into pending already */
    } else {
      if ((r = disk_dirty_swap_fast(md->d, bits, NULL)) < 0)
        return r;
      for (uint64_t i = 0; i < bits->nwords; i++) {
        uint64_t w = atomic_load_explicit(&bits->words[i], memory_order_relaxed);
        if (w)
          atomic_fetch_or(&md->pending.words[i], w);
      }
    }
    uint64_t added = bitmap_count(&md->pending) - before;
    s->dirty_total += added * md->gran;
    uint64_t limit = md->cursor / md->gran;
    /* Ahead of the cursor: the cursor reads them later, after the write. */
    for (uint64_t rg = bitmap_next(&md->pending, limit, true); rg < md->nregions;
         rg = bitmap_next(&md->pending, rg + 1, true))
      bitmap_clear(&md->pending, rg);
    if (s->after_restart) {
      /* Maybe sent and held already: compare before sending again. */
      for (uint64_t i = 0; i < md->pending.nwords; i++) {
        uint64_t w = atomic_exchange(&md->pending.words[i], 0);
        if (w)
          atomic_fetch_or(&s->suspect[di].words[i], w);
      }
    }
    for (uint64_t i = 0; i < md->pending.nwords; i++) {
      uint64_t w = atomic_load_explicit(&md->pending.words[i], memory_order_relaxed);
      if (w)
        atomic_fetch_and(&md->verified.words[i], ~w);
    }
  }
  s->after_restart = false;
  if (full)
    s->last_rewrite_ns = now_ns();
  return 0;
}

/* ---- hash comparison ---- */

/* Compares regions of disk di with the destination: list[0..count) (any
 * order), or [first, first+count) when list is NULL; one round trip either
 * way.  mode: 0 sweep (VM running: a dirty region is skipped), 1 suspects
 * (only suspect bits are judged), 2 cutover (VM paused: any difference
 * counts).  Differences become pending; *diff counts them. */
static int compare_regions(struct src *s, unsigned di, const uint64_t *list, uint64_t first,
                           uint64_t count, int mode, uint64_t *diff)
{
  struct migration *m = s->m;
  struct mig_disk *md = &m->disks[di];
  if (s->hashbuf_len < md->gran) {
    free(s->hashbuf);
    s->hashbuf = malloc(md->gran);
    s->hashbuf_len = s->hashbuf ? md->gran : 0;
    if (!s->hashbuf)
      return -ENOMEM;
  }
  /* The request goes out before we hash here, and we send nothing until
   * its answer: the destination's hashes describe exactly what we sent
   * before it.  Both sides read and hash at the same time. */
#define REGION(i) (list ? list[i] : first + (i))
  json_t *req;
  if (list) {
    json_t *arr = json_array();
    for (uint64_t i = 0; i < count; i++)
      json_array_append_new(arr, json_integer((json_int_t)list[i]));
    req = json_pack("{s:s, s:I, s:o}", "op", "hash", "disk", (json_int_t)di, "regions", arr);
  } else {
    req = json_pack("{s:s, s:I, s:I, s:I}", "op", "hash", "disk", (json_int_t)di, "first",
                    (json_int_t)first, "count", (json_int_t)count);
  }
  int r = ctrl_send(s, req);
  if (r < 0)
    return r;
  uint64_t *local = malloc(count * sizeof *local);
  if (!local)
    return -ENOMEM;
  uint64_t t0 = now_ns(), hashed = 0;
  for (uint64_t i = 0; i < count; i++) {
    r = region_hash(md->d, md->gran, REGION(i), s->hashbuf, &local[i]);
    if (r < 0) {
      free(local);
      return -EIO;
    }
    if (r == 0)
      hashed += md->gran;            /* holes cost nothing: not part of the speed */
  }
  json_t *reply = NULL;
  void *hp = NULL;
  uint32_t hlen = 0;
  r = ctrl_await(s, true, REPLY_TIMEOUT_MS, &reply, &hp, &hlen);
  uint64_t dt = now_ns() - t0;
  if (hp && hashed >= (4u << 20) && dt > 1000000) {
    /* The slower side sets the pace, so the wait for the answer counts. */
    double bps = (double)hashed * 1e9 / (double)dt;
    s->hash_bps = s->hash_bps ? 0.7 * s->hash_bps + 0.3 * bps : bps;
  }
  if (!hp) {
    free(local);
    const char *e = json_string_value(json_object_get(reply, "error"));
    if (e) {
      pthread_mutex_lock(&m->lock);
      snprintf(m->error, sizeof m->error, "the destination cannot hash disk '%s': %s",
               md->name, e);
      pthread_mutex_unlock(&m->lock);
    }
    json_decref(reply);
    return e ? -EIO : r < 0 ? r : -ECONNRESET;
  }
  json_decref(reply);
  struct proto_hashes h;
  char err[128];
  if (proto_hashes_parse(hp, hlen, &h, err, sizeof err) < 0 || h.disk != di ||
      h.first != (list ? 0 : first) || h.count != count) {
    free(hp);
    free(local);
    return -EPROTO;
  }
  const struct bitmap *live = cbt_bitmap(disk_cbt(md->d));
  uint64_t ndiff = 0, nverified = 0;
  for (uint64_t i = 0; i < count; i++) {
    uint64_t rg = REGION(i);
    bool same = local[i] == proto_hash_at(&h, (uint32_t)i);
    if (mode == 1 && !bitmap_test(&s->suspect[di], rg))
      continue;
    if (mode == 1)
      bitmap_clear(&s->suspect[di], rg);
    if (same) {
      if (!bitmap_test(&md->pending, rg) && (mode == 2 || !bitmap_test(live, rg))) {
        bitmap_set(&md->verified, rg);
        nverified++;
      }
      continue;
    }
    if (mode == 0 && (bitmap_test(live, rg) || bitmap_test(&md->pending, rg)))
      continue;                     /* written meanwhile: it is sent again anyway */
    if (mode == 0) {
      log_warn(md->name, "migration %s: verify: region %llu (offset %llu) differs at the "
               "destination and is not dirty; sending it again", m->id,
               (unsigned long long)rg, (unsigned long long)(rg * md->gran));
    }
    bitmap_set(&md->pending, rg);
    bitmap_clear(&md->verified, rg);
    ndiff++;
  }
  pthread_mutex_lock(&m->lock);
  if (mode == 0)
    m->prog.verify_repairs += ndiff;
  m->prog.verified_regions += nverified;
  pthread_mutex_unlock(&m->lock);
  if (diff)
    *diff += ndiff;
  free(hp);
  free(local);
  return 0;
#undef REGION
}

/* One batch of the verify sweep.  Returns 1 while there is more. */
static int sweep_step(struct src *s)
{
  struct migration *m = s->m;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    uint64_t next = bitmap_next(&md->verified, md->sweep, false);
    if (next >= md->nregions) {
      md->sweep = md->nregions;
      continue;
    }
    uint64_t count = MIN((uint64_t)HASH_BATCH, md->nregions - next);
    int r = compare_regions(s, di, NULL, next, count, 0, NULL);
    if (r < 0)
      return r;
    md->sweep = next + count;
    return 1;
  }
  s->sweep_done = true;
  return 0;
}

/* Up to max regions of disk di from `from` on that are not verified and not
 * pending (pending ones are sent again anyway) into list; returns how many,
 * and where the scan stopped in *next. */
static uint64_t collect_unverified(struct mig_disk *md, uint64_t from, uint64_t *list,
                                   uint64_t max, uint64_t *next)
{
  uint64_t n = 0, rg = bitmap_next(&md->verified, from, false);
  for (; rg < md->nregions && n < max; rg = bitmap_next(&md->verified, rg + 1, false))
    if (!bitmap_test(&md->pending, rg))
      list[n++] = rg;
  *next = rg;
  return n;
}

/* Once the sweep is done, regions sent again since are verified again in the
 * link's idle time, so that the cutover finds little left to check: one
 * request for up to HASH_BATCH of them.  Returns 1 if it did something. */
static int reverify_step(struct src *s)
{
  struct migration *m = s->m;
  uint64_t list[HASH_BATCH];
  for (unsigned k = 0; k < m->ndisks; k++) {
    unsigned di = (s->reverify_disk + k) % m->ndisks;
    struct mig_disk *md = &m->disks[di];
    uint64_t next;
    uint64_t n = collect_unverified(md, s->reverify_pos[di], list, HASH_BATCH, &next);
    if (n == 0) {
      s->reverify_pos[di] = 0;
      continue;
    }
    int r = compare_regions(s, di, list, 0, n, 0, NULL);
    if (r < 0)
      return r;
    s->reverify_pos[di] = next;
    s->reverify_disk = di + 1;
    return 1;
  }
  return 0;
}

/* One batch of suspect checking.  Returns 1 if it did something. */
static int suspect_step(struct src *s)
{
  struct migration *m = s->m;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    uint64_t limit = md->cursor / md->gran;
    uint64_t first = bitmap_next(&s->suspect[di], 0, true);
    /* Ahead of the cursor a suspect is moot: the cursor sends it. */
    while (first < md->nregions && first >= limit) {
      bitmap_clear(&s->suspect[di], first);
      first = bitmap_next(&s->suspect[di], first + 1, true);
    }
    if (first >= md->nregions)
      continue;
    uint64_t count = MIN((uint64_t)HASH_BATCH, limit - first);
    int r = compare_regions(s, di, NULL, first, count, 1, NULL);
    return r < 0 ? r : 1;
  }
  return 0;
}

/* Pending regions behind the cursor: the current foreground round. */
static bool pending_behind(struct src *s)
{
  for (unsigned di = 0; di < s->m->ndisks; di++) {
    struct mig_disk *md = &s->m->disks[di];
    if (bitmap_next(&md->pending, 0, true) < md->cursor / md->gran)
      return true;
  }
  return false;
}

static uint64_t suspects_left(struct src *s)
{
  uint64_t n = 0;
  for (unsigned di = 0; di < s->m->ndisks; di++)
    n += bitmap_count(&s->suspect[di]);
  return n;
}

/* ---- progress ---- */

static uint64_t alloc_left(struct mig_disk *md)
{
  if (!md->seg_alloc)
    return md->size - MIN(md->cursor, md->size);
  uint64_t seg = md->cursor / SEG_BYTES, left = 0;
  if (seg >= md->nseg)
    return 0;
  uint64_t seg_end = MIN((seg + 1) * SEG_BYTES, md->size), seg_len = seg_end - seg * SEG_BYTES;
  left += (uint64_t)((double)md->seg_alloc[seg] * (double)(seg_end - md->cursor) / (double)seg_len);
  for (uint64_t i = seg + 1; i < md->nseg; i++)
    left += md->seg_alloc[i];
  return left;
}

struct alloc_sum {
  uint64_t bytes;
};

static int sum_fn(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  (void)off;
  struct alloc_sum *a = opaque;
  if (!(flags & DISK_EXTENT_HOLE))
    a->bytes += len;
  return 0;
}

static void measure_allocation(struct mig_disk *md)
{
  md->nseg = DIV_ROUND_UP(md->size, SEG_BYTES);
  free(md->seg_alloc);
  md->seg_alloc = calloc(md->nseg, sizeof *md->seg_alloc);
  if (!md->seg_alloc)
    return;
  for (uint64_t i = 0; i < md->nseg; i++) {
    struct alloc_sum a = { 0 };
    uint64_t off = i * SEG_BYTES;
    disk_extents_allocation(md->d, off, MIN(SEG_BYTES, md->size - off), sum_fn, &a);
    md->seg_alloc[i] = a.bytes;
  }
}

static uint64_t backlog_bytes(struct src *s)
{
  struct migration *m = s->m;
  uint64_t b = 0;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    b += bitmap_count(&md->pending) * md->gran;
    b += cbt_dirty_count(disk_cbt(md->d)) * md->gran;
  }
  return b;
}

static uint64_t unverified_bytes(struct src *s)
{
  uint64_t b = 0;
  for (unsigned di = 0; di < s->m->ndisks; di++) {
    struct mig_disk *md = &s->m->disks[di];
    b += (md->nregions - bitmap_count(&md->verified)) * md->gran;
  }
  return b;
}

static double ewma(double old, double v) { return old == 0 ? v : 0.6 * old + 0.4 * v; }

/* The time the pause would take now: drain the backlog, verify what is not
 * verified (a round trip per batch), move the VM state, a round trip for
 * each of flush, state and activation, and the fixed part: pausing the VM
 * here and starting it there (at least 200 ms, more if a cutover attempt
 * measured more). */
static double estimate_downtime_s(struct src *s, uint64_t backlog)
{
  double repl = MAX(s->capacity, 1.0);
  double hash = s->hash_bps > 0 ? s->hash_bps : 500e6;
  double state = 0;       /* the sim's state: 4 bytes per 4 KiB block (a qemu VM's
                             RAM goes by QEMU's migration, before the pause) */
  for (unsigned di = 0; di < s->m->ndisks && !is_qemu(s->m); di++)
    state += (double)s->m->disks[di].size / 1024;
  uint64_t unverified = unverified_bytes(s);
  double batches = (double)unverified / (double)s->m->disks[0].gran / HASH_BATCH + 1;
  double fixed = MAX(s->fixed_s, 0.2);
  return (double)backlog / repl + (double)unverified / hash + state / repl +
         (3.0 + batches) * (double)s->rtt_base_ns / 1e9 + fixed;
}

static void set_backpressure(struct src *s, uint64_t limit)
{
  struct migration *m = s->m;
  s->bp_limit = limit;
  for (unsigned di = 0; di < m->ndisks; di++)
    disk_set_backpressure_limit(m->disks[di].d, limit ? MAX(limit / m->ndisks, 1) : 0);
  pthread_mutex_lock(&m->lock);
  m->prog.backpressure_bps = limit;
  pthread_mutex_unlock(&m->lock);
}

/* Once a second: rates, bytes left, ETA, verdict, write backpressure.
 * Returns true when the cutover can start. */
static bool tick(struct src *s)
{
  struct migration *m = s->m;
  uint64_t now = now_ns();
  double dt = s->last_tick_ns ? (double)(now - s->last_tick_ns) / 1e9 : 1.0;
  if (dt < 0.05)
    dt = 0.05;
  s->last_tick_ns = now;

  pthread_mutex_lock(&m->lock);
  struct link_conn *c = m->conn_dead ? NULL : m->conn;
  uint64_t acked = s->acked_payload;
  pthread_mutex_unlock(&m->lock);
  uint64_t wire = 0;
  if (c) {
    struct link_stats st;
    link_conn_stats(c, &st);
    wire = st.wire_bytes_sent;
  }
  double link = wire >= s->prev_wire ? (double)(wire - s->prev_wire) / dt : 0;
  s->prev_wire = wire;
  double repl = (double)(acked - s->prev_acked) / dt;
  s->prev_acked = acked;
  double dirty = (double)(s->dirty_total - s->prev_dirty) / dt;
  s->prev_dirty = s->dirty_total;
  double vmw = 0;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct heat *h = disk_heat(m->disks[di].d);
    if (h) {
      struct heat_rates r;
      heat_tick(h);
      heat_rates(h, &r);
      vmw += r.write_bps_1s;
    }
  }
  uint64_t backlog = backlog_bytes(s);
  double trend = ((double)backlog - (double)s->prev_backlog) / dt;
  s->prev_backlog = backlog;
  s->e_link = ewma(s->e_link, link);
  if (repl > 0 || !c)
    s->e_repl = ewma(s->e_repl, repl);
  s->e_dirty = ewma(s->e_dirty, dirty);
  s->e_vmw = ewma(s->e_vmw, vmw);
  s->e_trend = ewma(s->e_trend, trend);

  uint64_t left = 0;
  for (unsigned di = 0; di < m->ndisks; di++)
    left += alloc_left(&m->disks[di]);

  /* The zstd level: a link that keeps us waiting for the window leaves CPU
   * to spare, so compress harder; a driver that never waits and is busy all
   * the time is CPU-bound, so compress less. */
  struct timespec cts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cts);
  uint64_t cpu = (uint64_t)cts.tv_sec * 1000000000ull + (uint64_t)cts.tv_nsec;
  double busy = s->prev_cpu_ns ? (double)(cpu - s->prev_cpu_ns) / 1e9 / dt : 0;
  double waited = (double)(s->window_wait_ns - s->prev_wait_ns) / 1e9 / dt;
  s->prev_cpu_ns = cpu;
  s->prev_wait_ns = s->window_wait_ns;
  if (c && waited > 0.3 && busy < 0.6 && s->level < ZSTD_LEVEL_MAX)
    s->level++;
  else if (c && busy > 0.85 && waited < 0.05 && s->level > ZSTD_LEVEL_MIN)
    s->level--;

  /* What the link can carry, as opposed to what we happen to send, in wire
   * bytes: while the driver is link-bound (it had work all the time and
   * spent it waiting for the window or blocked in sends, not on the CPU)
   * the wire rate it got is the capacity (so a link that slows down shows
   * at once); otherwise the capacity is at least that.  In payload terms it
   * is the wire capacity divided by how well the data compresses now. */
  double idle = (double)(s->idle_ns - s->prev_idle_ns) / 1e9 / dt;
  s->prev_idle_ns = s->idle_ns;
  uint64_t payload = m->prog.payload_bytes_sent;
  if (c && payload > s->prev_payload && wire > 0) {
    double ratio = link * dt / (double)(payload - s->prev_payload);
    if (ratio > 0.005 && ratio < 1.5)
      s->e_ratio = s->e_ratio ? 0.7 * s->e_ratio + 0.3 * ratio : ratio;
  }
  s->prev_payload = payload;
  bool link_bound = waited > 0.5 || (idle < 0.2 && busy < 0.7);
  if (c && link > 0) {
    if (link_bound)
      s->capacity_wire = s->capacity_wire ? 0.6 * s->capacity_wire + 0.4 * link : link;
    else
      s->capacity_wire = MAX(link, s->capacity_wire);
  }
  s->capacity = s->capacity_wire / MAX(s->e_ratio > 0 ? s->e_ratio : 1.0, 0.05);

  /* The round trip without the queues our own data builds (the minimum of
   * the last 10-20 s): what a drained link takes, as at the cutover. */
  if (s->rtt_ns && (!s->rtt_min_cur || s->rtt_ns < s->rtt_min_cur))
    s->rtt_min_cur = s->rtt_ns;
  if (now - s->rtt_window_ns >= 10000000000ull) {
    s->rtt_min_prev = s->rtt_min_cur;
    s->rtt_min_cur = 0;
    s->rtt_window_ns = now;
  }
  uint64_t base = s->rtt_min_prev && s->rtt_min_cur ? MIN(s->rtt_min_prev, s->rtt_min_cur)
                                                     : MAX(s->rtt_min_prev, s->rtt_min_cur);
  s->rtt_base_ns = base ? base : s->rtt_ns;

  /* The window: enough for the link's round trip and the destination's
   * sync batching, no more (what is in flight is what a cut loses, and what
   * sits in the WAN's queues delays everything else). */
  double rtt = (double)s->rtt_base_ns / 1e9 + (double)DEST_SYNC_NS / 1e9;
  size_t win = (size_t)MIN((double)WINDOW_MAX, MAX((double)WINDOW_MIN, 4.0 * s->capacity * rtt));
  pthread_mutex_lock(&m->lock);
  m->window = MAX(win, (size_t)DEST_SYNC_BYTES * 2);
  pthread_mutex_unlock(&m->lock);
  log_debug(m->vm, "migration %s: tick: repl %.0f/s link %.0f/s capacity %.0f/s (wire %.0f, "
            "ratio %.2f) dirty %.0f/s busy %.2f idle %.2f waited %.2f level %d window %zu rtt "
            "%.1f ms (base %.1f) backlog %llu", m->id, repl, link, s->capacity, s->capacity_wire,
            s->e_ratio, dirty, busy, idle, waited, s->level, m->window, (double)s->rtt_ns / 1e6,
            (double)s->rtt_base_ns / 1e6, (unsigned long long)backlog);

  bool ready = false;
  double eta = -1;
  char v[200];
  double est = estimate_downtime_s(s, backlog);
  uint64_t budget_ms = m->max_downtime_ms;
  /* A fifth of the budget is kept for what the estimate cannot see. */
  bool fits = s->bg_done && est * 1000.0 <= 0.8 * (double)budget_ms && suspects_left(s) == 0 &&
              s->sweep_done;
  /* Cold: the VM is down already; the cutover just needs everything sent. */
  if (is_cold(m))
    fits = s->bg_done && s->sweep_done && suspects_left(s) == 0 && backlog == 0;

  /* Write backpressure (after the background copy): the backlog must drain,
   * so the VM may dirty at most half of what the link carries. */
  if (c && s->bg_done && !fits && s->sweep_done && s->capacity > 0) {
    s->not_ready_ticks++;
    /* Tighten when the VM dirties more than half the link, or, since the
     * capacity estimate may be high (a burst into the socket buffers), when
     * it has not fitted for a while and only the backlog is in the way. */
    bool backlog_blocks = estimate_downtime_s(s, 0) * 1000.0 <= 0.8 * (double)budget_ms;
    if ((s->not_ready_ticks >= 3 && s->e_dirty > 0.5 * s->capacity && s->e_trend >= 0) ||
        (s->not_ready_ticks >= 6 && backlog_blocks)) {
      double amp = s->e_vmw > 1 ? MAX(s->e_dirty / s->e_vmw, 1.0) : 1.0;
      uint64_t want = (uint64_t)(0.5 * s->capacity / amp);
      uint64_t limit = s->bp_limit ? MIN(want, (uint64_t)(s->bp_limit * 0.7)) : want;
      limit = MAX(limit, (uint64_t)BP_FLOOR);
      if (limit != s->bp_limit) {
        char lb[32], db[32], rb[32];
        fmt_bytes(limit, lb, sizeof lb);
        fmt_bytes((uint64_t)s->e_dirty, db, sizeof db);
        fmt_bytes((uint64_t)s->capacity, rb, sizeof rb);
        log_info(m->vm, "migration %s: write backpressure: VM writes limited to %s/s "
                 "(dirty %s/s against link %s/s)", m->id, lb, db, rb);
        set_backpressure(s, limit);
      }
      s->not_ready_ticks = 0;
    }
  } else {
    s->not_ready_ticks = 0;
  }

  char b1[32], b2[32], b3[32];
  if (!c) {
    snprintf(v, sizeof v, "site link down: reconnecting");
  } else if (!s->bg_done) {
    double net = s->e_repl - s->e_dirty * 0.5;
    eta = net > 0 ? ((double)left + (double)backlog) / net : -1;
    fmt_bytes((uint64_t)s->e_dirty, b1, sizeof b1);
    fmt_bytes((uint64_t)s->capacity, b2, sizeof b2);
    if (s->capacity <= 0)
      snprintf(v, sizeof v, "background copy starting");
    else if (s->e_dirty < s->capacity * 0.8)
      snprintf(v, sizeof v, "background copy; will converge (dirty %s/s < link %s/s)", b1, b2);
    else
      snprintf(v, sizeof v, "background copy; dirty rate %s/s exceeds link %s/s: write "
               "backpressure will slow the VM to converge", b1, b2);
  } else {
    double drain = s->capacity - s->e_dirty;
    eta = drain > 0 ? (double)backlog / drain : -1;
    ready = fits && now >= s->cutover_not_before;
    fmt_bytes(backlog, b1, sizeof b1);
    fmt_bytes((uint64_t)s->e_dirty, b2, sizeof b2);
    fmt_bytes((uint64_t)s->capacity, b3, sizeof b3);
    if (!s->sweep_done)
      snprintf(v, sizeof v, "verifying the destination (sweep); backlog %s", b1);
    else if (suspects_left(s))
      snprintf(v, sizeof v, "checking regions sent before the restart");
    else if (fits)
      snprintf(v, sizeof v, "converged: estimated downtime %.0f ms of %llu ms%s", est * 1000,
               (unsigned long long)budget_ms,
               s->bp_limit ? " (with write backpressure)" : "");
    else if (s->bp_limit)
      snprintf(v, sizeof v, "converging with write backpressure (VM writes limited to %s/s); "
               "backlog %s, estimated downtime %.0f ms", (fmt_bytes(s->bp_limit, b2, sizeof b2), b2),
               b1, est * 1000);
    else
      snprintf(v, sizeof v, "converging: backlog %s, dirty %s/s, link %s/s, estimated downtime "
               "%.0f ms", b1, b2, b3, est * 1000);
  }

  pthread_mutex_lock(&m->lock);
  struct mig_progress *p = &m->prog;
  p->wire_bytes_sent = m->wire_base + wire;
  p->zstd_level = s->level;
  p->bytes_left = p->bytes_left ? MIN(p->bytes_left, left) : left;
  p->backlog_bytes = backlog;
  p->backlog_trend_bps = s->e_trend;
  p->link_bps = s->e_link;
  p->repl_bps = s->e_repl;
  p->capacity_bps = s->capacity;
  p->dirty_bps = s->e_dirty;
  p->vm_write_bps = s->e_vmw;
  p->eta_s = eta;
  snprintf(p->verdict, sizeof p->verdict, "%s", v);
  pthread_mutex_unlock(&m->lock);
  return ready;
}

/* ---- cutover ---- */

static void fence_sources(struct src *s, const char *reason)
{
  for (unsigned di = 0; di < s->m->ndisks; di++)
    disk_set_fence(s->m->disks[di].d, reason);
}

/* Before the point of no return: the VM goes on here. */
static void abort_ram_migration(struct src *s);

static void abort_cutover(struct src *s, const char *why)
{
  struct migration *m = s->m;
  char err[256];
  fence_sources(s, NULL);
  if (is_qemu(m) && !is_cold(m))
    abort_ram_migration(s);          /* QEMU resumes the guest itself */
  else if (!is_cold(m) && vm_migration_resume(s->sh->vms, m->vm, err, sizeof err) < 0)
    log_error(m->vm, "migration %s: cannot resume the VM after an aborted cutover: %s", m->id,
              err);
  log_warn(m->vm, "migration %s: cutover aborted (%s); the VM %s here, replication goes on",
           m->id, why, is_cold(m) ? "stays" : "runs");
  set_verdict(m, "cutover aborted: %s; retrying", why);
  s->cutover_not_before = now_ns() + 3000000000ull;
  mig_set_state(m, "replicating", NULL);
  set_phase(m, "foreground");
}

/* Sends every pending region (behind the cursor, which is at the end). */
static int drain(struct src *s)
{
  int r;
  while ((r = fg_step(s)) == 1)
    ;
  return r;
}

static int send_vm_state(struct src *s, char *why, size_t whylen)
{
  struct migration *m = s->m;
  void *buf = NULL;
  size_t len = 0;
  /* A qemu VM has no state file: its RAM moves by QEMU migration (live) or
   * not at all (cold: it boots). */
  int r = is_qemu(m) ? ((buf = calloc(1, 1)) ? 0 : -ENOMEM)
                     : vm_export_state(s->sh->vms, m->vm, &buf, &len, why, whylen);
  if (r < 0)
    return r;
  uint8_t *piece = malloc(BLOB_HEADER_SIZE + BLOB_PIECE);
  if (!piece) {
    free(buf);
    return -ENOMEM;
  }
  for (size_t off = 0; r == 0 && (off < len || off == 0); off += BLOB_PIECE) {
    size_t n = MIN((size_t)BLOB_PIECE, len - off);
    proto_blob_encode(off, len, piece);
    memcpy(piece + BLOB_HEADER_SIZE, (uint8_t *)buf + off, n);
    if ((r = wait_window(s, BLOB_HEADER_SIZE + n)) == 0)
      r = send_frame(s, MSG_BLOB, piece, (uint32_t)(BLOB_HEADER_SIZE + n), false, 0, 0, 0);
    if (len == 0)
      break;
  }
  free(piece);
  if (r == 0) {
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH64(buf, len, 0));
    r = ctrl_ok(s, json_pack("{s:s, s:I, s:s}", "op", "vm_state", "size", (json_int_t)len,
                             "xxh64", hex), REPLY_TIMEOUT_MS, NULL, why, whylen);
  }
  free(buf);
  return r;
}

static json_t *vm_spec_json(const struct vm_spec *v) { return vm_spec_to_json(v); }

/* ---- qemu live: RAM over the tunnel, paused before the switch-over ---- */

#define RAM_MIGRATION_TIMEOUT_NS (600ull * 1000000000)
#define SWITCHOVER_TIMEOUT_NS (120ull * 1000000000)
#define INCOMING_TIMEOUT_MS 120000

static void tunnel_sock_path(struct src *s, char *buf, size_t len)
{
  fmt_into(buf, len, "%s/run/%s.out", s->sh->data_dir, s->m->id);
}

/* Undoes a RAM migration that did not reach the switch-over: QEMU's
 * migration is cancelled (the guest runs on here), the destination's QEMU
 * is discarded. */
static void abort_ram_migration(struct src *s)
{
  struct migration *m = s->m;
  char err[512];
  json_t *info = NULL;
  if (vm_migrate_out_status(s->sh->vms, m->vm, &info, err, sizeof err) == 0) {
    const char *st = json_string_value(json_object_get(info, "status"));
    if (st && strcmp(st, "none") != 0 && strcmp(st, "completed") != 0 &&
        strcmp(st, "failed") != 0 && strcmp(st, "cancelled") != 0 &&
        vm_migrate_out_cancel(s->sh->vms, m->vm, err, sizeof err) < 0)
      log_error(m->vm, "migration %s: cannot cancel QEMU's migration: %s", m->id, err);
  }
  json_decref(info);
  tunnel_close(s->tunnel);
  s->tunnel = NULL;
  if (s->incoming_prepared && link_ok(m)) {
    if (ctrl_ok(s, json_pack("{s:s}", "op", "discard_incoming"), REPLY_TIMEOUT_MS, NULL, err,
                sizeof err) < 0)
      log_warn(m->vm, "migration %s: the destination kept its incoming VM: %s", m->id, err);
    else
      s->incoming_prepared = false;
  }
}

/* Starts the RAM migration and waits for QEMU's pre-switchover: the guest
 * is stopped and its disks flushed here, nothing has switched.  Meanwhile the
 * disks' foreground copy goes on.  0, or <0 with why (-ECONNRESET: link). */
static int ram_precopy(struct src *s, char *why, size_t whylen)
{
  struct migration *m = s->m;
  set_phase(m, "ram");
  json_t *reply = NULL;
  int r = ctrl_ok(s, json_pack("{s:s, s:o}", "op", "prepare_incoming", "vm",
                               vm_spec_json(&m->vmspec)), INCOMING_TIMEOUT_MS, &reply, why,
                  whylen);
  json_decref(reply);
  if (r < 0)
    return r;
  s->incoming_prepared = true;
  char path[PATH_MAX], uri[PATH_MAX + 8];
  tunnel_sock_path(s, path, sizeof path);
  if (!(s->tunnel = tunnel_source_open(m, path, why, whylen)))
    return -EIO;
  snprintf(uri, sizeof uri, "unix:%s", path);
  if ((r = vm_migrate_out_start(s->sh->vms, m->vm, uri, why, whylen)) < 0)
    return r;
  log_info(m->vm, "migration %s: RAM migration started through the site link", m->id);
  uint64_t t0 = now_ns(), last_log = t0;
  for (;;) {
    json_t *info = NULL;
    if ((r = vm_migrate_out_status(s->sh->vms, m->vm, &info, why, whylen)) < 0)
      return r;
    const char *st = json_string_value(json_object_get(info, "status"));
    char state[32];
    snprintf(state, sizeof state, "%s", st ? st : "?");
    json_t *ram = json_object_get(info, "ram");
    uint64_t sent = (uint64_t)json_integer_value(json_object_get(ram, "transferred"));
    uint64_t left = (uint64_t)json_integer_value(json_object_get(ram, "remaining"));
    s->stopped_at_ns = (uint64_t)json_integer_value(json_object_get(info, "stopped_at_ns"));
    const char *qerr = json_string_value(json_object_get(info, "error"));
    if (strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0) {
      char terr[256] = "";
      if (s->tunnel)
        tunnel_failed(s->tunnel, terr, sizeof terr);
      snprintf(why, whylen, "QEMU's RAM migration %s%s%s%s%s", state, qerr ? ": " : "",
               qerr ? qerr : "", terr[0] ? "; tunnel: " : "", terr);
      json_decref(info);
      return -EIO;
    }
    json_decref(info);
    pthread_mutex_lock(&m->lock);
    m->prog.ram_bytes_sent = sent;
    m->prog.ram_bytes_left = left;
    pthread_mutex_unlock(&m->lock);
    if (strcmp(state, "pre-switchover") == 0)
      return 0;
    char terr[256];
    if (tunnel_failed(s->tunnel, terr, sizeof terr)) {
      snprintf(why, whylen, "the RAM tunnel failed: %s", terr);
      return -EIO;
    }
    if (now_ns() - t0 > RAM_MIGRATION_TIMEOUT_NS) {
      snprintf(why, whylen, "QEMU's RAM migration did not reach its switch-over in %llu s",
               (unsigned long long)(RAM_MIGRATION_TIMEOUT_NS / 1000000000));
      return -ETIMEDOUT;
    }
    if (should_leave(m)) {
      snprintf(why, whylen, "the migration was cancelled or ferryd is stopping");
      return -ECANCELED;
    }
    if (!link_ok(m)) {
      snprintf(why, whylen, "the site link failed during the RAM migration");
      return -ECONNRESET;
    }
    if (now_ns() - last_log > 5000000000ull) {
      char b1[32], b2[32];
      format_size(sent, b1, sizeof b1);
      format_size(left, b2, sizeof b2);
      log_info(m->vm, "migration %s: RAM %s sent, %s left (%s)", m->id, b1, b2, state);
      last_log = now_ns();
    }
    /* The guest still writes its disks: keep them in step. */
    uint64_t until = now_ns() + 50000000ull;
    if (now_ns() - s->last_fg_ns >= FG_PASS_NS) {
      if ((r = fg_pass(s, false)) < 0)
        return r;
      s->last_fg_ns = now_ns();
    }
    while (now_ns() < until && (r = fg_step(s)) == 1)
      ;
    if (r < 0 && r != -ECANCELED)
      return r;
    if (now_ns() < until) {
      pthread_mutex_lock(&m->lock);
      cond_wait_ms(m, (unsigned)((until - now_ns()) / 1000000) + 1);
      pthread_mutex_unlock(&m->lock);
    }
  }
}

/* The destination's waiting QEMU: does the guest run there yet? */
static int ask_incoming(struct src *s, bool *running, bool *exited, uint64_t *resumed_ns,
                        char *why, size_t whylen)
{
  json_t *reply = NULL;
  int r = ctrl_ok(s, json_pack("{s:s}", "op", "incoming_status"), REPLY_TIMEOUT_MS, &reply, why,
                  whylen);
  *running = json_is_true(json_object_get(reply, "running"));
  *exited = json_is_true(json_object_get(reply, "exited"));
  *resumed_ns = (uint64_t)json_integer_value(json_object_get(reply, "resumed_at_ns"));
  json_decref(reply);
  return r;
}

/* After the point of no return: QEMU sends the rest of the device state,
 * the destination guest runs.  0 done; 1 the switch-over failed before the
 * destination guest ran (everything is taken back here); <0 link. */
static int ram_switchover(struct src *s)
{
  struct migration *m = s->m;
  char why[512];
  set_phase(m, "switchover");
  if (vm_migrate_out_continue(s->sh->vms, m->vm, why, sizeof why) < 0)
    goto rollback;
  uint64_t t0 = now_ns();
  for (;;) {
    json_t *info = NULL;
    if (vm_migrate_out_status(s->sh->vms, m->vm, &info, why, sizeof why) < 0)
      goto rollback;
    const char *st = json_string_value(json_object_get(info, "status"));
    bool done = st && strcmp(st, "completed") == 0;
    bool failed = !st || strcmp(st, "failed") == 0 || strcmp(st, "cancelled") == 0;
    if (failed) {
      const char *qerr = json_string_value(json_object_get(info, "error"));
      snprintf(why, sizeof why, "QEMU's switch-over %s%s%s", st ? st : "failed",
               qerr ? ": " : "", qerr ? qerr : "");
    }
    json_decref(info);
    if (done)
      break;
    if (failed)
      goto rollback;
    if (now_ns() - t0 > SWITCHOVER_TIMEOUT_NS) {
      snprintf(why, sizeof why, "QEMU's switch-over did not complete in %llu s",
               (unsigned long long)(SWITCHOVER_TIMEOUT_NS / 1000000000));
      goto rollback;
    }
    usleep(5000);
  }
  /* The destination's guest runs once it has loaded the last state. */
  uint64_t resumed = 0;
  for (;;) {
    bool running, exited;
    int r = ask_incoming(s, &running, &exited, &resumed, why, sizeof why);
    if (r == -ECONNRESET)
      return r;
    if (running)
      break;
    if (r < 0 || exited || now_ns() - t0 > SWITCHOVER_TIMEOUT_NS) {
      log_error(m->vm, "migration %s: the destination's QEMU did not start the guest (%s); "
                "its disks are authoritative there", m->id, r < 0 ? why : exited ? "it exited"
                : "timed out");
      pthread_mutex_lock(&m->lock);
      fmt_into(m->error, sizeof m->error, "the destination's QEMU did not start the guest "
               "after the switch-over; the disks are authoritative at site '%s': start the VM "
               "there (ferry vm start %s)", m->peer, m->vm);
      pthread_mutex_unlock(&m->lock);
      return 1;
    }
    usleep(20000);
  }
  tunnel_close(s->tunnel);
  s->tunnel = NULL;
  uint64_t downtime = resumed > s->stopped_at_ns && s->stopped_at_ns
                      ? (resumed - s->stopped_at_ns) / 1000000 : 0;
  pthread_mutex_lock(&m->lock);
  m->prog.downtime_ms = downtime;
  pthread_mutex_unlock(&m->lock);
  log_info(m->vm, "migration %s: the VM runs at site '%s'; downtime %llu ms (QEMU STOP to "
           "RESUME)", m->id, m->peer, (unsigned long long)downtime);
  if (vm_mark_migrated(s->sh->vms, m->vm, m->peer, why, sizeof why) < 0)
    log_warn(m->vm, "migration %s: %s", m->id, why);
  ctrl_ok(s, json_pack("{s:s, s:I}", "op", "complete", "downtime_ms", (json_int_t)downtime),
          REPLY_TIMEOUT_MS, NULL, why, sizeof why);
  return 0;

rollback:
  /* QEMU did not hand over: the destination's guest never ran.  It gives
   * the disks back (fenced again) and this site takes authority back. */
  log_error(m->vm, "migration %s: %s; taking the VM back", m->id, why);
  {
    char e2[512];
    int r = ctrl_ok(s, json_pack("{s:s}", "op", "discard_incoming"), REPLY_TIMEOUT_MS, NULL, e2,
                    sizeof e2);
    if (r < 0) {
      pthread_mutex_lock(&m->lock);
      fmt_into(m->error, sizeof m->error, "%s; and the destination could not give the disks "
               "back (%s): the VM is paused here, its disks fenced", why, e2);
      pthread_mutex_unlock(&m->lock);
      return r == -ECONNRESET ? r : 1;
    }
    s->incoming_prepared = false;
    for (unsigned di = 0; di < m->ndisks; di++)
      registry_set_fence(s->sh->reg, m->disks[di].name, NULL, e2, sizeof e2);
    json_t *info = NULL;
    if (vm_migrate_out_status(s->sh->vms, m->vm, &info, e2, sizeof e2) == 0) {
      const char *st = json_string_value(json_object_get(info, "status"));
      if (st && strcmp(st, "failed") != 0 && strcmp(st, "cancelled") != 0)
        vm_migrate_out_cancel(s->sh->vms, m->vm, e2, sizeof e2);
    }
    json_decref(info);
    tunnel_close(s->tunnel);
    s->tunnel = NULL;
    char st[16];
    vm_state(s->sh->vms, m->vm, st, sizeof st);
    if (strcmp(st, "paused") == 0)
      vm_migration_resume(s->sh->vms, m->vm, e2, sizeof e2);
    pthread_mutex_lock(&m->lock);
    fmt_into(m->error, sizeof m->error, "%s; the VM runs here", why);
    pthread_mutex_unlock(&m->lock);
  }
  return 1;
}

/* Runs the cutover up to the point of no return.  0: committed (state
 * committing); 1: aborted, the VM runs here; <0: link lost (aborted too). */
static int cutover(struct src *s)
{
  struct migration *m = s->m;
  char why[512], b1[32];
  pthread_mutex_lock(&m->lock);
  m->prog.cutover_attempts++;
  pthread_mutex_unlock(&m->lock);
  mig_set_state(m, "cutover", NULL);
  set_phase(m, "cutover");
  uint64_t t0 = now_ns();
  pthread_mutex_lock(&m->lock);
  m->prog.cutover_started_ns = realtime_ns();
  pthread_mutex_unlock(&m->lock);
  if (is_cold(m)) {
    /* Powered down when the migration started: nothing to pause. */
  } else if (is_qemu(m)) {
    int rr = ram_precopy(s, why, sizeof why);
    if (rr < 0) {
      abort_cutover(s, why);
      return rr == -ECONNRESET ? rr : 1;
    }
    t0 = now_ns();
  } else if (vm_migration_pause(s->sh->vms, m->vm, why, sizeof why) < 0) {
    abort_cutover(s, why);
    return 1;
  }
  uint64_t t_paused = now_ns();
  s->fixed_s = (double)(t_paused - t0) / 1e9;
  char reason[128];
  snprintf(reason, sizeof reason, "cutover of migration %s in progress", m->id);
  fence_sources(s, reason);

  /* The last dirty regions. */
  pthread_mutex_lock(&m->lock);
  uint64_t before = m->prog.data_bytes_sent + m->prog.zero_bytes_sent;
  pthread_mutex_unlock(&m->lock);
  int r = fg_pass(s, false);
  if (r == 0)
    r = drain(s);
  if (r == 0)
    r = flush_remote(s);
  uint64_t t_drained = now_ns();
  if (r < 0) {
    abort_cutover(s, r == -ECONNRESET ? "the site link failed during the final drain"
                                      : "the final drain failed");
    return r == -ECONNRESET ? r : 1;
  }
  pthread_mutex_lock(&m->lock);
  m->prog.final_drain_bytes = m->prog.data_bytes_sent + m->prog.zero_bytes_sent - before;
  pthread_mutex_unlock(&m->lock);

  /* Destination equals source: checked, not assumed. */
  if (m->verify_full)
    for (unsigned di = 0; di < m->ndisks; di++)
      bitmap_clear_all(&m->disks[di].verified);
  uint64_t checked = 0;
  uint64_t *vlist = malloc(HASH_BATCH * sizeof *vlist);
  if (!vlist) {
    abort_cutover(s, "out of memory");
    return 1;
  }
  for (unsigned round = 0;; round++) {
    uint64_t diff = 0;
    for (unsigned di = 0; r == 0 && di < m->ndisks; di++) {
      struct mig_disk *md = &m->disks[di];
      /* Scattered regions go HASH_BATCH to a request: a round trip each
       * batch, not each region. */
      for (uint64_t from = 0; r == 0 && from < md->nregions;) {
        uint64_t n = collect_unverified(md, from, vlist, HASH_BATCH, &from);
        if (n == 0)
          break;
        r = compare_regions(s, di, vlist, 0, n, 2, &diff);
        checked += n;
      }
    }
    if (r < 0)
      break;
    if (diff == 0)
      break;
    log_warn(m->vm, "migration %s: cutover verify: %llu region(s) differ; sending them again",
             m->id, (unsigned long long)diff);
    if (round + 1 >= CUTOVER_VERIFY_ROUNDS) {
      r = -EILSEQ;
      break;
    }
    if ((r = drain(s)) == 0)
      r = flush_remote(s);
    if (r < 0)
      break;
  }
  free(vlist);
  uint64_t t_verified = now_ns();
  pthread_mutex_lock(&m->lock);
  m->prog.verify_regions_at_cutover = checked;
  pthread_mutex_unlock(&m->lock);
  if (r < 0) {
    abort_cutover(s, r == -EILSEQ ? "the destination still differs after repeated sends"
                     : r == -ECONNRESET ? "the site link failed during the verify"
                                        : "the verify failed");
    return r == -ECONNRESET ? r : 1;
  }

  /* The VM's state (a live qemu VM's goes by QEMU's migration). */
  if ((!is_qemu(m) || is_cold(m)) && (r = send_vm_state(s, why, sizeof why)) < 0) {
    abort_cutover(s, r == -ECONNRESET ? "the site link failed sending the VM state" : why);
    return r == -ECONNRESET ? r : 1;
  }
  uint64_t t_state = now_ns();

  /* Point of no return: this site gives up authority, durably, first. */
  snprintf(reason, sizeof reason, "migrated to site %s by migration %s", m->peer, m->id);
  for (unsigned di = 0; di < m->ndisks; di++) {
    if (registry_set_fence(s->sh->reg, m->disks[di].name, reason, why, sizeof why) < 0) {
      for (unsigned k = 0; k <= di; k++)
        registry_set_fence(s->sh->reg, m->disks[k].name, NULL, why, sizeof why);
      abort_cutover(s, "cannot persist the fence of the source disks");
      return 1;
    }
  }
  pthread_mutex_lock(&m->lock);
  m->prog.downtime_ms = 0;
  pthread_mutex_unlock(&m->lock);
  mig_set_state(m, "committing", NULL);
  format_size(m->prog.final_drain_bytes, b1, sizeof b1);
  log_info(m->vm, "migration %s: cutover: paused in %.0f ms, drained %s in %.0f ms, verified "
           "%llu regions in %.0f ms, state in %.0f ms", m->id, (t_paused - t0) / 1e6, b1,
           (t_drained - t_paused) / 1e6, (unsigned long long)checked,
           (t_verified - t_drained) / 1e6, (t_state - t_verified) / 1e6);
  return 0;
}

/* After the point of no return: ask the destination to run the VM.
 * 0 done; 1 refused (the VM is taken back here, migration failed); <0 link. */
static int activate(struct src *s)
{
  struct migration *m = s->m;
  char why[512];
  set_phase(m, "activating");
  bool ram = is_qemu(m) && !is_cold(m);
  if (ram && !s->tunnel) {
    /* ferryd restarted after the point of no return: the switch-over either
     * happened or cannot be resumed (QEMU's migration died with the tunnel). */
    bool running, exited;
    uint64_t resumed;
    int r = ask_incoming(s, &running, &exited, &resumed, why, sizeof why);
    if (r == -ECONNRESET)
      return r;
    if (!running) {
      pthread_mutex_lock(&m->lock);
      fmt_into(m->error, sizeof m->error, "ferryd stopped during the switch-over of the RAM "
               "migration; the disks are authoritative at site '%s': start the VM there "
               "(ferry vm start %s)", m->peer, m->vm);
      pthread_mutex_unlock(&m->lock);
      return 1;
    }
    if (vm_mark_migrated(s->sh->vms, m->vm, m->peer, why, sizeof why) < 0)
      log_warn(m->vm, "migration %s: %s", m->id, why);
    ctrl_ok(s, json_pack("{s:s}", "op", "complete"), REPLY_TIMEOUT_MS, NULL, why, sizeof why);
    return 0;
  }
  json_t *req = json_pack("{s:s, s:o, s:b}", "op", "activate", "vm", vm_spec_json(&m->vmspec),
                          "incoming", ram);
  uint64_t t0 = now_ns();
  int r = ctrl_ok(s, req, ACTIVATE_TIMEOUT_MS, NULL, why, sizeof why);
  s->fixed_s += (double)(now_ns() - t0) / 1e9;
  if (r == -EREMOTEIO) {
    /* The destination stayed fenced: take the VM back. */
    log_error(m->vm, "migration %s: the destination could not start the VM: %s", m->id, why);
    for (unsigned di = 0; di < m->ndisks; di++) {
      char e2[256];
      registry_set_fence(s->sh->reg, m->disks[di].name, NULL, e2, sizeof e2);
    }
    char e3[256];
    if (ram)
      abort_ram_migration(s);
    else if (!is_cold(m))
      vm_migration_resume(s->sh->vms, m->vm, e3, sizeof e3);
    char msg[600];
    snprintf(msg, sizeof msg, "the destination could not start the VM: %s; it runs here", why);
    pthread_mutex_lock(&m->lock);
    fmt_into(m->error, sizeof m->error, "%s", msg);
    pthread_mutex_unlock(&m->lock);
    return 1;
  }
  if (r < 0)
    return r;
  if (ram)
    return ram_switchover(s);
  pthread_mutex_lock(&m->lock);
  uint64_t started = m->prog.cutover_started_ns;
  pthread_mutex_unlock(&m->lock);
  uint64_t downtime = started ? (realtime_ns() - started) / 1000000 : 0;
  pthread_mutex_lock(&m->lock);
  m->prog.downtime_ms = downtime;
  pthread_mutex_unlock(&m->lock);
  log_info(m->vm, "migration %s: the VM runs at site '%s'; downtime %llu ms", m->id, m->peer,
           (unsigned long long)downtime);
  if (vm_mark_migrated(s->sh->vms, m->vm, m->peer, why, sizeof why) < 0)
    log_warn(m->vm, "migration %s: %s", m->id, why);
  /* Best effort: the destination learns the figures for its own record. */
  ctrl_ok(s, json_pack("{s:s, s:I}", "op", "complete", "downtime_ms", (json_int_t)downtime),
          REPLY_TIMEOUT_MS, NULL, why, sizeof why);
  return 0;
}

/* ---- cancel and failure ---- */

/* Removes what the destination built, if it can be reached soon. */
static bool abort_remote(struct src *s, const char *reason)
{
  struct migration *m = s->m;
  pthread_mutex_lock(&m->lock);
  m->cancel = false;                     /* let the calls below run */
  pthread_mutex_unlock(&m->lock);
  for (int attempt = 0; attempt < 3; attempt++) {
    if (!link_ok(m)) {
      disconnect(s);
      if (connect_session(s) < 0)
        continue;
    }
    char why[256];
    int r = ctrl_ok(s, json_pack("{s:s, s:s}", "op", "abort", "reason", reason), 15000, NULL,
                    why, sizeof why);
    if (r == 0)
      return true;
    if (r == -EREMOTEIO) {
      log_warn(m->vm, "migration %s: the destination would not abort: %s", m->id, why);
      return false;
    }
  }
  return false;
}

static void finish(struct src *s, const char *state, const char *error, bool clean_remote,
                   bool resume_vm)
{
  struct migration *m = s->m;
  char err[256];
  set_backpressure(s, 0);
  if (s->tunnel || s->incoming_prepared)
    abort_ram_migration(s);
  if (resume_vm && is_cold(m)) {
    fence_sources(s, NULL);          /* powered down here, startable here */
  } else if (resume_vm) {
    fence_sources(s, NULL);
    char st[16];
    vm_state(s->sh->vms, m->vm, st, sizeof st);
    if (strcmp(st, "paused") == 0 && vm_migration_resume(s->sh->vms, m->vm, err, sizeof err) < 0)
      log_error(m->vm, "migration %s: cannot resume the VM: %s", m->id, err);
  }
  char msg[700];
  snprintf(msg, sizeof msg, "%s", error ? error : "");
  if (clean_remote && !abort_remote(s, error ? error : state)) {
    snprintf(msg, sizeof msg, "%s%sthe destination could not be cleaned up: cancel migration "
             "%s there (ferry --api DEST migration cancel %s)", error ? error : "",
             error ? "; " : "", m->id, m->id);
  }
  disconnect(s);
  for (unsigned di = 0; di < m->ndisks; di++)
    disk_set_cbt_owner(m->disks[di].d, NULL);
  vm_release(s->sh->vms, m->vm, m->id);
  set_phase(m, state);
  mig_set_state(m, state, msg[0] ? msg : NULL);
}

/* ---- setup ---- */

static int setup(struct src *s, char *err, size_t errlen)
{
  struct migration *m = s->m;
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  bool resuming = strcmp(m->state, "starting") != 0;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    if (!md->d)
      md->d = registry_get(s->sh->reg, md->name);
    if (!md->d) {
      snprintf(err, errlen, "disk '%s' is gone", md->name);
      return -ENOENT;
    }
    if (disk_size(md->d) != md->size || disk_cbt_granularity(md->d) != md->gran) {
      snprintf(err, errlen, "disk '%s' changed size or granularity during the migration",
               md->name);
      return -EINVAL;
    }
    if (md->gran > CHUNK_BYTES) {
      snprintf(err, errlen, "disk '%s': a dirty-map granularity above %u KiB is not supported "
               "for migration", md->name, CHUNK_BYTES / 1024);
      return -EINVAL;
    }
    if (fmt_into(md->pending_path, sizeof md->pending_path, "%s/%s.pending", dir, md->name) < 0) {
      snprintf(err, errlen, "the data directory path is too long");
      return -ENAMETOOLONG;
    }
    if ((!md->pending.words && bitmap_init(&md->pending, md->nregions) < 0) ||
        (!md->verified.words && bitmap_init(&md->verified, md->nregions) < 0) ||
        bitmap_init(&s->suspect[di], md->nregions) < 0 ||
        bitmap_init(&s->scratch[di], md->nregions) < 0) {
      snprintf(err, errlen, "out of memory");
      return -ENOMEM;
    }
    disk_set_cbt_owner(md->d, m->id);
    measure_allocation(md);
    if (!resuming) {
      /* The background copy covers everything written so far. */
      disk_dirty_swap_fast(md->d, &s->scratch[di], NULL);
      if (pending_write(m, md, &md->pending) < 0) {
        snprintf(err, errlen, "cannot write %s", md->pending_path);
        return -EIO;
      }
    } else {
      int r = pending_read(md, &s->suspect[di]);
      if (r < 0) {
        log_warn(md->name, "migration %s: %s %s: every region already sent is checked "
                 "against the destination", m->id, md->pending_path,
                 r == -ENOENT ? "is missing" : "is damaged");
        bitmap_set_all(&s->suspect[di]);
      }
    }
  }
  if (!resuming) {
    uint64_t total = 0;
    for (unsigned di = 0; di < m->ndisks; di++)
      total += alloc_left(&m->disks[di]);
    pthread_mutex_lock(&m->lock);
    m->prog.bytes_total = m->prog.bytes_left = total;
    pthread_mutex_unlock(&m->lock);
  }
  s->after_restart = resuming;
  return 0;
}

/* What a restart finds: a cutover that did not reach its point of no return
 * is undone (the VM was paused here, it resumes). */
static void recover_state(struct src *s)
{
  struct migration *m = s->m;
  char err[256];
  if (strcmp(m->state, "cutover") == 0) {
    char st[16];
    vm_state(s->sh->vms, m->vm, st, sizeof st);
    if (strcmp(st, "paused") == 0)
      vm_migration_resume(s->sh->vms, m->vm, err, sizeof err);
    log_warn(m->vm, "migration %s: ferryd stopped during a cutover; the VM runs here and the "
             "migration goes on", m->id);
    mig_set_state(m, "replicating", NULL);
  }
}

void *source_main(void *arg)
{
  struct migration *m = arg;
  struct src *s = calloc(1, sizeof *s);
  char err[512];
  if (!s) {
    mig_set_state(m, "failed", "out of memory");
    return NULL;
  }
  s->m = m;
  s->sh = mig_shared(m);
  s->level = 1;
  s->buf = malloc(DATA_HEADER_SIZE + CHUNK_BYTES);
  if (!s->buf) {
    mig_set_state(m, "failed", "out of memory");
    free(s);
    return NULL;
  }
  if (vm_claim(s->sh->vms, m->vm, m->id, err, sizeof err) < 0 || setup(s, err, sizeof err) < 0) {
    if (strcmp(m->state, "committing") != 0) {
      finish(s, "failed", err, false, false);
      goto out;
    }
  }
  recover_state(s);
  bool committing = strcmp(m->state, "committing") == 0;
  if (is_cold(m) && !committing) {
    /* Cold: the VM is powered down first (orderly, forced after the
     * driver's timeout), so the copy is of disks nobody writes. */
    char st[16];
    vm_state(s->sh->vms, m->vm, st, sizeof st);
    if (strcmp(st, "stopped") != 0) {
      set_phase(m, "powering down");
      log_info(m->vm, "migration %s: cold: powering the VM down", m->id);
      if (vm_migration_stop(s->sh->vms, m->vm, err, sizeof err) < 0) {
        char e[600];
        snprintf(e, sizeof e, "cannot power the VM down: %s", err);
        finish(s, "failed", e, true, false);
        goto out;
      }
    }
  }
  if (!committing) {
    mig_set_state(m, "replicating", NULL);
    set_phase(m, "background");
  }
  s->last_fg_ns = s->last_rewrite_ns = now_ns();

  for (;;) {
    pthread_mutex_lock(&m->lock);
    bool stop = m->stop, cancel = m->cancel;
    bool dead = m->conn && m->conn_dead;
    bool refused = m->remote_fatal;
    pthread_mutex_unlock(&m->lock);
    if (stop)
      break;
    if (cancel && !committing) {
      finish(s, "cancelled", "cancelled by the operator", true, true);
      goto out;
    }
    if (refused && !committing) {
      char e[512];
      snprintf(e, sizeof e, "%s", m->error);
      finish(s, "failed", e, false, true);
      goto out;
    }
    if (dead)
      disconnect(s);
    if (!link_ok(m)) {
      int r = connect_session(s);
      if (r == -EPERM || r == -ENOENT) {
        if (committing) {
          /* Nothing to do but keep asking: the disks here are fenced. */
        } else {
          char e[512];
          snprintf(e, sizeof e, "%s", m->error);
          finish(s, "failed", e, false, true);
          goto out;
        }
      }
      if (r < 0) {
        s->backoff_ms = s->backoff_ms ? MIN(s->backoff_ms * 2, 2000) : 200;
        pthread_mutex_lock(&m->lock);
        if (!m->stop && !m->cancel)
          cond_wait_ms(m, (unsigned)s->backoff_ms);
        pthread_mutex_unlock(&m->lock);
        if (now_ns() - s->last_tick_ns >= TICK_NS) {
          tick(s);
          mig_persist(m);
        }
        continue;
      }
    }

    if (committing) {
      int r = activate(s);
      if (r == 0) {
        finish(s, "completed", NULL, false, false);
        goto out;
      }
      if (r == 1) {
        char e[600];
        snprintf(e, sizeof e, "%s", m->error);
        finish(s, "failed", e, true, false);
        goto out;
      }
      continue;                 /* link lost: reconnect and ask again */
    }

    uint64_t now = now_ns();
    int r = 0;
    if ((now - s->last_fg_ns >= FG_PASS_NS && !pending_behind(s)) ||
        now - s->last_fg_ns >= FG_ROUND_MAX_NS) {
      bool full = now - s->last_rewrite_ns >= REWRITE_NS;
      if ((r = fg_pass(s, full)) < 0) {
        snprintf(err, sizeof err, "cannot take the dirty map: %s", strerror(-r));
        finish(s, "failed", err, true, true);
        goto out;
      }
      s->last_fg_ns = now;
    }
    bool did = false;
    /* Foreground and background share the link: one step of each. */
    if (r == 0 && (r = suspect_step(s)) > 0) {
      did = true;
      r = 0;
    }
    if (r == 0 && (r = fg_step(s)) > 0) {
      did = true;
      r = 0;
    }
    if (r == 0 && !s->bg_done) {
      r = bg_step(s);
      did = r == 0;
      if (s->bg_done) {
        log_info(m->vm, "migration %s: background copy done; verifying", m->id);
        set_phase(m, "foreground");
      }
    } else if (r == 0 && s->bg_done && !s->sweep_done) {
      r = sweep_step(s);
      did = r > 0;
      if (r > 0)
        r = 0;
      if (s->sweep_done) {
        log_info(m->vm, "migration %s: verify sweep done", m->id);
        set_phase(m, "converging");
      }
    }
    if (r == -EIO || r == -EPROTO) {
      char e[600];
      snprintf(e, sizeof e, "%s", m->error[0] ? m->error : "replication failed");
      finish(s, "failed", e, true, true);
      goto out;
    }
    if (r == -ECANCELED || r == -ECONNRESET)
      continue;

    now = now_ns();
    if (now - s->last_ping_ns >= PING_NS && link_ok(m)) {
      uint8_t b[8];
      proto_u64_encode(now, b);
      send_frame(s, MSG_PING, b, 8, false, 0, 0, 0);
      s->last_ping_ns = now;
    }
    if (now - s->last_tick_ns >= TICK_NS) {
      bool ready = tick(s);
      mig_persist(m);
      if (ready) {
        int c = cutover(s);
        if (c == 0) {
          committing = true;
          continue;
        }
      }
    }
    if (!did && s->sweep_done && link_ok(m) && !pending_behind(s)) {
      /* The link is idle: check again what was sent since the sweep.  That
       * is idle time too, as far as the capacity estimate goes (tick). */
      uint64_t t_rv = now_ns();
      r = reverify_step(s);
      s->idle_ns += now_ns() - t_rv;
      if (r > 0) {
        did = true;
      } else if (r == -EIO || r == -EPROTO) {
        char e[600];
        snprintf(e, sizeof e, "%s", m->error[0] ? m->error : "verify failed");
        finish(s, "failed", e, true, true);
        goto out;
      }
    }
    if (!did) {
      /* Nothing to send: wait for the next pass. */
      pthread_mutex_lock(&m->lock);
      uint64_t t_idle = now_ns();
      if (!m->stop && !m->cancel && !m->conn_dead && !m->nack_from)
        cond_wait_ms(m, 50);
      s->idle_ns += now_ns() - t_idle;
      uint64_t nack = m->nack_from;
      m->nack_from = 0;
      pthread_mutex_unlock(&m->lock);
      if (nack)
        resend_from(s, nack);
    }
  }

  /* ferryd stops: everything needed to go on is on disk, before the disks
   * close and their map files forget the bits swapped out (cbt.h). */
  if (!committing)
    fg_pass(s, false);
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    if (md->d && md->pending.words) {
      pthread_mutex_lock(&m->lock);
      pending_with_inflight_locked(m, di, &s->scratch[di]);
      pthread_mutex_unlock(&m->lock);
      /* Suspects not yet checked stay suspects after the restart too. */
      for (uint64_t i = 0; i < s->scratch[di].nwords; i++)
        atomic_fetch_or(&s->scratch[di].words[i],
                        atomic_load(&s->suspect[di].words[i]));
      pending_write(m, md, &s->scratch[di]);
    }
  }
  set_backpressure(s, 0);
  disconnect(s);
  mig_persist(m);
  for (unsigned di = 0; di < m->ndisks; di++)
    if (m->disks[di].d)
      disk_set_cbt_owner(m->disks[di].d, NULL);
out:
  for (unsigned di = 0; di < PROTO_MAX_DISKS; di++) {
    bitmap_free(&s->suspect[di]);
    bitmap_free(&s->scratch[di]);
  }
  free(s->hashbuf);
  free(s->buf);
  free(s);
  return NULL;
}
