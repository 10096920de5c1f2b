/* fill: `ferry-simvm fill`: writes the first P percent of every disk
 * sequentially in 1 MiB IOs (4 in flight), every block at generation 1, so
 * that a benchmark or a migration test starts from disks full of checkable
 * data.  The table is updated per acknowledged IO, as the IO thread does. */
#ifndef FERRY_SIMVM_FILL_H
#define FERRY_SIMVM_FILL_H

#include <stddef.h>

#include "vm/simvm/state.h"

/* uris[i] belongs to st->disks[i]; percent in 0..100.  Returns 0, or -1
 * with err (blocks whose write failed are uncertain in st; the caller saves
 * st either way). */
int sim_fill(struct sim_state *st, const char *const *uris, double percent, char *err,
             size_t errlen);

#endif
