/* group_commit: many threads that each need "everything I did so far is
 * durable" share one commit (an fdatasync, a map write) instead of paying
 * one each.
 *
 * DESIGN
 * Commits are numbered 1, 2, ...  A caller's request is covered by the first
 * commit that STARTS after the request was made (a commit running at that
 * moment may have taken its snapshot already, so it does not count).  The
 * caller either runs that commit itself (none running: it becomes the
 * committer, on its own thread) or waits for whoever runs it.  While one
 * commit runs, every caller that arrives waits for the next one, and the
 * first of them to wake runs it for all: N concurrent callers cost about two
 * commits, not N.  There is no thread; a mutex and a condition variable.
 *
 * Errors: group_commit_wait() returns the error of a failed commit numbered
 * at or after the caller's (a later failure is reported too: conservative).
 * A committer should make its failures sticky (fail every later commit):
 * an fdatasync that failed once cannot vouch for what it did not write.
 *
 * Thread model: every function but init/destroy may be called from any
 * thread at once.  commit() runs with no group_commit lock held. */
#ifndef FERRY_GROUP_COMMIT_H
#define FERRY_GROUP_COMMIT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

struct group_commit {
  pthread_mutex_t lock;
  pthread_cond_t done_cond;       /* a commit finished */
  int (*commit)(void *opaque);    /* 0 or -errno */
  void *opaque;
  uint64_t started;               /* commits started (the running one included) */
  uint64_t done;                  /* commits finished; commits finish in order */
  uint64_t fail_seq;              /* the latest commit that failed (0: none) */
  int fail_err;                   /* its error */
  bool running;                   /* a caller is inside commit() */
};

void group_commit_init(struct group_commit *g, int (*commit)(void *opaque), void *opaque);
void group_commit_destroy(struct group_commit *g);
/* Blocks until a commit that started after this call has finished; returns
 * 0 or the -errno of a failed commit (see above). */
int group_commit_wait(struct group_commit *g);
/* Commits run since init (diagnostics and tests). */
uint64_t group_commit_count(struct group_commit *g);

#endif
