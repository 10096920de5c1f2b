/* migration: the migrations of a site, both roles, and the entry points the
 * REST API, the link listener and ferryd's start-up use.
 *
 * A migration moves one VM and its disks from this site (role "source") to a
 * paired peer (role "destination" there).  Live mode moves a running VM (for
 * qemu its RAM goes through QEMU's own migration, tunnelled over the site
 * link); cold mode powers the VM down, copies, and boots it at the
 * destination (docs/migration.md):
 *
 *   source:       starting -> replicating -> cutover -> committing -> completed
 *                 any state before committing -> cancelled | failed (the VM
 *                 keeps running here, the destination is cleaned up)
 *   destination:  receiving -> activating -> active -> completed
 *                 receiving -> cancelled (disks removed)
 *   warm source:  starting -> activating -> warm -> committed | returning -> returned
 *                 | recovered (back to the last RPO point); failed before the VM ran there
 *   warm dest.:   receiving -> warm -> committed | returned
 *
 * Every migration is a row in ferry.db (module "migration"):
 *   migrations(id TEXT PRIMARY KEY, role TEXT, vm TEXT, peer TEXT, mode TEXT,
 *              state TEXT, params TEXT (JSON), progress TEXT (JSON),
 *              error TEXT, created_at TEXT, updated_at TEXT, finished_at TEXT)
 * and per-disk files in DATA_DIR/migrations/ID/ (the source's pending maps,
 * the destination's copy of the VM state).  A ferryd that starts resumes
 * every migration that was not finished: the source reconnects and goes on
 * from what the destination holds; the destination waits for it.
 *
 * Thread model: all functions are thread-safe.  Each source migration runs
 * on a thread of its own (plus a receiver thread per link connection); each
 * destination session runs on the link listener's thread for its
 * connection.
 */
#ifndef FERRY_MIGRATION_H
#define FERRY_MIGRATION_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct db;
struct registry;
struct site;
struct vm_manager;
struct link_conn;
struct migrations;

struct migration_deps {
  const char *data_dir;
  struct db *db;
  struct registry *reg;
  struct site *site;
  struct vm_manager *vms;
};

struct migrations *migrations_open(const struct migration_deps *deps, char *err, size_t errlen);
/* Resumes unfinished source migrations (call once the site link can dial). */
void migrations_resume_all(struct migrations *ms);
/* Stops every migration thread (their progress is persisted; they resume at
 * the next start) and closes every session. */
void migrations_close(struct migrations *ms);

#define NETWORK_MAP_MAX 8
/* --map-network SRC=DST pairs: the VM's NICs on network SRC here join DST at
 * the destination; an unmapped network keeps its name. */
struct network_map {
  unsigned n;
  char from[NETWORK_MAP_MAX][65];
  char to[NETWORK_MAP_MAX][65];
};

struct migrate_request {
  char vm[65];
  char to[256];                /* peer name or API URL */
  char mode[8];                /* "live" | "cold" */
  uint64_t max_downtime_ms;    /* 0: default 500 */
  uint64_t rate_limit_bps;     /* replication cap, 0 = none */
  bool verify_full;            /* hash every region during the cutover pause */
  struct network_map networks;
  bool preflight_only;         /* run the checks, start nothing */
  /* warm */
  uint64_t rpo_s;              /* write-back interval, 0: DEFAULT_RPO_S */
  uint64_t cache_size;         /* cache space per disk, 0: 15% of it, >= 3 GiB, <= the disk */
  char prefetch[8];            /* "hot" (default) | "none" */
  uint64_t hydrate_bps;        /* background hydration rate ... */
  bool hydrate_set;            /* ... when given (0 = off); else DEFAULT_HYDRATE_BPS */
  uint64_t degraded_after_s;   /* 0: DEFAULT_DEGRADED_AFTER_S */
};
#define DEFAULT_RPO_S (20 * 60)                     /* the seeds' RPO */
#define DEFAULT_DEGRADED_AFTER_S (5 * 60)           /* link or misses stuck this long */
#define DEFAULT_HYDRATE_BPS (UINT64_C(64) << 20)    /* background hydration, bytes/s */

/* Warm migrations, at the source: commit (the destination becomes the only
 * copy), back (Try Before Commit: the VM comes back with every write),
 * back-rpo (the destination is gone: the VM restarts here from the last RPO
 * point), rpo-now (a write-back point at once).  Waits up to wait_s for the
 * answer.  id may be a migration id or the VM's name. */
int migrations_warm_command(struct migrations *ms, const char *id, const char *cmd,
                            unsigned wait_s, char *err, size_t errlen);

/* Runs the pre-flight checks (preflight.c), then starts the migration.
 * *preflight (may be NULL) gets the list of checks whenever they ran.
 * With preflight_only, returns after the checks (id_out "").  Errors:
 * -EINVAL bad request, -ENOENT no such VM/peer/migration, -EBUSY the VM is
 * claimed or in the wrong state, -EHOSTUNREACH link off, -EPERM a pre-flight
 * check failed (nothing changed anywhere). */
int migrations_start(struct migrations *ms, const struct migrate_request *req, char *id_out,
                     size_t idlen, json_t **preflight, char *err, size_t errlen);
int migrations_cancel(struct migrations *ms, const char *id, char *err, size_t errlen);
int migrations_set_rate_limit(struct migrations *ms, const char *id, uint64_t bps, char *err,
                              size_t errlen);
/* Restore points kept at this site (snapshots.c). */
json_t *migrations_snapshots_json(struct migrations *ms);
/* restore: roll VM back to its restore point (data written since is lost);
 * else remove the restore point.  Refused while a warm migration of the VM
 * is not over. */
int migrations_snapshot_op(struct migrations *ms, const char *vm, bool restore, char *err,
                           size_t errlen);
json_t *migrations_list_json(struct migrations *ms);
json_t *migration_json(struct migrations *ms, const char *id, char *err, size_t errlen);

/* link_conn_fn for the site link listener: runs a destination session. */
void migrations_serve_conn(void *ms, struct link_conn *conn);

#endif
