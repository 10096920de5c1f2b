/* dest: the destination side of a migration session (docs/protocol.md).
 *
 * DESIGN
 * The session runs on the link listener's thread for its connection.  The
 * first frame must be a HELLO whose source site is the paired peer that
 * connected (the certificate decides who it is, the HELLO may not claim
 * otherwise).  A new session creates the disks, fenced ("incoming
 * migration"), so nothing but this session writes them until activation.  A
 * known session is taken over: a newer connection for the same session
 * shuts the older one down and waits for it to let go, because after a cut
 * the old connection may not have noticed yet.
 *
 * Frames the source sequences (DATA, CTRL, BLOB) are applied strictly in
 * order: applied_seq is the last one applied.  A frame with the next seq is
 * applied; an older one is a duplicate (sent again after a reconnect) and
 * skipped; a newer one means something was lost (we asked for it with a
 * NACK and drop the rest until it comes).  Durability is batched: after
 * DEST_SYNC_BYTES, DEST_SYNC_NS, a flush request or a quiet link, every
 * session disk is fdatasync'ed, then applied_seq and the background
 * high-water marks are stored in the migrations row, and only then ACK(seq)
 * tells the source it may forget those frames.  So after a crash the row
 * never claims more than the disks hold.
 *
 * Activation (CTRL activate) is the point of no return on this side: the
 * disks are unfenced (durably) and the VM is started from the state the
 * source sent; the source fenced its disks before it asked.  Every CTRL op
 * is idempotent, because after a reconnect the source asks again.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/tunnel.h"
#include "site/site.h"
#include "vm/vm.h"

#define IDLE_TIMEOUT_NS (60ull * 1000000000)   /* no frame at all for this long: drop */
#define SEND_TIMEOUT_MS 30000
#define ZERO_PIECE (1u << 30)

struct session {
  struct migration *m;
  struct link_conn *conn;
  uint64_t unsynced_bytes;
  uint64_t first_unsynced_ns;
  bool dirty;                      /* applied something not yet synced */
  uint64_t nacked;                 /* the seq we last asked for again, 0 = none */
  void *hashbuf;                   /* one region, for hashing */
  uint64_t hashbuf_len;
};

static int send_json(struct session *s, uint8_t type, json_t *j)
{
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (!text)
    return -ENOMEM;
  int r = link_send(s->conn, type, 0, text, (uint32_t)strlen(text), 0, SEND_TIMEOUT_MS);
  free(text);
  return r;
}

static void send_error(struct link_conn *conn, const char *msg, bool fatal)
{
  json_t *j = json_pack("{s:s, s:b}", "error", msg, "fatal", fatal);
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (text)
    link_send(conn, MSG_ERROR, 0, text, (uint32_t)strlen(text), 0, 5000);
  free(text);
}

static int send_u64(struct session *s, uint8_t type, uint64_t v)
{
  uint8_t b[8];
  proto_u64_encode(v, b);
  return link_send(s->conn, type, 0, b, 8, 0, SEND_TIMEOUT_MS);
}

/* Makes every applied frame durable and records it. */
static int sync_only(struct session *s)
{
  struct migration *m = s->m;
  if (s->dirty) {
    for (unsigned i = 0; i < m->ndisks; i++) {
      if (!m->disks[i].d)
        continue;                      /* removed by an abort just applied */
      int r = disk_flush(m->disks[i].d);
      if (r < 0) {
        log_error(m->disks[i].name, "migration %s: cannot sync the disk: %s", m->id,
                  strerror(-r));
        return r;
      }
    }
    pthread_mutex_lock(&m->lock);
    for (unsigned i = 0; i < m->ndisks; i++)
      m->disks[i].bg_hwm_durable = m->disks[i].bg_hwm;
    m->prog.durable_seq = m->prog.applied_seq = m->applied_seq;
    pthread_mutex_unlock(&m->lock);
    if (mig_persist(m) < 0)
      return -EIO;
    s->dirty = false;
    s->unsynced_bytes = 0;
  }
  return 0;
}

/* ... and then acknowledges it. */
static int sync_and_ack(struct session *s)
{
  int r = sync_only(s);
  return r < 0 ? r : send_u64(s, MSG_ACK, s->m->applied_seq);
}

/* ---- disks ---- */

/* Opens (creating, fenced, if needed) the session's disks.  A disk of that
 * name that this session did not create is never taken over, with one
 * exception: the fenced copy this site kept of a disk it migrated to the very
 * site that now sends it back.  It is re-fenced for this session and
 * overwritten whole (the background copy sends every byte of a disk, holes as
 * zero ranges) and verified like a new one. */
static int open_disks(struct migration *m, bool create, char *err, size_t errlen)
{
  const struct migrations_shared *sh = mig_shared(m);
  char reason[160];
  snprintf(reason, sizeof reason, "incoming migration %s from site %s", m->id, m->peer);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    if (md->d)
      continue;
    struct disk *d = registry_get(sh->reg, md->name);
    if (d) {
      char why[160], gone[160];
      disk_fence_reason(d, why, sizeof why);
      snprintf(gone, sizeof gone, "migrated to site %s by migration ", m->peer);
      bool coming_back = strncmp(why, gone, strlen(gone)) == 0 && disk_size(d) == md->size;
      if (coming_back && create) {
        int r = registry_set_fence(sh->reg, md->name, reason, err, errlen);
        if (r < 0) {
          disk_unref(d);
          return r;
        }
        log_info(md->name, "migration %s: the disk comes back from site %s; the copy kept "
                 "here is overwritten", m->id, m->peer);
      } else if (strcmp(why, reason) != 0 && strcmp(m->state, "receiving") == 0) {
        snprintf(err, errlen, "a disk named '%s' already exists at this site", md->name);
        disk_unref(d);
        return -EEXIST;
      }
      if (disk_size(d) != md->size) {
        snprintf(err, errlen, "disk '%s' here has %llu bytes, the source's %llu", md->name,
                 (unsigned long long)disk_size(d), (unsigned long long)md->size);
        disk_unref(d);
        return -EINVAL;
      }
    } else if (create) {
      int r = registry_create_ex(sh->reg, md->name, md->size, md->gran, reason, err, errlen);
      if (r < 0)
        return r;
      d = registry_get(sh->reg, md->name);
    }
    if (!d) {
      snprintf(err, errlen, "disk '%s' of the session is missing here", md->name);
      return -ENOENT;
    }
    md->d = d;
  }
  return 0;
}

int dest_recover(struct migration *m)
{
  char err[256];
  if (open_disks(m, false, err, sizeof err) < 0) {
    log_error(m->vm, "migration %s: %s", m->id, err);
    return -1;
  }
  m->applied_seq = m->prog.applied_seq;
  if (strcmp(m->state, "activating") == 0 || strcmp(m->state, "active") == 0)
    vm_claim(mig_shared(m)->vms, m->vm, m->id, err, sizeof err);
  log_info(m->vm, "migration %s (destination, %s): waiting for the source; %llu frames held",
           m->id, m->state, (unsigned long long)m->applied_seq);
  return 0;
}

/* ---- frames ---- */

static int apply_data(struct session *s, const struct link_msg *lm, char *err, size_t errlen)
{
  struct migration *m = s->m;
  struct proto_data d;
  int r = proto_data_parse(lm->data, lm->len, &d, err, errlen);
  if (r < 0)
    return r;
  if (d.disk >= m->ndisks) {
    snprintf(err, errlen, "DATA for disk %u of %u", d.disk, m->ndisks);
    return -EPROTO;
  }
  struct mig_disk *md = &m->disks[d.disk];
  if (d.offset > md->size || d.length > md->size - d.offset) {
    snprintf(err, errlen, "DATA range %llu+%llu beyond disk '%s' (%llu bytes)",
             (unsigned long long)d.offset, (unsigned long long)d.length, md->name,
             (unsigned long long)md->size);
    return -EPROTO;
  }
  if (d.kind == DATA_KIND_DATA) {
    r = disk_write(md->d, d.bytes, (uint32_t)d.length, d.offset, DISK_IO_REPLICA);
  } else {
    for (uint64_t done = 0; r == 0 && done < d.length; done += ZERO_PIECE)
      r = disk_zero(md->d, (uint32_t)MIN(ZERO_PIECE, d.length - done), d.offset + done,
                    DISK_IO_REPLICA | DISK_IO_MAY_TRIM);
  }
  if (r < 0) {
    snprintf(err, errlen, "cannot write disk '%s' at %llu: %s", md->name,
             (unsigned long long)d.offset, strerror(-r));
    return r;
  }
  if (d.flags & DATA_F_BACKGROUND)
    md->bg_hwm = MAX(md->bg_hwm, d.offset + d.length);
  s->unsynced_bytes += d.kind == DATA_KIND_DATA ? d.length : 0;
  pthread_mutex_lock(&m->lock);
  m->prog.received_bytes += d.kind == DATA_KIND_DATA ? d.length : 0;
  pthread_mutex_unlock(&m->lock);
  return 0;
}

static int reply_json(struct session *s, uint64_t req, bool ok, const char *error, json_t *extra)
{
  json_t *j = extra ? extra : json_object();
  json_object_set_new(j, "req", json_integer((json_int_t)req));
  json_object_set_new(j, "ok", json_boolean(ok));
  if (error)
    json_object_set_new(j, "error", json_string(error));
  return send_json(s, MSG_REPLY, j);
}

static int do_hash(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  if (c->disk >= m->ndisks)
    return reply_json(s, c->req, false, "hash of an unknown disk", NULL);
  struct mig_disk *md = &m->disks[c->disk];
  if (!c->regions && (c->first >= md->nregions || c->count > md->nregions - c->first))
    return reply_json(s, c->req, false, "hash range beyond the disk", NULL);
  for (uint64_t i = 0; c->regions && i < c->count; i++)
    if ((uint64_t)json_integer_value(json_array_get(c->regions, i)) >= md->nregions)
      return reply_json(s, c->req, false, "hash of a region beyond the disk", NULL);
  if (s->hashbuf_len < md->gran) {
    free(s->hashbuf);
    s->hashbuf = malloc(md->gran);
    s->hashbuf_len = s->hashbuf ? md->gran : 0;
    if (!s->hashbuf)
      return reply_json(s, c->req, false, "out of memory", NULL);
  }
  size_t len = HASHES_HEADER_SIZE + 8 * (size_t)c->count;
  uint8_t *out = malloc(len);
  if (!out)
    return reply_json(s, c->req, false, "out of memory", NULL);
  struct proto_hashes h = { .req = c->req, .disk = c->disk, .count = (uint32_t)c->count,
                            .first = c->first };
  proto_hashes_encode_header(&h, out);
  for (uint64_t i = 0; i < c->count; i++) {
    uint64_t v = 0;
    uint64_t rg = c->regions ? (uint64_t)json_integer_value(json_array_get(c->regions, i))
                             : c->first + i;
    int r = region_hash(md->d, md->gran, rg, s->hashbuf, &v);
    if (r < 0) {   /* 1: a hole, hashed without a read */
      free(out);
      return reply_json(s, c->req, false, "cannot read the disk to hash it", NULL);
    }
    proto_u64_encode(v, out + HASHES_HEADER_SIZE + 8 * i);
  }
  int r = link_send(s->conn, MSG_HASHES, 0, out, (uint32_t)len, 0, SEND_TIMEOUT_MS);
  free(out);
  return r;
}

static void state_path(struct migration *m, char *buf, size_t len)
{
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  fmt_into(buf, len, "%s/vm.state", dir);
}

static int do_vm_state(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  if (!m->blob || m->blob_total != c->size || m->blob_have != c->size)
    return reply_json(s, c->req, false, "the VM state did not arrive whole", NULL);
  if (XXH64(m->blob, m->blob_total, 0) != c->xxh64)
    return reply_json(s, c->req, false, "the VM state's checksum does not match", NULL);
  /* Kept on disk: an activation after a restart of this ferryd needs it. */
  char path[PATH_MAX], why[PATH_MAX + 64];
  state_path(m, path, sizeof path);
  if (write_file_atomic(path, m->blob, m->blob_total, 0640, why, sizeof why) < 0) {
    log_error(m->vm, "migration %s: %s", m->id, why);
    return reply_json(s, c->req, false, "cannot store the VM state", NULL);
  }
  m->blob_ready = true;
  return reply_json(s, c->req, true, NULL, NULL);
}

static int load_state_file(struct migration *m)
{
  char path[PATH_MAX];
  state_path(m, path, sizeof path);
  FILE *f = fopen(path, "rb");
  if (!f)
    return -ENOENT;
  fseeko(f, 0, SEEK_END);
  off_t size = ftello(f);
  rewind(f);
  free(m->blob);
  m->blob = malloc(size > 0 ? (size_t)size : 1);
  int r = m->blob && fread(m->blob, 1, (size_t)size, f) == (size_t)size ? 0 : -EIO;
  fclose(f);
  if (r == 0) {
    m->blob_total = m->blob_have = (uint64_t)size;
    m->blob_ready = true;
  }
  return r;
}

/* The VM a CTRL names, checked: valid, and only disks this session brought. */
static int session_spec(struct session *s, const struct proto_ctrl *c, struct vm_spec *spec,
                        char *err, size_t errlen)
{
  struct migration *m = s->m;
  if (vm_spec_from_json(json_object_get(c->body, "vm"), spec, err, errlen) < 0)
    return -EINVAL;
  if (strcmp(spec->name, m->vm) != 0) {
    snprintf(err, errlen, "the VM is '%s' but this session moves '%s'", spec->name, m->vm);
    return -EINVAL;
  }
  for (unsigned k = 0; k < spec->ndisks; k++) {
    bool ours = false;
    for (unsigned j = 0; j < m->ndisks; j++)
      ours |= strcmp(spec->disks[k], m->disks[j].name) == 0;
    if (!ours) {
      snprintf(err, errlen, "the VM names a disk this session did not bring");
      return -EINVAL;
    }
  }
  return 0;
}

static void incoming_reason(struct migration *m, char *buf, size_t len)
{
  snprintf(buf, len, "incoming migration %s from site %s", m->id, m->peer);
}

/* qemu live: the destination's QEMU starts, waiting for its RAM on the
 * tunnel's socket; it may attach to the (fenced) disks meanwhile. */
static int do_prepare_incoming(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512];
  struct vm_spec spec;
  if (session_spec(s, c, &spec, err, sizeof err) < 0)
    return reply_json(s, c->req, false, err, NULL);
  if (strcmp(m->state, "receiving") != 0) {
    snprintf(err, sizeof err, "migration %s is %s here", m->id, m->state);
    return reply_json(s, c->req, false, err, NULL);
  }
  for (unsigned k = 0; k < m->ndisks; k++)
    if (m->disks[k].d)
      disk_set_fence_admits(m->disks[k].d, true);
  char path[PATH_MAX], uri[PATH_MAX + 8];
  tunnel_incoming_path(sh->data_dir, m->id, path, sizeof path);
  snprintf(uri, sizeof uri, "unix:%s", path);
  m->vmspec = spec;
  int r = vm_import_incoming(sh->vms, &spec, m->id, uri, err, sizeof err);
  if (r < 0) {
    for (unsigned k = 0; k < m->ndisks; k++)
      if (m->disks[k].d)
        disk_set_fence_admits(m->disks[k].d, false);
    log_error(m->vm, "migration %s: cannot start the incoming VM: %s", m->id, err);
    return reply_json(s, c->req, false, err, NULL);
  }
  log_info(m->vm, "migration %s: incoming VM started, waiting for its RAM", m->id);
  return reply_json(s, c->req, true, NULL, NULL);
}

static int do_incoming_status(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  char err[512];
  json_t *info = NULL;
  if (vm_incoming_status(mig_shared(m)->vms, m->vm, &info, err, sizeof err) < 0)
    return reply_json(s, c->req, false, err, NULL);
  if (json_is_true(json_object_get(info, "running")))
    vm_release(mig_shared(m)->vms, m->vm, m->id);
  return reply_json(s, c->req, true, NULL, info);
}

static int do_discard_incoming(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512];
  json_t *info = NULL;
  if (vm_incoming_status(sh->vms, m->vm, &info, err, sizeof err) == 0 &&
      json_is_true(json_object_get(info, "running"))) {
    json_decref(info);
    return reply_json(s, c->req, false, "the guest already runs here", NULL);
  }
  json_decref(info);
  int r = vm_discard_incoming(sh->vms, m->vm, m->id, err, sizeof err);
  if (r < 0 && r != -ENOENT)
    return reply_json(s, c->req, false, err, NULL);
  /* If the disks were handed over for the switch-over, they go back. */
  char reason[160];
  incoming_reason(m, reason, sizeof reason);
  for (unsigned k = 0; k < m->ndisks; k++) {
    if (registry_set_fence(sh->reg, m->disks[k].name, reason, err, sizeof err) < 0)
      return reply_json(s, c->req, false, err, NULL);
    if (m->disks[k].d)
      disk_set_fence_admits(m->disks[k].d, false);
  }
  if (strcmp(m->state, "receiving") != 0)
    mig_set_state(m, "receiving", NULL);
  return reply_json(s, c->req, true, NULL, NULL);
}

static int do_activate(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  const struct migrations_shared *sh = mig_shared(m);
  if (strcmp(m->state, "active") == 0 || strcmp(m->state, "completed") == 0)
    return reply_json(s, c->req, true, NULL, json_pack("{s:b}", "already", true));
  bool incoming = json_is_true(json_object_get(c->body, "incoming"));
  if (!incoming && !m->blob_ready && load_state_file(m) < 0)
    return reply_json(s, c->req, false, "no VM state has arrived", NULL);
  int r = sync_and_ack(s);
  if (r < 0)
    return r;
  struct vm_spec spec;
  char err[512];
  if (session_spec(s, c, &spec, err, sizeof err) < 0)
    return reply_json(s, c->req, false, err, NULL);
  m->vmspec = spec;
  mig_set_state(m, "activating", NULL);
  for (unsigned k = 0; k < m->ndisks; k++) {
    if ((r = registry_set_fence(sh->reg, m->disks[k].name, NULL, err, sizeof err)) < 0)
      goto undo;
    /* What the replica writes left in the map means nothing: start clean. */
    struct disk_dirty_map dm;
    if (disk_dirty_swap(m->disks[k].d, &dm) == 0)
      free(dm.words);
  }
  if (!incoming) {
    /* vm_import_and_start claims the VM for this migration itself (a VM
     * that left this site earlier is taken back). */
    r = vm_import_and_start(sh->vms, &spec, m->blob, m->blob_total, m->id, err, sizeof err);
    if (r < 0)
      goto undo;
    vm_release(sh->vms, spec.name, m->id);
  }
  /* incoming: the waiting QEMU runs the guest once the source's QEMU has
   * sent the last of its state (the source asks incoming_status). */
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.phase, sizeof m->prog.phase, "active");
  pthread_mutex_unlock(&m->lock);
  mig_set_state(m, "active", NULL);
  return reply_json(s, c->req, true, NULL, NULL);

undo:
  /* Refused: this site never became authoritative, the source takes the VM
   * back.  The disks are fenced again before the refusal goes out. */
  log_error(m->vm, "migration %s: activation failed: %s", m->id, err);
  char reason[160];
  incoming_reason(m, reason, sizeof reason);
  for (unsigned k = 0; k < m->ndisks; k++) {
    char e2[256];
    registry_set_fence(sh->reg, m->disks[k].name, reason, e2, sizeof e2);
  }
  vm_release(sh->vms, spec.name, m->id);
  mig_set_state(m, "receiving", NULL);
  return reply_json(s, c->req, false, err, NULL);
}

static int do_abort(struct session *s, const struct proto_ctrl *c)
{
  struct migration *m = s->m;
  const struct migrations_shared *sh = mig_shared(m);
  if (strcmp(m->state, "active") == 0 || strcmp(m->state, "completed") == 0 ||
      strcmp(m->state, "activating") == 0)
    return reply_json(s, c->req, false, "the VM was activated here: too late to abort", NULL);
  char e0[256];
  vm_discard_incoming(sh->vms, m->vm, m->id, e0, sizeof e0);   /* -ENOENT: there was none */
  for (unsigned i = 0; i < m->ndisks; i++) {
    if (m->disks[i].d) {
      disk_unref(m->disks[i].d);
      m->disks[i].d = NULL;
    }
    char err[256];
    registry_remove(sh->reg, m->disks[i].name, true, err, sizeof err);
  }
  char path[PATH_MAX];
  state_path(m, path, sizeof path);
  unlink(path);
  const char *why = json_string_value(json_object_get(c->body, "reason"));
  mig_set_state(m, "cancelled", why ? why : "cancelled by the source");
  return reply_json(s, c->req, true, NULL, NULL);
}

static int apply_ctrl(struct session *s, const struct link_msg *lm, bool *end)
{
  struct migration *m = s->m;
  char err[256];
  json_t *j = proto_json_parse(lm->data, lm->len, err, sizeof err);
  struct proto_ctrl c;
  if (!j || proto_parse_ctrl(j, &c, err, sizeof err) < 0) {
    log_warn(m->vm, "migration %s: bad CTRL from the source: %s", m->id, err);
    json_decref(j);
    return -EPROTO;
  }
  int r = 0;
  switch (c.op) {
  case OP_FLUSH:
    s->dirty = true;     /* sync even if nothing new: the source wants a durable point */
    if ((r = sync_and_ack(s)) == 0)
      r = reply_json(s, c.req, true, NULL,
                     json_pack("{s:I}", "applied_seq", (json_int_t)m->applied_seq));
    break;
  case OP_HASH:
    r = do_hash(s, &c);
    break;
  case OP_VM_STATE:
    r = do_vm_state(s, &c);
    break;
  case OP_ACTIVATE:
    r = do_activate(s, &c);
    break;
  case OP_PREPARE_INCOMING:
    r = do_prepare_incoming(s, &c);
    break;
  case OP_INCOMING_STATUS:
    r = do_incoming_status(s, &c);
    break;
  case OP_DISCARD_INCOMING:
    r = do_discard_incoming(s, &c);
    break;
  case OP_COMPLETE: {
    uint64_t dt = (uint64_t)json_integer_value(json_object_get(j, "downtime_ms"));
    pthread_mutex_lock(&m->lock);
    m->prog.downtime_ms = dt;
    snprintf(m->prog.phase, sizeof m->prog.phase, "completed");
    pthread_mutex_unlock(&m->lock);
    char path[PATH_MAX];
    state_path(m, path, sizeof path);
    unlink(path);
    vm_release(mig_shared(m)->vms, m->vm, m->id);
    mig_set_state(m, "completed", NULL);
    r = reply_json(s, c.req, true, NULL, NULL);
    break;
  }
  case OP_ABORT:
    r = do_abort(s, &c);
    if (strcmp(m->state, "cancelled") == 0)
      *end = true;
    break;
  }
  json_decref(j);
  return r;
}

int dest_apply_blob(struct migration *m, const struct link_msg *lm, char *err, size_t errlen)
{
  struct proto_blob b;
  int r = proto_blob_parse(lm->data, lm->len, &b, err, errlen);
  if (r < 0)
    return r;
  if (b.offset == 0) {
    free(m->blob);
    m->blob = malloc(b.total ? b.total : 1);
    m->blob_total = b.total;
    m->blob_have = 0;
    m->blob_ready = false;
    if (!m->blob)
      return -ENOMEM;
  }
  if (!m->blob || b.total != m->blob_total || b.offset != m->blob_have) {
    snprintf(err, errlen, "VM state piece at %llu does not follow %llu of %llu",
             (unsigned long long)b.offset, (unsigned long long)m->blob_have,
             (unsigned long long)m->blob_total);
    return -EPROTO;
  }
  memcpy(m->blob + b.offset, b.bytes, b.len);
  m->blob_have += b.len;
  return 0;
}

/* ---- the session ---- */

struct migration *dest_take_session(struct migrations *ms, struct link_conn *conn,
                                    const struct proto_hello *h, const char *peer,
                                    char *err, size_t errlen)
{
  struct migration *m = mig_find(ms, h->session);
  if (!m) {
    m = mig_create_destination(ms, h, peer, err, errlen);
    if (!m)
      return NULL;
  } else if (strcmp(m->role, "destination") != 0 || strcmp(m->peer, peer) != 0) {
    snprintf(err, errlen, "session %s is not an incoming migration from '%s'", h->session, peer);
    return NULL;
  }
  pthread_mutex_lock(&m->lock);
  /* The newest connection wins: the old one may be dead without knowing. */
  while (m->owner_busy) {
    if (m->owner)
      link_conn_shutdown(m->owner);
    pthread_cond_wait(&m->cond, &m->lock);
  }
  m->owner = conn;
  m->owner_busy = true;
  pthread_mutex_unlock(&m->lock);
  return m;
}

void dest_release_session(struct migration *m)
{
  pthread_mutex_lock(&m->lock);
  m->owner = NULL;
  m->owner_busy = false;
  pthread_cond_broadcast(&m->cond);
  pthread_mutex_unlock(&m->lock);
}

json_t *dest_accept_hello(struct migrations *ms, struct link_conn *conn,
                          const struct link_msg *hello, bool warm, struct proto_hello *h,
                          char *peer, size_t peerlen)
{
  char err[512];
  json_t *j = proto_json_parse(hello->data, hello->len, err, sizeof err);
  if (!j || proto_parse_hello(j, h, err, sizeof err) < 0 ||
      (warm != (strcmp(h->mode, "warm") == 0) &&
       snprintf(err, sizeof err, "mode '%s' does not go with a %s", h->mode,
                warm ? "WARM_HELLO" : "HELLO"))) {
    log_warn(NULL, "site link %s: bad HELLO: %s", link_conn_peer_address(conn), err);
    send_error(conn, err, true);
    json_decref(j);
    link_conn_close(conn);
    return NULL;
  }
  /* Who is calling is what the certificate says, not what the HELLO says. */
  const struct migrations_shared *sh = migrations_shared(ms);
  peer[0] = '\0';
  if (!site_trust(sh->site, link_conn_peer_fingerprint(conn), peer, peerlen) ||
      strcmp(peer, h->source_site) != 0) {
    snprintf(err, sizeof err, "the HELLO names source site '%s' but the certificate is '%s'",
             h->source_site, peer);
    log_warn(NULL, "site link %s: %s", link_conn_peer_address(conn), err);
    send_error(conn, err, true);
    json_decref(j);
    link_conn_close(conn);
    return NULL;
  }
  return j;
}

void dest_send_error(struct link_conn *conn, const char *msg, bool fatal)
{
  send_error(conn, msg, fatal);
}

void dest_serve(struct migrations *ms, struct link_conn *conn, const struct link_msg *hello)
{
  char err[512], peer[65] = "";
  struct link_msg lm;
  int r;
  struct proto_hello h;
  json_t *hj = dest_accept_hello(ms, conn, hello, false, &h, peer, sizeof peer);
  if (!hj)
    return;
  json_decref(hj);

  struct migration *m = dest_take_session(ms, conn, &h, peer, err, sizeof err);
  if (!m) {
    log_warn(h.vm, "migration %s: refused: %s", h.session, err);
    send_error(conn, err, true);
    link_conn_close(conn);
    return;
  }
  struct session s = { .m = m, .conn = conn };
  bool end = false;
  if (strcmp(m->state, "cancelled") == 0 || strcmp(m->state, "failed") == 0) {
    snprintf(err, sizeof err, "migration %s is %s here", m->id, m->state);
    send_error(conn, err, true);
    goto out;
  }
  if ((r = open_disks(m, true, err, sizeof err)) < 0) {
    log_error(m->vm, "migration %s: %s", m->id, err);
    send_error(conn, err, true);
    if (m->applied_seq == 0 && strcmp(m->state, "receiving") == 0)
      mig_set_state(m, "failed", err);
    goto out;
  }
  /* Whatever this process applied is made durable before we say we hold it. */
  s.dirty = true;
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "up");
  pthread_mutex_unlock(&m->lock);
  if (sync_only(&s) < 0)
    goto out;
  {
    json_t *disks = json_array();
    for (unsigned i = 0; i < m->ndisks; i++)
      json_array_append_new(disks, json_pack("{s:s, s:I}", "name", m->disks[i].name, "bg_hwm",
                                             (json_int_t)m->disks[i].bg_hwm_durable));
    pthread_mutex_lock(&m->lock);
    json_t *ok = json_pack("{s:s, s:I, s:s, s:o}", "session", m->id, "applied_seq",
                           (json_int_t)m->applied_seq, "state", m->state, "disks", disks);
    pthread_mutex_unlock(&m->lock);
    if (send_json(&s, MSG_HELLO_OK, ok) < 0)
      goto out;
  }
  log_info(m->vm, "migration %s: source '%s' connected from %s (holding %llu frames)", m->id,
           peer, link_conn_peer_address(conn), (unsigned long long)m->applied_seq);

  uint64_t last_frame = now_ns();
  while (!end) {
    unsigned timeout = s.dirty ? 20 : 1000;
    r = link_recv(conn, &lm, timeout, err, sizeof err);
    uint64_t now = now_ns();
    if (r == -ETIMEDOUT) {
      if (s.dirty && sync_and_ack(&s) < 0)
        break;
      if (now - last_frame > IDLE_TIMEOUT_NS) {
        log_warn(m->vm, "migration %s: nothing from the source for %llu s; dropping the link",
                 m->id, (unsigned long long)(IDLE_TIMEOUT_NS / 1000000000));
        break;
      }
      continue;
    }
    if (r == -EBADMSG) {
      /* The payload is damaged but the stream is in step: ask again. */
      pthread_mutex_lock(&m->lock);
      m->prog.bad_frames++;
      pthread_mutex_unlock(&m->lock);
      log_warn(m->vm, "migration %s: frame %llu damaged (%s); asking for it again", m->id,
               (unsigned long long)lm.seq, err);
      if (proto_is_sequenced(lm.type) && lm.seq == m->applied_seq + 1 && s.nacked != lm.seq) {
        s.nacked = lm.seq;
        if (send_u64(&s, MSG_NACK, lm.seq) < 0)
          break;
      }
      continue;
    }
    if (r < 0) {
      if (r != -ESHUTDOWN)
        log_warn(m->vm, "migration %s: site link lost: %s", m->id, err);
      break;
    }
    last_frame = now;
    if (lm.type == MSG_PING) {
      uint64_t v;
      if (proto_u64_parse(lm.data, lm.len, &v, err, sizeof err) == 0 &&
          send_u64(&s, MSG_PONG, v) < 0)
        break;
      continue;
    }
    if (!proto_is_sequenced(lm.type)) {
      log_warn(m->vm, "migration %s: unexpected %s frame from the source", m->id,
               proto_type_name(lm.type));
      send_error(conn, "unexpected frame type", true);
      break;
    }
    if (lm.seq <= m->applied_seq) {
      pthread_mutex_lock(&m->lock);
      m->prog.duplicate_frames++;
      pthread_mutex_unlock(&m->lock);
      continue;                          /* sent again after a reconnect: we have it */
    }
    if (lm.seq != m->applied_seq + 1) {
      if (s.nacked != m->applied_seq + 1) {
        s.nacked = m->applied_seq + 1;
        if (send_u64(&s, MSG_NACK, s.nacked) < 0)
          break;
      }
      continue;                          /* waiting for the one we asked for */
    }
    s.nacked = 0;
    switch (lm.type) {
    case MSG_DATA:
      r = apply_data(&s, &lm, err, sizeof err);
      break;
    case MSG_BLOB:
      r = dest_apply_blob(m, &lm, err, sizeof err);
      break;
    default:
      m->applied_seq = lm.seq;           /* a CTRL counts as applied when it runs */
      s.dirty = true;
      r = apply_ctrl(&s, &lm, &end);
      if (r < 0)
        snprintf(err, sizeof err, "CTRL failed: %s", strerror(-r));
      break;
    }
    if (r < 0) {
      log_error(m->vm, "migration %s: frame %llu: %s", m->id, (unsigned long long)lm.seq, err);
      send_error(conn, err, r != -EIO);
      break;
    }
    if (lm.type != MSG_CTRL) {
      m->applied_seq = lm.seq;
      if (!s.dirty) {
        s.dirty = true;
        s.first_unsynced_ns = now;
      }
    }
    pthread_mutex_lock(&m->lock);
    m->prog.applied_seq = m->applied_seq;
    pthread_mutex_unlock(&m->lock);
    if (s.dirty && (s.unsynced_bytes >= DEST_SYNC_BYTES || now - s.first_unsynced_ns >= DEST_SYNC_NS))
      if (sync_and_ack(&s) < 0)
        break;
  }
  if (s.dirty && !end)
    sync_and_ack(&s);                    /* best effort: the link may be gone */
out:
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
  pthread_mutex_unlock(&m->lock);
  free(s.hashbuf);
  dest_release_session(m);
  link_conn_close(conn);
}
