/* warm_source: the source of a warm migration (docs/migration.md, "Warm
 * migration"; the protocol in docs/protocol.md).
 *
 * DESIGN
 * Compute moves first, data follows.  The driver thread:
 *   1. opens a warm session (WARM_HELLO); the destination creates its disks
 *      as empty cloud caches, fenced;
 *   2. sends each disk's holes (regions the source does not hold: the
 *      destination never fetches them) and, with prefetch "hot", its hottest
 *      regions by the heat map (the destination hydrates them first);
 *   3. pauses the VM, takes the restore point (snapshots.c), fences the
 *      disks here, sends the VM's state and asks the destination to start
 *      the VM from it against the caches: seconds, whatever the disks' size;
 *   4. serves: every WARM_FETCH is read from the (fenced) disks and answered
 *      with WARM_FILL; every RPO point arrives as a journal (WARM_WB, then
 *      WARM_REQ wb_end), is stored, checked whole and applied by the applier
 *      thread (the disks then hold exactly that point; a crash while
 *      applying applies it again at the next start), and answered;
 *   5. ends on the operator's word: commit (the destination holds every
 *      region: it becomes the only copy, the images here go back to the
 *      restore point and are kept as it), back (the destination pauses the
 *      VM and ships its last point; the VM starts here from that point's
 *      state: nothing written is lost), back-rpo (the destination is gone:
 *      the VM starts here from the last point applied, what was written
 *      since is lost, by design).
 * A lost link is dialled again with backoff; a link down for longer than
 * degraded_after_s makes the migration report itself degraded.
 *
 * Threads: the driver (this file's loop, one per migration) and, while a
 * point is applied, the applier; m->lock guards the figures and the
 * operator's request (internal.h).
 */
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "cache/journal.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/heat.h"
#include "disk/registry.h"
#include "link/frame.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/snapshots.h"
#include "site/site.h"
#include "vm/vm.h"

#define CONNECT_TIMEOUT_MS 10000
#define SEND_TIMEOUT_MS 30000
#define REPLY_TIMEOUT_NS (60ull * 1000000000)
#define PING_NS (2ull * 1000000000)
#define BLOB_PIECE (FRAME_MAX_RAW - BLOB_HEADER_SIZE)
#define HOT_MAX_REGIONS 65536

struct warm_src {
  struct migration *m;
  const struct migrations_shared *sh;
  struct link_conn *conn;          /* also m->conn, for shutdown by others */
  uint64_t next_req;
  uint8_t *buf;                    /* FILL header + WARM_MAX_FETCH regions */
  size_t buflen;
  uint64_t backoff_ms, last_ping_ns, down_since_ns, started_ns;

  /* the journal being received */
  uint64_t wb_point, wb_have;
  int wb_fd;

  /* the applier */
  pthread_t applier;
  bool applying;
  _Atomic bool applied;            /* set by the applier when done */
  uint64_t apply_point, apply_req;
  int apply_result;
  char apply_err[256];

  bool recovering;                 /* the VM runs here again: serve nothing, fence there */

  /* the holes sent before the pause (fixed up after it) */
  struct bitmap holes[PROTO_MAX_DISKS];

  /* the operator's request under way */
  char cmd[16];
  uint64_t cmd_req;
  uint64_t cmd_sent_ns;
};

static bool should_stop(struct migration *m)
{
  pthread_mutex_lock(&m->lock);
  bool s = m->stop;
  pthread_mutex_unlock(&m->lock);
  return s;
}

static void set_phase(struct migration *m, const char *phase)
{
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.phase, sizeof m->prog.phase, "%s", phase);
  pthread_mutex_unlock(&m->lock);
}

static void wp_set(struct migration *m, const char *key, json_t *v)
{
  pthread_mutex_lock(&m->lock);
  if (!m->warm_prog)
    m->warm_prog = json_object();
  json_object_set_new(m->warm_prog, key, v);
  pthread_mutex_unlock(&m->lock);
}

static uint64_t wp_u64(struct migration *m, const char *key)
{
  pthread_mutex_lock(&m->lock);
  uint64_t v = m->warm_prog ? (uint64_t)json_integer_value(json_object_get(m->warm_prog, key)) : 0;
  pthread_mutex_unlock(&m->lock);
  return v;
}

static void wp_add(struct migration *m, const char *key, uint64_t n)
{
  wp_set(m, key, json_integer((json_int_t)(wp_u64(m, key) + n)));
}

static void finish_cmd(struct migration *m, int result, const char *error)
{
  pthread_mutex_lock(&m->lock);
  m->warm_cmd_result = result;
  fmt_into(m->warm_cmd_error, sizeof m->warm_cmd_error, "%s", error ? error : "");
  m->warm_cmd[0] = '\0';
  m->warm_cmd_done_seq = m->warm_cmd_seq;
  pthread_cond_broadcast(&m->cond);
  pthread_mutex_unlock(&m->lock);
}

/* ---- link ---- */

static void disconnect(struct warm_src *s)
{
  struct migration *m = s->m;
  pthread_mutex_lock(&m->lock);
  struct link_conn *c = s->conn;
  s->conn = m->conn = NULL;
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
  pthread_mutex_unlock(&m->lock);
  if (c) {
    link_conn_close(c);
    s->down_since_ns = now_ns();
  }
  if (s->wb_fd >= 0) {
    close(s->wb_fd);       /* a journal half received is received again */
    s->wb_fd = -1;
  }
}

static int send_frame(struct warm_src *s, uint8_t type, const void *p, uint32_t len)
{
  if (!s->conn)
    return -ENOTCONN;
  int r = link_send(s->conn, type, 0, p, len, 0, SEND_TIMEOUT_MS);
  if (r < 0) {
    disconnect(s);
    return -ENOTCONN;
  }
  return 0;
}

static int send_json(struct warm_src *s, uint8_t type, json_t *j)
{
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (!text)
    return -ENOMEM;
  int r = send_frame(s, type, text, (uint32_t)strlen(text));
  free(text);
  return r;
}

static int reply(struct warm_src *s, uint64_t req, bool ok, const char *error)
{
  json_t *j = json_pack("{s:I, s:b}", "req", (json_int_t)req, "ok", ok);
  if (error)
    json_object_set_new(j, "error", json_string(error));
  return send_json(s, MSG_WARM_REPLY, j);
}

static json_t *hello_json(struct warm_src *s)
{
  struct migration *m = s->m;
  json_t *disks = json_array(), *quota = json_array();
  for (unsigned i = 0; i < m->ndisks; i++) {
    json_array_append_new(disks, json_pack("{s:s, s:I, s:I}", "name", m->disks[i].name, "size",
                                           (json_int_t)m->disks[i].size, "granularity",
                                           (json_int_t)m->disks[i].gran));
    json_array_append_new(quota, json_integer((json_int_t)m->warm.quota[i]));
  }
  json_t *warm = json_pack("{s:I, s:o, s:s, s:I, s:I}", "rpo_s", (json_int_t)m->warm.rpo_s,
                           "quota", quota, "prefetch", m->warm.prefetch, "hydrate_bps",
                           (json_int_t)m->warm.hydrate_bps, "degraded_after_s",
                           (json_int_t)m->warm.degraded_after_s);
  char site[65];
  site_name(s->sh->site, site, sizeof site);
  return json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:i, s:o}", "session", m->id, "migration",
                   m->id, "vm", m->vm, "mode", "warm", "source_site", site, "disks", disks,
                   "protocol", PROTO_VERSION, "warm", warm);
}

/* Dials the destination and opens (or re-opens) the session; the state the
 * destination is in goes to dstate.  -EPERM: refused for good. */
static int connect_session(struct warm_src *s, char *dstate, size_t dlen)
{
  struct migration *m = s->m;
  char link[256], fp[LINK_FINGERPRINT_LEN], err[512];
  mig_get_peer_link(m, link, sizeof link, fp, sizeof fp);
  if (!link[0]) {
    pthread_mutex_lock(&m->lock);
    snprintf(m->prog.link_error, sizeof m->prog.link_error, "site '%s' is no longer paired",
             m->peer);
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
    fmt_into(m->prog.link_error, sizeof m->prog.link_error, "%s", id ? err : "no identity");
    pthread_mutex_unlock(&m->lock);
    return -EAGAIN;
  }
  json_t *h = hello_json(s);
  char *text = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  int r = text ? link_send(c, MSG_WARM_HELLO, 0, text, (uint32_t)strlen(text), 0,
                           SEND_TIMEOUT_MS)
               : -ENOMEM;
  free(text);
  struct link_msg lm;
  if (r == 0)
    r = link_recv(c, &lm, 30000, err, sizeof err);
  json_t *j = r == 0 ? proto_json_parse(lm.data, lm.len, err, sizeof err) : NULL;
  bool fatal = false;
  if (r == 0 && lm.type == MSG_ERROR) {
    const char *e = json_string_value(json_object_get(j, "error"));
    fatal = json_is_true(json_object_get(j, "fatal"));
    pthread_mutex_lock(&m->lock);
    fmt_into(m->prog.link_error, sizeof m->prog.link_error, "destination: %s", e ? e : "?");
    if (fatal)
      fmt_into(m->error, sizeof m->error, "the destination refused the session: %s",
               e ? e : "?");
    pthread_mutex_unlock(&m->lock);
    json_decref(j);
    link_conn_close(c);
    return fatal ? -EPERM : -EAGAIN;
  }
  if (r < 0 || !j || lm.type != MSG_WARM_REPLY || !json_is_true(json_object_get(j, "ok"))) {
    pthread_mutex_lock(&m->lock);
    fmt_into(m->prog.link_error, sizeof m->prog.link_error, "handshake: %s",
             r < 0 ? err : "no WARM_REPLY");
    pthread_mutex_unlock(&m->lock);
    json_decref(j);
    link_conn_close(c);
    return -EAGAIN;
  }
  const char *ds = json_string_value(json_object_get(j, "state"));
  snprintf(dstate, dlen, "%s", ds ? ds : "?");
  json_decref(j);
  pthread_mutex_lock(&m->lock);
  s->conn = m->conn = c;
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "up");
  m->prog.link_error[0] = '\0';
  if (s->down_since_ns)
    m->prog.reconnects++;
  pthread_mutex_unlock(&m->lock);
  s->down_since_ns = 0;
  s->backoff_ms = 0;
  log_info(m->vm, "migration %s: warm session with '%s' (%s) up; destination %s", m->id,
           m->peer, link, dstate);
  return 0;
}

/* Waits for the reply to req, handling FETCH meanwhile (the destination may
 * need data to start the VM).  0 ok, -EREMOTEIO refused (why filled),
 * -ENOTCONN link lost or no answer. */
static int handle_frame(struct warm_src *s, const struct link_msg *lm, json_t **reply_out,
                        uint64_t want_req);
static void reap_applier(struct warm_src *s, bool wait);

static int await_reply(struct warm_src *s, uint64_t req, json_t **out, char *why, size_t whylen)
{
  uint64_t deadline = now_ns() + REPLY_TIMEOUT_NS;
  while (s->conn && now_ns() < deadline && !should_stop(s->m)) {
    struct link_msg lm;
    char err[256];
    int r = link_recv(s->conn, &lm, 100, err, sizeof err);
    /* A point applied meanwhile is answered meanwhile (migrate-back waits
     * for it). */
    reap_applier(s, false);
    if (r == -ETIMEDOUT)
      continue;
    if (r < 0) {
      disconnect(s);
      break;
    }
    deadline = now_ns() + REPLY_TIMEOUT_NS;   /* the peer is busy for us, not gone */
    json_t *rj = NULL;
    if (handle_frame(s, &lm, &rj, req) < 0)
      break;
    if (rj) {
      bool ok = json_is_true(json_object_get(rj, "ok"));
      const char *e = json_string_value(json_object_get(rj, "error"));
      snprintf(why, whylen, "%s", e ? e : "");
      if (out)
        *out = rj;
      else
        json_decref(rj);
      return ok ? 0 : -EREMOTEIO;
    }
  }
  snprintf(why, whylen, "no answer from the destination");
  return -ENOTCONN;
}

static int request(struct warm_src *s, json_t *req, json_t **out, char *why, size_t whylen)
{
  uint64_t id = ++s->next_req;
  json_object_set_new(req, "req", json_integer((json_int_t)id));
  if (send_json(s, MSG_WARM_REQ, req) < 0) {
    snprintf(why, whylen, "the site link is down");
    return -ENOTCONN;
  }
  return await_reply(s, id, out, why, whylen);
}

/* ---- serving the destination ---- */

static int serve_fetch(struct warm_src *s, const struct link_msg *lm)
{
  struct migration *m = s->m;
  struct proto_fetch f;
  char err[256];
  if (proto_fetch_parse(lm->data, lm->len, &f, err, sizeof err) < 0 || f.disk >= m->ndisks) {
    log_warn(m->vm, "migration %s: bad FETCH: %s", m->id, f.disk >= m->ndisks ? "disk" : err);
    return -EPROTO;
  }
  struct mig_disk *md = &m->disks[f.disk];
  if (f.first >= md->nregions || f.count > md->nregions - f.first)
    return -EPROTO;
  if (s->recovering) {
    /* These disks are the VM's here again: nothing of them goes there. */
    struct proto_fill no = { .disk = f.disk, .count = f.count, .first = f.first,
                             .kind = WARM_FILL_ERROR, .error = EACCES };
    proto_fill_encode_header(&no, s->buf);
    return send_frame(s, MSG_WARM_FILL, s->buf, WARM_FILL_HEADER);
  }
  /* One FILL per frame's worth of regions (a frame carries 4 MiB at most). */
  uint32_t per = (uint32_t)MAX(UINT64_C(1), (FRAME_MAX_RAW - WARM_FILL_HEADER) / md->gran);
  if (f.count > per) {
    for (uint32_t k = 0; k < f.count; k += per) {
      struct proto_fetch part = { .disk = f.disk, .first = f.first + k,
                                  .count = MIN(per, f.count - k) };
      uint8_t b[WARM_FETCH_SIZE];
      proto_fetch_encode(&part, b);
      struct link_msg sub = *lm;
      sub.data = b;
      sub.len = sizeof b;
      int r = serve_fetch(s, &sub);
      if (r < 0)
        return r;
    }
    return 0;
  }
  uint64_t off = f.first * md->gran, len = MIN((uint64_t)f.count * md->gran, md->size - off);
  struct proto_fill fl = { .disk = f.disk, .count = f.count, .first = f.first,
                           .kind = WARM_FILL_DATA };
  uint8_t *data = s->buf + WARM_FILL_HEADER;
  int r = disk_read(md->d, data, (uint32_t)len, off, DISK_IO_REPLICA);
  uint32_t plen = (uint32_t)len;
  if (r < 0) {
    fl.kind = WARM_FILL_ERROR;
    fl.error = (uint32_t)-r;
    plen = 0;
  } else if (buffer_is_zero(data, len)) {
    fl.kind = WARM_FILL_ZERO;
    plen = 0;
  }
  proto_fill_encode_header(&fl, s->buf);
  r = send_frame(s, MSG_WARM_FILL, s->buf, WARM_FILL_HEADER + plen);
  if (r == 0) {
    pthread_mutex_lock(&m->lock);
    m->prog.data_bytes_sent += plen;
    m->prog.zero_bytes_sent += fl.kind == WARM_FILL_ZERO ? len : 0;
    pthread_mutex_unlock(&m->lock);
  }
  return r;
}

static void journal_tmp_path(struct warm_src *s, uint64_t point, char *buf, size_t len)
{
  char dir[PATH_MAX];
  mig_dir(s->m, dir, sizeof dir);
  fmt_into(buf, len, "%s/in-%llu.wbj.tmp", dir, (unsigned long long)point);
}

static void journal_path(struct warm_src *s, uint64_t point, char *buf, size_t len)
{
  char dir[PATH_MAX];
  mig_dir(s->m, dir, sizeof dir);
  fmt_into(buf, len, "%s/in-%llu.wbj", dir, (unsigned long long)point);
}

static int receive_wb(struct warm_src *s, const struct link_msg *lm)
{
  struct migration *m = s->m;
  struct proto_wb wb;
  char err[256], path[PATH_MAX];
  if (proto_wb_parse(lm->data, lm->len, &wb, err, sizeof err) < 0) {
    log_warn(m->vm, "migration %s: bad WB: %s", m->id, err);
    return -EPROTO;
  }
  if (s->recovering)
    return 0;                       /* points no longer apply here */
  if (wb.offset == 0) {
    /* A point starts (or starts again, after a reconnect). */
    if (s->wb_fd >= 0)
      close(s->wb_fd);
    journal_tmp_path(s, wb.point, path, sizeof path);
    s->wb_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (s->wb_fd < 0) {
      log_error(m->vm, "migration %s: cannot create %s: %s", m->id, path, strerror(errno));
      return -EIO;
    }
    s->wb_point = wb.point;
    s->wb_have = 0;
  }
  if (s->wb_fd < 0 || wb.point != s->wb_point || wb.offset != s->wb_have) {
    log_warn(m->vm, "migration %s: journal piece of point %llu at %llu out of order", m->id,
             (unsigned long long)wb.point, (unsigned long long)wb.offset);
    return -EPROTO;
  }
  if (pwrite_full(s->wb_fd, wb.bytes, wb.len, (off_t)wb.offset) < 0) {
    log_error(m->vm, "migration %s: cannot write journal of point %llu: %s", m->id,
              (unsigned long long)wb.point, strerror(errno));
    return -EIO;
  }
  s->wb_have += wb.len;
  pthread_mutex_lock(&m->lock);
  m->prog.received_bytes += wb.len;
  pthread_mutex_unlock(&m->lock);
  return 0;
}

struct apply_ctx {
  struct warm_src *s;
  int state_fd;
  char state_tmp[PATH_MAX];
  bool state_seen;
};

static int apply_entry(void *opaque, unsigned kind, unsigned disk, uint64_t off, uint64_t len,
                       const void *data)
{
  struct apply_ctx *a = opaque;
  struct migration *m = a->s->m;
  if (kind == JOURNAL_KIND_STATE) {
    a->state_seen = true;
    return pwrite_full(a->state_fd, data, len, 0) < 0 || ftruncate(a->state_fd, (off_t)len) < 0
               ? -EIO : 0;
  }
  struct disk *d = m->disks[disk].d;
  int r = 0;
  for (uint64_t done = 0; r == 0 && done < len; done += 1u << 30) {
    uint32_t n = (uint32_t)MIN(len - done, 1u << 30);
    r = kind == JOURNAL_KIND_DATA
            ? disk_write(d, (const uint8_t *)data + done, n, off + done, DISK_IO_REPLICA)
            : disk_zero(d, n, off + done, DISK_IO_REPLICA | DISK_IO_MAY_TRIM);
  }
  return r;
}

/* Applies a sealed journal to the disks and keeps its VM state as the last
 * point's.  Idempotent (entries are whole contents): a crash in the middle is
 * repaired by applying it again. */
static int apply_journal(struct warm_src *s, uint64_t point, char *err, size_t errlen)
{
  struct migration *m = s->m;
  char path[PATH_MAX], dir[PATH_MAX], state[PATH_MAX + 16];
  journal_path(s, point, path, sizeof path);
  mig_dir(m, dir, sizeof dir);
  uint64_t sizes[PROTO_MAX_DISKS];
  for (unsigned i = 0; i < m->ndisks; i++)
    sizes[i] = m->disks[i].size;
  struct apply_ctx a = { .s = s };
  fmt_into(a.state_tmp, sizeof a.state_tmp, "%s/point.state.tmp", dir);
  a.state_fd = open(a.state_tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (a.state_fd < 0) {
    fmt_into(err, errlen, "cannot create %s: %s", a.state_tmp, strerror(errno));
    return -EIO;
  }
  struct journal_info info;
  int r = journal_apply_file(path, sizes, m->ndisks, apply_entry, &a, &info, err, errlen);
  for (unsigned i = 0; r == 0 && i < m->ndisks; i++)
    r = disk_flush(m->disks[i].d);
  if (r == 0 && fdatasync(a.state_fd) < 0)
    r = -EIO;
  close(a.state_fd);
  fmt_into(state, sizeof state, "%s/rpo-state.bin", dir);
  if (r == 0 && a.state_seen && (rename(a.state_tmp, state) < 0 || fsync_parent_dir(state) < 0))
    r = -EIO;
  if (r < 0) {
    unlink(a.state_tmp);
    if (!err[0])
      snprintf(err, errlen, "applying point %llu: %s", (unsigned long long)point, strerror(-r));
    return r;
  }
  unlink(a.state_tmp);
  wp_set(m, "last_point", json_integer((json_int_t)point));
  wp_set(m, "last_point_ns", json_integer((json_int_t)info.time_ns));
  wp_add(m, "points", 1);
  wp_add(m, "wb_bytes", info.file_bytes);
  mig_persist(m);
  unlink(path);
  fsync_parent_dir(path);
  log_info(m->vm, "migration %s: RPO point %llu applied (%llu entries, %llu data bytes); the "
           "disks here are that point", m->id, (unsigned long long)point,
           (unsigned long long)info.entries, (unsigned long long)info.data_bytes);
  return 0;
}

static void *applier_main(void *arg)
{
  struct warm_src *s = arg;
  s->apply_err[0] = '\0';
  s->apply_result = apply_journal(s, s->apply_point, s->apply_err, sizeof s->apply_err);
  atomic_store(&s->applied, true);
  return NULL;
}

static int end_wb(struct warm_src *s, json_t *j)
{
  struct migration *m = s->m;
  uint64_t req = (uint64_t)json_integer_value(json_object_get(j, "req"));
  uint64_t point = (uint64_t)json_integer_value(json_object_get(j, "point"));
  uint64_t size = (uint64_t)json_integer_value(json_object_get(j, "size"));
  if (s->recovering)
    return reply(s, req, false, "the VM runs at the source again (migrate-back to the last RPO "
                 "point): this point is refused");
  if (point <= wp_u64(m, "last_point"))
    return reply(s, req, true, NULL);          /* applied already: the answer was lost */
  if (s->applying) {
    if (point == s->apply_point) {
      s->apply_req = req;                    /* answered when the applier is done */
      return 0;
    }
    return reply(s, req, false, "another point is being applied");
  }
  if (s->wb_fd < 0 || point != s->wb_point || size != s->wb_have)
    return reply(s, req, false, "the journal did not arrive whole");
  char tmp[PATH_MAX], path[PATH_MAX];
  journal_tmp_path(s, point, tmp, sizeof tmp);
  journal_path(s, point, path, sizeof path);
  int r = fdatasync(s->wb_fd);
  close(s->wb_fd);
  s->wb_fd = -1;
  if (r < 0 || rename(tmp, path) < 0 || fsync_parent_dir(path) < 0)
    return reply(s, req, false, "cannot store the journal");
  s->applying = true;
  atomic_store(&s->applied, false);
  s->apply_point = point;
  s->apply_req = req;
  if (pthread_create(&s->applier, NULL, applier_main, s) != 0) {
    s->applying = false;
    return reply(s, req, false, "cannot start the applier");
  }
  set_phase(m, "applying point");
  return 0;
}

/* The applier finished: answer, whatever connection is up now. */
static void reap_applier(struct warm_src *s, bool wait)
{
  if (!s->applying || (!wait && !atomic_load(&s->applied)))
    return;
  pthread_join(s->applier, NULL);
  s->applying = false;
  struct migration *m = s->m;
  if (s->apply_result < 0)
    log_error(m->vm, "migration %s: point %llu could not be applied: %s", m->id,
              (unsigned long long)s->apply_point, s->apply_err);
  if (s->conn && s->apply_req)
    reply(s, s->apply_req, s->apply_result == 0, s->apply_result ? s->apply_err : NULL);
  s->apply_req = 0;
  set_phase(m, "warm");
}

static int handle_frame(struct warm_src *s, const struct link_msg *lm, json_t **reply_out,
                        uint64_t want_req)
{
  struct migration *m = s->m;
  char err[256];
  pthread_mutex_lock(&m->lock);
  m->last_heard_ns = now_ns();
  pthread_mutex_unlock(&m->lock);
  switch (lm->type) {
  case MSG_WARM_FETCH:
    return serve_fetch(s, lm) == -EPROTO ? (disconnect(s), -EPROTO) : 0;
  case MSG_WARM_WB: {
    int r = receive_wb(s, lm);
    if (r < 0)
      disconnect(s);
    return r;
  }
  case MSG_PONG:
    return 0;
  case MSG_ERROR: {
    json_t *j = proto_json_parse(lm->data, lm->len, err, sizeof err);
    const char *e = json_string_value(json_object_get(j, "error"));
    log_warn(m->vm, "migration %s: the destination says: %s", m->id, e ? e : "?");
    json_decref(j);
    disconnect(s);
    return -ECONNRESET;
  }
  case MSG_WARM_REQ: {
    json_t *j = proto_json_parse(lm->data, lm->len, err, sizeof err);
    const char *op = json_string_value(json_object_get(j, "op"));
    int r = 0;
    if (!op) {
      r = -EPROTO;
    } else if (strcmp(op, "status") == 0) {
      json_object_del(j, "op");
      json_object_del(j, "req");
      wp_set(m, "dest", json_incref(j));
    } else if (strcmp(op, "wb_end") == 0) {
      r = end_wb(s, j);
    } else {
      r = reply(s, (uint64_t)json_integer_value(json_object_get(j, "req")), false,
                "unknown request");
    }
    json_decref(j);
    if (r == -EPROTO)
      disconnect(s);
    return r == -EPROTO ? r : 0;
  }
  case MSG_WARM_REPLY: {
    json_t *j = proto_json_parse(lm->data, lm->len, err, sizeof err);
    uint64_t req = j ? (uint64_t)json_integer_value(json_object_get(j, "req")) : 0;
    if (j && want_req && req == want_req && reply_out) {
      *reply_out = j;
      return 0;
    }
    json_decref(j);       /* a late answer to a request given up on */
    return 0;
  }
  default:
    log_warn(m->vm, "migration %s: unexpected %s frame in a warm session", m->id,
             proto_type_name(lm->type));
    disconnect(s);
    return -EPROTO;
  }
}

/* ---- setup ---- */

struct holes_ctx {
  struct bitmap *b;
  uint64_t gran, size;
};

static int holes_fn(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  struct holes_ctx *h = opaque;
  if (!(flags & DISK_EXTENT_HOLE))
    return 0;
  uint64_t first = DIV_ROUND_UP(off, h->gran);
  uint64_t end = off + len >= h->size ? h->b->nbits : (off + len) / h->gran;
  if (end > first)
    bitmap_set_range(h->b, first, end - first);
  return 0;
}

static int send_map(struct warm_src *s, unsigned di, uint32_t kind, const uint64_t *vals,
                    uint64_t n)
{
  uint8_t *buf = malloc(WARM_MAP_HEADER + 8 * WARM_MAP_MAX_VALUES);
  if (!buf)
    return -ENOMEM;
  int r = 0;
  for (uint64_t i = 0; r == 0 && i < n; i += WARM_MAP_MAX_VALUES) {
    uint32_t c = (uint32_t)MIN((uint64_t)WARM_MAP_MAX_VALUES, n - i);
    struct proto_map mp = { .disk = di, .kind = kind, .index = i };
    proto_map_encode_header(&mp, buf);
    for (uint32_t k = 0; k < c; k++) {
      uint64_t v = htole64(vals[i + k]);
      memcpy(buf + WARM_MAP_HEADER + 8 * k, &v, 8);
    }
    r = send_frame(s, MSG_WARM_MAP, buf, WARM_MAP_HEADER + 8 * c);
  }
  free(buf);
  return r;
}

static int cmp_heat(const void *a, const void *b)
{
  const struct heat_region *x = a, *y = b;
  double hx = x->read_heat + x->write_heat, hy = y->read_heat + y->write_heat;
  return hx < hy ? 1 : hx > hy ? -1 : 0;
}

/* Holes and (prefetch hot) the hottest regions of every disk. */
static int send_maps(struct warm_src *s, uint64_t *hot_regions_out)
{
  struct migration *m = s->m;
  *hot_regions_out = 0;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    struct bitmap *hb = &s->holes[di];
    if (!hb->words && bitmap_init(hb, md->nregions) < 0)
      return -ENOMEM;
    bitmap_clear_all(hb);
    /* The VM still runs: what it writes from now on is in the dirty map,
     * and holes it fills before the pause are taken back after it
     * (fix_holes). */
    struct bitmap scratch;
    if (bitmap_init(&scratch, md->nregions) < 0)
      return -ENOMEM;
    int r = disk_dirty_swap_fast(md->d, &scratch, NULL);
    bitmap_free(&scratch);
    if (r < 0)
      return r;
    struct bitmap holes = *hb;       /* a view: freed with s */
    struct holes_ctx hc = { hb, md->gran, md->size };
    r = disk_extents_allocation(md->d, 0, md->size, holes_fn, &hc);
    uint64_t *words = malloc(MAX(holes.nwords, 1) * 8);
    if (r == 0 && words) {
      for (uint64_t i = 0; i < holes.nwords; i++)
        words[i] = atomic_load(&holes.words[i]);
      r = send_map(s, di, WARM_MAP_HOLES, words, holes.nwords);
    } else if (!words) {
      r = -ENOMEM;
    }
    free(words);
    if (r < 0)
      return r;
    struct heat *h = disk_heat(md->d);
    if (strcmp(m->warm.prefetch, "hot") == 0 && h) {
      uint64_t hn = heat_nregions(h);
      struct heat_region *hr = calloc(MAX(hn, 1), sizeof *hr);
      uint64_t *hot = calloc(HOT_MAX_REGIONS, sizeof *hot);
      uint64_t nhot = 0, budget = m->warm.quota[di] ? m->warm.quota[di] / md->gran : UINT64_MAX;
      if (hr && hot) {
        uint64_t got = heat_regions(h, 0, hn, hr);
        qsort(hr, got, sizeof *hr, cmp_heat);
        for (uint64_t i = 0; i < got && nhot < HOT_MAX_REGIONS && nhot < budget; i++) {
          if (hr[i].read_heat + hr[i].write_heat <= 0)
            break;
          for (uint64_t reg = hr[i].offset / md->gran;
               reg < DIV_ROUND_UP(hr[i].offset + hr[i].length, md->gran) && reg < md->nregions &&
               nhot < HOT_MAX_REGIONS && nhot < budget;
               reg++)
            if (!bitmap_test(&holes, reg))
              hot[nhot++] = reg;
        }
        r = send_map(s, di, WARM_MAP_HOT, hot, nhot);
        *hot_regions_out += nhot;
      }
      free(hr);
      free(hot);
    }
    if (r < 0)
      return r;
  }
  return 0;
}

/* With the VM paused: a region sent as a hole that the VM wrote since is
 * not one; its word goes again with the bit clear. */
static int fix_holes(struct warm_src *s, uint64_t *fixed)
{
  struct migration *m = s->m;
  *fixed = 0;
  for (unsigned di = 0; di < m->ndisks; di++) {
    struct mig_disk *md = &m->disks[di];
    struct bitmap *hb = &s->holes[di];
    struct disk_dirty_map dm;
    int r = disk_dirty_snapshot(md->d, &dm);
    if (r < 0)
      return r;
    for (uint64_t w = 0; w < hb->nwords && r == 0; w++) {
      uint64_t hole = atomic_load(&hb->words[w]), written = dm.words[w] & hole;
      if (!written)
        continue;
      hole &= ~written;
      atomic_store(&hb->words[w], hole);
      *fixed += (uint64_t)__builtin_popcountll(written);
      uint8_t buf[WARM_MAP_HEADER + 8];
      struct proto_map mp = { .disk = di, .kind = WARM_MAP_HOLES, .index = w };
      proto_map_encode_header(&mp, buf);
      uint64_t v = htole64(hole);
      memcpy(buf + WARM_MAP_HEADER, &v, 8);
      r = send_frame(s, MSG_WARM_MAP, buf, sizeof buf);
    }
    free(dm.words);
    if (r < 0)
      return r;
  }
  return 0;
}

static void fence_all(struct warm_src *s, const char *reason)
{
  struct migration *m = s->m;
  for (unsigned i = 0; i < m->ndisks; i++) {
    char err[256];
    if (registry_set_fence(s->sh->reg, m->disks[i].name, reason, err, sizeof err) < 0)
      log_error(m->disks[i].name, "migration %s: %s", m->id, err);
  }
}

static void fail(struct warm_src *s, const char *why)
{
  struct migration *m = s->m;
  for (unsigned i = 0; i < m->ndisks; i++)
    if (m->disks[i].d)
      disk_set_cbt_owner(m->disks[i].d, NULL);
  vm_release(s->sh->vms, m->vm, m->id);
  set_phase(m, "failed");
  mig_set_state(m, "failed", why);
}

/* Undoes a start that did not reach the destination's VM: the VM goes on
 * here, the destination removes what it built, the restore point goes. */
static void undo_start(struct warm_src *s, const char *why)
{
  struct migration *m = s->m;
  char err[512];
  fence_all(s, NULL);
  char st[16];
  vm_state(s->sh->vms, m->vm, st, sizeof st);
  if (strcmp(st, "paused") == 0 && vm_migration_resume(s->sh->vms, m->vm, err, sizeof err) < 0)
    log_error(m->vm, "migration %s: cannot resume the VM: %s", m->id, err);
  if (s->conn)
    request(s, json_pack("{s:s, s:s}", "op", "abort", "reason", why), NULL, err, sizeof err);
  if (snapshots_exist(s->sh, m->vm))
    snapshots_remove(s->sh, m->vm, false, err, sizeof err);
  fail(s, why);
}

static int send_state(struct warm_src *s, const void *buf, size_t len)
{
  uint8_t *piece = malloc(BLOB_HEADER_SIZE + BLOB_PIECE);
  if (!piece)
    return -ENOMEM;
  int r = 0;
  for (size_t off = 0; r == 0 && (off < len || off == 0); off += BLOB_PIECE) {
    size_t n = MIN((size_t)BLOB_PIECE, len - off);
    proto_blob_encode(off, len, piece);
    memcpy(piece + BLOB_HEADER_SIZE, (const uint8_t *)buf + off, n);
    r = send_frame(s, MSG_BLOB, piece, (uint32_t)(BLOB_HEADER_SIZE + n));
    if (len == 0)
      break;
  }
  free(piece);
  return r;
}

/* Steps 2 and 3 of the file comment.  0: the VM runs at the destination. */
static int start_remote(struct warm_src *s)
{
  struct migration *m = s->m;
  char err[512], why[512];
  if (snapshots_exist(s->sh, m->vm)) {
    fmt_into(why, sizeof why, "VM '%s' still has the restore point of an earlier warm "
             "migration: remove it first (ferry snapshot rm %s)", m->vm, m->vm);
    undo_start(s, why);
    return -1;
  }
  set_phase(m, "maps");
  uint64_t hot = 0;
  if (send_maps(s, &hot) < 0) {
    undo_start(s, "the site link failed while sending the disks' maps");
    return -1;
  }
  set_phase(m, "moving compute");
  mig_set_state(m, "activating", NULL);
  if (vm_migration_pause(s->sh->vms, m->vm, err, sizeof err) < 0) {
    fmt_into(why, sizeof why, "cannot pause the VM: %s", err);
    undo_start(s, why);
    return -1;
  }
  uint64_t paused_ns = realtime_ns();
  uint64_t fixed = 0;
  if (fix_holes(s, &fixed) < 0) {
    undo_start(s, "the site link failed while sending the disks' maps");
    return -1;
  }
  if (fixed)
    log_info(m->vm, "migration %s: %llu regions the VM wrote during the start are not holes",
             m->id, (unsigned long long)fixed);
  void *state = NULL;
  size_t len = 0;
  if (vm_export_state(s->sh->vms, m->vm, &state, &len, err, sizeof err) < 0 ||
      snapshots_take(s->sh, &m->vmspec, state, len, m->id, m->peer, err, sizeof err) < 0) {
    fmt_into(why, sizeof why, "cannot take the restore point: %s", err);
    free(state);
    undo_start(s, why);
    return -1;
  }
  char reason[200];
  fmt_into(reason, sizeof reason, "warm migration %s: the VM runs at site %s", m->id, m->peer);
  fence_all(s, reason);
  int r = send_state(s, state, len);
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH64(state, len, 0));
  free(state);
  json_t *rep = NULL;
  if (r == 0)
    r = request(s, json_pack("{s:s, s:o, s:I, s:s}", "op", "activate", "vm",
                             vm_spec_to_json(&m->vmspec), "state_size", (json_int_t)len,
                             "state_xxh64", hex),
                &rep, why, sizeof why);
  json_decref(rep);
  if (r == -ENOTCONN) {
    /* The answer may be lost, not the activation: ask the destination. */
    for (int attempt = 0; attempt < 10 && !s->conn && !should_stop(m); attempt++) {
      char ds[24];
      if (connect_session(s, ds, sizeof ds) == 0 && strcmp(ds, "warm") == 0)
        r = 0;
      else if (!s->conn)
        sleep(1);
    }
  }
  if (r < 0) {
    fmt_into(err, sizeof err, "the destination could not start the VM: %s; it runs here", why);
    undo_start(s, err);
    return -1;
  }
  if (vm_mark_migrated(s->sh->vms, m->vm, m->peer, err, sizeof err) < 0)
    log_warn(m->vm, "migration %s: %s", m->id, err);
  uint64_t ttr = (realtime_ns() - s->started_ns) / 1000000;
  wp_set(m, "time_to_running_ms", json_integer((json_int_t)ttr));
  wp_set(m, "pause_ms", json_integer((json_int_t)((realtime_ns() - paused_ns) / 1000000)));
  wp_set(m, "hot_regions", json_integer((json_int_t)hot));
  pthread_mutex_lock(&m->lock);
  m->prog.downtime_ms = (realtime_ns() - paused_ns) / 1000000;
  pthread_mutex_unlock(&m->lock);
  set_phase(m, "warm");
  mig_set_state(m, "warm", NULL);
  log_info(m->vm, "migration %s: the VM runs at site '%s' %llu ms after the start (paused %llu "
           "ms); its data follows", m->id, m->peer, (unsigned long long)ttr,
           (unsigned long long)m->prog.downtime_ms);
  return 0;
}

/* ---- the end: commit, back, back to the last point ---- */

static int start_here(struct warm_src *s, const void *state, size_t len, char *err,
                      size_t errlen)
{
  struct migration *m = s->m;
  fence_all(s, NULL);
  int r = vm_import_and_start(s->sh->vms, &m->vmspec, state, len, m->id, err, errlen);
  if (r == 0)
    vm_release(s->sh->vms, m->vm, m->id);
  return r;
}

static int read_rpo_state(struct warm_src *s, void **buf, size_t *len)
{
  char dir[PATH_MAX], path[PATH_MAX + 16];
  mig_dir(s->m, dir, sizeof dir);
  fmt_into(path, sizeof path, "%s/rpo-state.bin", dir);
  FILE *f = fopen(path, "rb");
  if (!f)   /* no point yet: the disks are the restore point, and so the state */
    return snapshots_read_state(s->sh, s->m->vm, buf, len);
  struct stat st;
  int r = fstat(fileno(f), &st) < 0 ? -EIO : 0;
  *len = r == 0 ? (size_t)st.st_size : 0;
  *buf = r == 0 ? malloc(*len ? *len : 1) : NULL;
  if (!*buf || fread(*buf, 1, *len, f) != *len) {
    free(*buf);
    *buf = NULL;
    r = -EIO;
  }
  fclose(f);
  return r;
}

static void do_commit(struct warm_src *s)
{
  struct migration *m = s->m;
  char why[512];
  mig_set_state(m, "committing", NULL);
  int r = request(s, json_pack("{s:s}", "op", "commit"), NULL, why, sizeof why);
  if (r < 0) {
    mig_set_state(m, "warm", NULL);
    finish_cmd(m, r == -EREMOTEIO ? -EBUSY : -EHOSTUNREACH, why);
    return;
  }
  /* The destination is the only copy: the images here become the restore point. */
  reap_applier(s, true);
  if (snapshots_commit(s->sh, m->vm, m->peer, why, sizeof why) < 0)
    log_error(m->vm, "migration %s: committed, but the restore point: %s", m->id, why);
  for (unsigned i = 0; i < m->ndisks; i++)
    disk_set_cbt_owner(m->disks[i].d, NULL);
  vm_release(s->sh->vms, m->vm, m->id);
  set_phase(m, "committed");
  mig_set_state(m, "committed", NULL);
  finish_cmd(m, 0, NULL);
}

static void do_back(struct warm_src *s)
{
  struct migration *m = s->m;
  char why[512];
  mig_set_state(m, "returning", NULL);
  set_phase(m, "final point");
  json_t *rep = NULL;
  int r = request(s, json_pack("{s:s}", "op", "back"), &rep, why, sizeof why);
  uint64_t point = rep ? (uint64_t)json_integer_value(json_object_get(rep, "point")) : 0;
  json_decref(rep);
  reap_applier(s, true);
  if (r == 0 && point != wp_u64(m, "last_point")) {
    fmt_into(why, sizeof why, "the destination's last point %llu is not the one applied here "
             "(%llu)", (unsigned long long)point, (unsigned long long)wp_u64(m, "last_point"));
    r = -EIO;
  }
  if (r < 0) {
    /* Nothing moved here; the operator may ask again (the destination's
     * answer to a second `back` is the same point). */
    finish_cmd(m, r == -EREMOTEIO ? -EBUSY : -EHOSTUNREACH, why);
    set_phase(m, "warm");
    mig_set_state(m, "warm", NULL);
    return;
  }
  void *state = NULL;
  size_t len = 0;
  r = read_rpo_state(s, &state, &len);
  if (r < 0)
    fmt_into(why, sizeof why, "the state of the last point cannot be read: %s", strerror(-r));
  else
    r = start_here(s, state, len, why, sizeof why);
  free(state);
  if (r < 0) {
    char e[600];
    fmt_into(e, sizeof e, "every write is here (point %llu) but the VM did not start: %s; "
             "start it with ferry vm start %s", (unsigned long long)point, why, m->vm);
    finish_cmd(m, r, e);
    set_phase(m, "failed");
    mig_set_state(m, "failed", e);
    return;
  }
  request(s, json_pack("{s:s}", "op", "release"), NULL, why, sizeof why);
  /* The destination's last figures predate its final point: nothing is
   * unflushed now, and its cache is gone. */
  pthread_mutex_lock(&m->lock);
  json_t *dj = m->warm_prog ? json_object_get(m->warm_prog, "dest") : NULL;
  if (json_is_object(dj)) {
    json_object_set_new(dj, "unflushed_bytes", json_integer(0));
    json_object_set_new(dj, "pending_point", json_integer(0));
    json_object_set_new(dj, "local_bytes", json_integer(0));
  }
  pthread_mutex_unlock(&m->lock);
  for (unsigned i = 0; i < m->ndisks; i++)
    disk_set_cbt_owner(m->disks[i].d, NULL);
  set_phase(m, "returned");
  mig_set_state(m, "returned", NULL);
  log_info(m->vm, "migration %s: the VM runs here again with every write made at '%s' (point "
           "%llu)", m->id, m->peer, (unsigned long long)point);
  finish_cmd(m, 0, NULL);
}

static void do_back_rpo(struct warm_src *s)
{
  struct migration *m = s->m;
  char why[512];
  reap_applier(s, true);
  disconnect(s);
  void *state = NULL;
  size_t len = 0;
  int r = read_rpo_state(s, &state, &len);
  if (r < 0)
    fmt_into(why, sizeof why, "the state of the last point cannot be read: %s", strerror(-r));
  else
    r = start_here(s, state, len, why, sizeof why);
  free(state);
  if (r < 0) {
    finish_cmd(m, r, why);
    return;
  }
  uint64_t point = wp_u64(m, "last_point"), at = wp_u64(m, "last_point_ns");
  char msg[400];
  fmt_into(msg, sizeof msg, "the VM runs here again from %s %llu%s: what was written at '%s' "
           "after it is lost, by design; the VM there is stopped and its disks fenced as soon "
           "as '%s' can be reached", point ? "RPO point" : "the restore point",
           (unsigned long long)point, point ? "" : " (no RPO point had been applied)", m->peer,
           m->peer);
  (void)at;
  for (unsigned i = 0; i < m->ndisks; i++)
    disk_set_cbt_owner(m->disks[i].d, NULL);
  s->recovering = true;
  set_phase(m, "fencing destination");
  mig_set_state(m, "recovering", msg);
  finish_cmd(m, 0, NULL);
}

/* recovering: the destination must stop its VM and fence its disks (one
 * site authoritative).  0 once it has, or it says it already did. */
static int fence_remote(struct warm_src *s)
{
  struct migration *m = s->m;
  char why[512];
  int r = request(s, json_pack("{s:s, s:I}", "op", "fence", "point",
                               (json_int_t)wp_u64(m, "last_point")), NULL, why, sizeof why);
  if (r < 0) {
    log_warn(m->vm, "migration %s: the destination did not fence its copy yet: %s", m->id, why);
    return r;
  }
  set_phase(m, "recovered");
  mig_set_state(m, "recovered", NULL);
  log_info(m->vm, "migration %s: the destination stopped its VM and fenced its disks", m->id);
  return 0;
}

/* ---- the driver ---- */

static void update_degraded(struct warm_src *s)
{
  struct migration *m = s->m;
  uint64_t down = s->down_since_ns ? now_ns() - s->down_since_ns : 0;
  bool degraded = down >= m->warm.degraded_after_s * 1000000000ull;
  pthread_mutex_lock(&m->lock);
  bool was = json_is_true(json_object_get(m->warm_prog, "degraded"));
  pthread_mutex_unlock(&m->lock);
  if (degraded != was) {
    wp_set(m, "degraded", json_boolean(degraded));
    if (degraded) {
      char v[200];
      fmt_into(v, sizeof v, "degraded: the destination has been unreachable for %llu s; "
               "ferry migrate-back %s --last-rpo starts the VM here from the last RPO point",
               (unsigned long long)(down / 1000000000), m->vm);
      pthread_mutex_lock(&m->lock);
      snprintf(m->prog.verdict, sizeof m->prog.verdict, "%s", v);
      pthread_mutex_unlock(&m->lock);
      log_error(m->vm, "migration %s: %s", m->id, v);
    } else {
      pthread_mutex_lock(&m->lock);
      m->prog.verdict[0] = '\0';
      pthread_mutex_unlock(&m->lock);
    }
  }
}

/* At a start: journals received and sealed before a crash are applied. */
static void apply_leftovers(struct warm_src *s)
{
  char dir[PATH_MAX];
  mig_dir(s->m, dir, sizeof dir);
  DIR *d = opendir(dir);
  struct dirent *e;
  uint64_t points[64];
  unsigned n = 0;
  while (d && (e = readdir(d)) && n < 64) {
    unsigned long long p;
    char tail[8];
    if (sscanf(e->d_name, "in-%llu.wbj%7s", &p, tail) == 1)
      points[n++] = p;
    else if (sscanf(e->d_name, "in-%llu.wbj.tm%1s", &p, tail) == 2) {
      char path[PATH_MAX + 300];
      snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
      unlink(path);   /* half received: the destination sends it again */
    }
  }
  if (d)
    closedir(d);
  for (unsigned i = 0; i < n; i++) {
    char err[256] = "";
    if (points[i] <= wp_u64(s->m, "last_point")) {
      char path[PATH_MAX];
      journal_path(s, points[i], path, sizeof path);
      unlink(path);
      continue;
    }
    log_info(s->m->vm, "migration %s: point %llu arrived before the restart: applying it", s->m->id,
             (unsigned long long)points[i]);
    if (apply_journal(s, points[i], err, sizeof err) < 0)
      log_error(s->m->vm, "migration %s: %s", s->m->id, err);
  }
}

void *warm_source_main(void *arg)
{
  struct migration *m = arg;
  struct warm_src *s = calloc(1, sizeof *s);
  char err[512];
  if (!s) {
    mig_set_state(m, "failed", "out of memory");
    return NULL;
  }
  s->m = m;
  s->sh = mig_shared(m);
  s->wb_fd = -1;
  s->started_ns = realtime_ns();
  m->wsrc = s;
  uint64_t maxgran = 0;
  for (unsigned i = 0; i < m->ndisks; i++)
    maxgran = MAX(maxgran, m->disks[i].gran);
  s->buflen = WARM_FILL_HEADER + WARM_MAX_FETCH * maxgran;
  s->buf = malloc(s->buflen);
  if (!s->buf) {
    mig_set_state(m, "failed", "out of memory");
    goto out;
  }
  if (vm_claim(s->sh->vms, m->vm, m->id, err, sizeof err) < 0 &&
      strcmp(m->state, "starting") == 0) {
    fail(s, err);
    goto out;
  }
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    if (!md->d)
      md->d = registry_get(s->sh->reg, md->name);
    if (!md->d) {
      fmt_into(err, sizeof err, "disk '%s' is gone", md->name);
      fail(s, err);
      goto out;
    }
    disk_set_cbt_owner(md->d, m->id);
  }
  apply_leftovers(s);

  if (strcmp(m->state, "committing") == 0 || strcmp(m->state, "returning") == 0) {
    /* ferryd stopped while the operator's request ran: the VM is still at
     * the destination (both requests are idempotent there: ask again). */
    log_warn(m->vm, "migration %s: ferryd stopped during '%s'; the VM runs at '%s': ask again",
             m->id, m->state, m->peer);
    mig_set_state(m, "warm", NULL);
  }
  s->recovering = strcmp(m->state, "recovering") == 0;
  bool started = strcmp(m->state, "starting") != 0;
  if (strcmp(m->state, "activating") == 0) {
    /* ferryd stopped while the VM moved: the destination knows where it runs. */
    char ds[24] = "";
    for (int attempt = 0; attempt < 30 && !should_stop(m); attempt++) {
      if (connect_session(s, ds, sizeof ds) == 0)
        break;
      sleep(1);
    }
    if (strcmp(ds, "warm") == 0) {
      vm_mark_migrated(s->sh->vms, m->vm, m->peer, err, sizeof err);
      mig_set_state(m, "warm", NULL);
    } else {
      undo_start(s, "ferryd stopped while the VM was moving; it runs here");
      goto out;
    }
  }
  while (!should_stop(m)) {
    pthread_mutex_lock(&m->lock);
    bool cancel = m->cancel;
    pthread_mutex_unlock(&m->lock);
    if (cancel && !started) {
      undo_start(s, "cancelled by the operator");
      mig_set_state(m, "cancelled", "cancelled by the operator");
      goto out;
    }
    if (!s->conn) {
      char ds[24];
      int r = connect_session(s, ds, sizeof ds);
      if (r == 0 && s->recovering && mig_terminal(ds)) {
        set_phase(m, "recovered");
        mig_set_state(m, "recovered", NULL);
        goto out;
      }
      if (r == -EPERM && s->recovering) {
        /* The destination refuses the session: it ended it itself. */
        set_phase(m, "recovered");
        mig_set_state(m, "recovered", NULL);
        goto out;
      }
      if (r == 0 && started && (strcmp(ds, "receiving") == 0 || mig_terminal(ds))) {
        fmt_into(err, sizeof err, "the destination has lost the session (it is %s there)", ds);
        log_error(m->vm, "migration %s: %s", m->id, err);
        disconnect(s);
      }
      if (r == -EPERM && !started) {
        char e[600];
        pthread_mutex_lock(&m->lock);
        snprintf(e, sizeof e, "%s", m->error);
        pthread_mutex_unlock(&m->lock);
        fail(s, e);
        goto out;
      }
      if (r < 0 || !s->conn) {
        s->backoff_ms = s->backoff_ms ? MIN(s->backoff_ms * 2, 2000) : 200;
        if (!s->down_since_ns)
          s->down_since_ns = now_ns();
        update_degraded(s);
        reap_applier(s, false);
        pthread_mutex_lock(&m->lock);
        char cmd[16];
        snprintf(cmd, sizeof cmd, "%s", m->warm_cmd);
        if (!m->stop && !cmd[0])
          cond_timedwait_ms(&m->cond, &m->lock, (unsigned)s->backoff_ms);
        pthread_mutex_unlock(&m->lock);
        if (strcmp(cmd, "back-rpo") == 0) {
          do_back_rpo(s);
          continue;                /* recovering: fence the destination when it is back */
        }
        if (cmd[0] && strcmp(cmd, "back-rpo") != 0 && !started)
          finish_cmd(m, -EBUSY, "the VM has not started at the destination yet");
        else if (cmd[0])
          finish_cmd(m, -EHOSTUNREACH, "the destination is unreachable; ferry migrate-back "
                     "--last-rpo starts the VM here from the last RPO point");
        continue;
      }
      update_degraded(s);
    }
    if (!started) {
      if (start_remote(s) < 0)
        goto out;
      started = true;
      continue;
    }

    if (s->recovering) {
      if (fence_remote(s) == 0)
        goto out;
      disconnect(s);
      sleep(1);
      continue;
    }

    /* Serving. */
    struct link_msg lm;
    int r = link_recv(s->conn, &lm, 100, err, sizeof err);
    if (r == 0) {
      handle_frame(s, &lm, NULL, 0);
    } else if (r != -ETIMEDOUT) {
      log_warn(m->vm, "migration %s: site link lost: %s", m->id, err);
      disconnect(s);
      continue;
    }
    reap_applier(s, false);
    uint64_t now = now_ns();
    if (s->conn && now - s->last_ping_ns >= PING_NS) {
      uint8_t b[8];
      proto_u64_encode(now, b);
      send_frame(s, MSG_PING, b, 8);
      s->last_ping_ns = now;
    }
    pthread_mutex_lock(&m->lock);
    char cmd[16];
    snprintf(cmd, sizeof cmd, "%s", m->warm_cmd);
    pthread_mutex_unlock(&m->lock);
    if (!cmd[0] || !s->conn)
      continue;
    if (strcmp(cmd, "rpo-now") == 0) {
      char why[256];
      int rr = request(s, json_pack("{s:s}", "op", "rpo_now"), NULL, why, sizeof why);
      finish_cmd(m, rr == -EREMOTEIO ? -EBUSY : rr == -ENOTCONN ? -EHOSTUNREACH : rr,
                 rr ? why : NULL);
    } else if (strcmp(cmd, "commit") == 0) {
      do_commit(s);
      if (strcmp(m->state, "committed") == 0)
        goto out;
    } else if (strcmp(cmd, "back") == 0) {
      do_back(s);
      if (mig_terminal(m->state))
        goto out;
    } else if (strcmp(cmd, "back-rpo") == 0) {
      do_back_rpo(s);
    }
  }
out:
  reap_applier(s, true);
  disconnect(s);
  mig_persist(m);
  for (unsigned i = 0; i < PROTO_MAX_DISKS; i++)
    bitmap_free(&s->holes[i]);
  free(s->buf);
  m->wsrc = NULL;
  free(s);
  return NULL;
}
