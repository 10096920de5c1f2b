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
};

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
json_t *migrations_list_json(struct migrations *ms);
json_t *migration_json(struct migrations *ms, const char *id, char *err, size_t errlen);

/* link_conn_fn for the site link listener: runs a destination session. */
void migrations_serve_conn(void *ms, struct link_conn *conn);

#endif
