/* snapshots: a VM's restore point, taken at the source when a warm migration
 * starts ("migrate-time snapshot"), kept until `ferry snapshot rm`.
 *
 * DESIGN
 * The VM is paused when the point is taken.  Each of its disks gets a
 * copy-before-write restore point (src/disk/snapshot.h, attached through the
 * registry so that it survives restarts): every later change to the image,
 * RPO write-backs and, after a migrate-back, the guest's own writes, first
 * saves what it overwrites.  The VM's description and its state ("RAM",
 * sim) at that instant are kept beside them:
 *
 *   DATA_DIR/snapshots/VM/meta.json    {"vm","migration","peer","created_at",
 *                                       "kind":"delta"|"image","disks":[names]}
 *   DATA_DIR/snapshots/VM/vm.json      the VM's spec
 *   DATA_DIR/snapshots/VM/state.bin    its state at the point (empty: none)
 *   DATA_DIR/snapshots/VM/DISK.snap    each disk's restore point (+ .data)
 *
 * kind "delta": the images hold later data and the .snap files what it
 * replaced.  At commit the images are rolled back to the point and the .snap
 * files dropped: kind "image", the (fenced) images are the restore point.
 * Restore rolls the images back (delta) or unfences them (image) and gives
 * the VM its state of then; data written since is lost, by design.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "disk/snapshot.h"
#include "replicate/internal.h"
#include "replicate/snapshots.h"
#include "vm/vm.h"

static void snap_dir(const struct migrations_shared *sh, const char *vm, char *buf, size_t len)
{
  fmt_into(buf, len, "%s/snapshots/%s", sh->data_dir, vm);
}

static void snap_file(const struct migrations_shared *sh, const char *vm, const char *name,
                      char *buf, size_t len)
{
  fmt_into(buf, len, "%s/snapshots/%s/%s", sh->data_dir, vm, name);
}

static json_t *load_meta(const struct migrations_shared *sh, const char *vm)
{
  char path[PATH_MAX];
  snap_file(sh, vm, "meta.json", path, sizeof path);
  return json_load_file(path, 0, NULL);
}

static int store_meta(const struct migrations_shared *sh, const char *vm, json_t *meta, char *err,
                      size_t errlen)
{
  char path[PATH_MAX];
  snap_file(sh, vm, "meta.json", path, sizeof path);
  char *text = json_dumps(meta, JSON_INDENT(2));
  if (!text) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  int r = write_file_atomic(path, text, strlen(text), 0640, err, errlen);
  free(text);
  return r < 0 ? -EIO : 0;
}

bool snapshots_exist(const struct migrations_shared *sh, const char *vm)
{
  json_t *m = load_meta(sh, vm);
  json_decref(m);
  return m != NULL;
}

int snapshots_take(const struct migrations_shared *sh, const struct vm_spec *spec,
                   const void *state, size_t len, const char *migration, const char *peer,
                   char *err, size_t errlen)
{
  char dir[PATH_MAX], path[PATH_MAX];
  snap_dir(sh, spec->name, dir, sizeof dir);
  if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
    snprintf(err, errlen, "cannot create %s: %s", dir, strerror(errno));
    return -EIO;
  }
  json_t *vj = vm_spec_to_json(spec);
  char *text = json_dumps(vj, JSON_INDENT(2));
  json_decref(vj);
  snap_file(sh, spec->name, "vm.json", path, sizeof path);
  int r = text ? write_file_atomic(path, text, strlen(text), 0640, err, errlen) : -1;
  free(text);
  snap_file(sh, spec->name, "state.bin", path, sizeof path);
  if (r == 0)
    r = write_file_atomic(path, state ? state : "", len, 0640, err, errlen);
  if (r < 0)
    return -EIO;
  json_t *disks = json_array();
  for (unsigned i = 0; i < spec->ndisks; i++) {
    char name[80];
    snprintf(name, sizeof name, "%s.snap", spec->disks[i]);
    snap_file(sh, spec->name, name, path, sizeof path);
    if ((r = registry_set_snapshot(sh->reg, spec->disks[i], path, err, errlen)) < 0) {
      for (unsigned k = 0; k < i; k++) {
        char e2[256];
        snprintf(name, sizeof name, "%s.snap", spec->disks[k]);
        snap_file(sh, spec->name, name, path, sizeof path);
        registry_set_snapshot(sh->reg, spec->disks[k], NULL, e2, sizeof e2);
        snapshot_delete(path);
      }
      json_decref(disks);
      return r;
    }
    json_array_append_new(disks, json_string(spec->disks[i]));
  }
  char at[32];
  time_t t = time(NULL);
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(at, sizeof at, "%Y-%m-%dT%H:%M:%SZ", &tm);
  json_t *meta = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o}", "vm", spec->name, "migration",
                           migration, "peer", peer, "created_at", at, "kind", "delta", "disks",
                           disks);
  r = store_meta(sh, spec->name, meta, err, errlen);
  json_decref(meta);
  if (r == 0)
    log_info(spec->name, "restore point taken for migration %s (kept until `ferry snapshot rm "
             "%s`)", migration, spec->name);
  return r;
}

int snapshots_read_state(const struct migrations_shared *sh, const char *vm, void **buf,
                         size_t *len)
{
  char path[PATH_MAX];
  snap_file(sh, vm, "state.bin", path, sizeof path);
  FILE *f = fopen(path, "rb");
  if (!f)
    return -errno;
  struct stat st;
  if (fstat(fileno(f), &st) < 0 || st.st_size > (64 << 20)) {
    fclose(f);
    return -EIO;
  }
  *len = (size_t)st.st_size;
  *buf = malloc(*len ? *len : 1);
  size_t got = *buf ? fread(*buf, 1, *len, f) : 0;
  fclose(f);
  if (!*buf || got != *len) {
    free(*buf);
    *buf = NULL;
    return -EIO;
  }
  return 0;
}

int snapshots_commit(const struct migrations_shared *sh, const char *vm, const char *peer,
                     char *err, size_t errlen)
{
  json_t *meta = load_meta(sh, vm);
  if (!meta) {
    snprintf(err, errlen, "VM '%s' has no restore point", vm);
    return -ENOENT;
  }
  json_t *disks = json_object_get(meta, "disks");
  size_t i;
  json_t *x;
  int r = 0;
  /* The images go back to the point; then the deltas are no longer needed. */
  json_array_foreach(disks, i, x) {
    const char *name = json_string_value(x);
    struct disk *d = name ? registry_get(sh->reg, name) : NULL;
    if (!d)
      continue;
    if (disk_has_snapshot(d) && (r = disk_restore_snapshot(d, err, errlen)) < 0) {
      disk_unref(d);
      break;
    }
    char reason[200], path[PATH_MAX], file[80];
    fmt_into(reason, sizeof reason, "restore point of VM '%s' (it runs at site '%s' since the "
             "commit)", vm, peer);
    registry_set_fence(sh->reg, name, reason, err, errlen);
    snprintf(file, sizeof file, "%s.snap", name);
    snap_file(sh, vm, file, path, sizeof path);
    if (registry_set_snapshot(sh->reg, name, NULL, err, errlen) == 0)
      snapshot_delete(path);
    disk_unref(d);
  }
  if (r == 0) {
    json_object_set_new(meta, "kind", json_string("image"));
    r = store_meta(sh, vm, meta, err, errlen);
  }
  json_decref(meta);
  return r;
}

json_t *snapshots_list_json(const struct migrations_shared *sh)
{
  json_t *arr = json_array();
  char dir[PATH_MAX];
  fmt_into(dir, sizeof dir, "%s/snapshots", sh->data_dir);
  DIR *d = opendir(dir);
  struct dirent *e;
  while (d && (e = readdir(d))) {
    if (e->d_name[0] == '.' || !name_is_valid(e->d_name))
      continue;
    json_t *meta = load_meta(sh, e->d_name);
    if (!meta)
      continue;
    uint64_t saved = 0;
    json_t *disks = json_object_get(meta, "disks");
    size_t i;
    json_t *x;
    json_array_foreach(disks, i, x) {
      const char *name = json_string_value(x);
      struct disk *dk = name ? registry_get(sh->reg, name) : NULL;
      uint64_t b = 0, created = 0;
      if (dk && disk_snapshot_info(dk, &b, &created))
        saved += b;
      else if (dk)
        saved += disk_allocated_bytes(dk);   /* kind image: the image is the point */
      disk_unref(dk);
    }
    json_object_set_new(meta, "bytes", json_integer((json_int_t)saved));
    json_array_append_new(arr, meta);
  }
  if (d)
    closedir(d);
  return json_pack("{s:o}", "snapshots", arr);
}

int snapshots_remove(const struct migrations_shared *sh, const char *vm, bool vm_active,
                     char *err, size_t errlen)
{
  json_t *meta = load_meta(sh, vm);
  if (!meta) {
    snprintf(err, errlen, "VM '%s' has no restore point here", vm);
    return -ENOENT;
  }
  if (vm_active) {
    json_decref(meta);
    snprintf(err, errlen, "a warm migration of VM '%s' is going on: its restore point stays "
             "until it is committed or back", vm);
    return -EBUSY;
  }
  bool image = strcmp(json_string_value(json_object_get(meta, "kind")) ?: "", "image") == 0;
  json_t *disks = json_object_get(meta, "disks");
  size_t i;
  json_t *x;
  int r = 0;
  json_array_foreach(disks, i, x) {
    const char *name = json_string_value(x);
    if (!name)
      continue;
    char path[PATH_MAX], file[80];
    snprintf(file, sizeof file, "%s.snap", name);
    snap_file(sh, vm, file, path, sizeof path);
    struct disk *d = registry_get(sh->reg, name);
    if (d && image && disk_fenced(d)) {
      /* After a commit the kept images are the restore point: they go. */
      disk_unref(d);
      d = NULL;
      if ((r = registry_remove(sh->reg, name, true, err, errlen)) < 0)
        break;
    } else if (d && disk_has_snapshot(d)) {
      if ((r = registry_set_snapshot(sh->reg, name, NULL, err, errlen)) < 0) {
        disk_unref(d);
        break;
      }
    }
    disk_unref(d);
    snapshot_delete(path);
  }
  json_decref(meta);
  if (r < 0)
    return r;
  const char *files[] = { "meta.json", "vm.json", "state.bin" };
  char path[PATH_MAX];
  for (size_t k = 0; k < ARRAY_SIZE(files); k++) {
    snap_file(sh, vm, files[k], path, sizeof path);
    unlink(path);
  }
  snap_dir(sh, vm, path, sizeof path);
  rmdir(path);
  fsync_parent_dir(path);
  log_info(vm, "restore point removed");
  return 0;
}

int snapshots_restore(const struct migrations_shared *sh, const char *vm, bool vm_active,
                      char *err, size_t errlen)
{
  json_t *meta = load_meta(sh, vm);
  if (!meta) {
    snprintf(err, errlen, "VM '%s' has no restore point here", vm);
    return -ENOENT;
  }
  if (vm_active) {
    json_decref(meta);
    snprintf(err, errlen, "a warm migration of VM '%s' is going on: end it first (ferry "
             "migrate-back or ferry commit)", vm);
    return -EBUSY;
  }
  char st[16];
  if (vm_state(sh->vms, vm, st, sizeof st) == 0 && strcmp(st, "stopped") != 0 &&
      strcmp(st, "migrated") != 0) {
    json_decref(meta);
    snprintf(err, errlen, "VM '%s' is %s here: stop it first (ferry vm stop %s)", vm, st, vm);
    return -EBUSY;
  }
  json_t *disks = json_object_get(meta, "disks");
  size_t i;
  json_t *x;
  int r = 0;
  json_array_foreach(disks, i, x) {
    const char *name = json_string_value(x);
    struct disk *d = name ? registry_get(sh->reg, name) : NULL;
    if (!d) {
      snprintf(err, errlen, "disk '%s' of the restore point is gone", name ? name : "?");
      r = -ENOENT;
      break;
    }
    if (disk_has_snapshot(d))
      r = disk_restore_snapshot(d, err, errlen);
    if (r == 0)
      r = registry_set_fence(sh->reg, name, NULL, err, errlen);
    disk_unref(d);
    if (r < 0)
      break;
  }
  if (r == 0) {
    void *state = NULL;
    size_t len = 0;
    r = snapshots_read_state(sh, vm, &state, &len);
    if (r < 0)
      snprintf(err, errlen, "the restore point's VM state cannot be read: %s", strerror(-r));
    else
      r = vm_restore_state(sh->vms, vm, state, len, err, errlen);
    free(state);
  }
  if (r == 0)
    log_warn(vm, "rolled back to the restore point of %s; data written since is gone",
             json_string_value(json_object_get(meta, "created_at")) ?: "?");
  json_decref(meta);
  return r;
}
