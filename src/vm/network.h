/* network: the table of this site's networks, what a VM's NICs attach to
 * (internal to src/vm; the public face is vm_network_* in vm.h, which adds
 * the manager's lock and the "in use by a VM" checks).
 *
 * Table (module "network" in ferry.db):
 *   networks(name TEXT PRIMARY KEY, type TEXT ('user' | 'bridge'),
 *            bridge TEXT (the Linux bridge of a 'bridge' network, else NULL),
 *            created_at TEXT)
 * A network is only a name and how QEMU reaches it (docs/qemu.md
 * "Networks"); ferry does not create bridges. */
#ifndef FERRY_VM_NETWORK_H
#define FERRY_VM_NETWORK_H

#include <jansson.h>
#include <stddef.h>

struct db;

struct vm_netdev {
  char name[65];
  char type[8];            /* "user" | "bridge" */
  char bridge[16];         /* IFNAMSIZ - 1; "" for user */
};

/* Brings the table to its current version.  0 or -1 with err. */
int net_table_open(struct db *db, char *err, size_t errlen);
/* Checks name, type and bridge; -EINVAL with err. */
int net_check(const char *name, const char *type, const char *bridge, char *err, size_t errlen);
/* -EEXIST name taken, -EIO. */
int net_insert(struct db *db, const char *name, const char *type, const char *bridge, char *err,
               size_t errlen);
int net_delete(struct db *db, const char *name, char *err, size_t errlen);
/* 0 with *out, -ENOENT none, -EIO. */
int net_get(struct db *db, const char *name, struct vm_netdev *out);
/* {"name","type","bridge","created_at"} of every network, by name. */
json_t *net_list(struct db *db);

#endif
