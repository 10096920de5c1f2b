/* snapshots: restore points of VMs at a warm migration's source (snapshots.c
 * has the design and the files).  Thread-safe as far as the registry and the
 * VM manager are; one operation per VM at a time is the caller's business. */
#ifndef FERRY_SNAPSHOTS_H
#define FERRY_SNAPSHOTS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct migrations_shared;
struct vm_spec;

bool snapshots_exist(const struct migrations_shared *sh, const char *vm);
/* The VM is paused: its disks get restore points, its spec and state are kept. */
int snapshots_take(const struct migrations_shared *sh, const struct vm_spec *spec,
                   const void *state, size_t len, const char *migration, const char *peer,
                   char *err, size_t errlen);
/* The state kept with the point (malloc'ed). */
int snapshots_read_state(const struct migrations_shared *sh, const char *vm, void **buf,
                         size_t *len);
/* At commit: the images go back to the point and are kept, fenced, as it. */
int snapshots_commit(const struct migrations_shared *sh, const char *vm, const char *peer,
                     char *err, size_t errlen);
json_t *snapshots_list_json(const struct migrations_shared *sh);
/* vm_active: a warm migration of the VM is not over (refused). */
int snapshots_remove(const struct migrations_shared *sh, const char *vm, bool vm_active,
                     char *err, size_t errlen);
int snapshots_restore(const struct migrations_shared *sh, const char *vm, bool vm_active,
                      char *err, size_t errlen);

#endif
