/* group_commit: one commit shared by every caller waiting for it (see
 * group_commit.h for the numbering rule and the error rule). */
#include "common/group_commit.h"

void group_commit_init(struct group_commit *g, int (*commit)(void *opaque), void *opaque)
{
  pthread_mutex_init(&g->lock, NULL);
  pthread_cond_init(&g->done_cond, NULL);
  g->commit = commit;
  g->opaque = opaque;
  g->started = g->done = g->fail_seq = 0;
  g->fail_err = 0;
  g->running = false;
}

void group_commit_destroy(struct group_commit *g)
{
  pthread_cond_destroy(&g->done_cond);
  pthread_mutex_destroy(&g->lock);
}

int group_commit_wait(struct group_commit *g)
{
  pthread_mutex_lock(&g->lock);
  /* Whether or not one is running now, the next to start covers us: a
   * running commit may have taken its snapshot before our request. */
  uint64_t target = g->started + 1;
  while (g->done < target) {
    if (g->running) {
      pthread_cond_wait(&g->done_cond, &g->lock);
      continue;
    }
    /* None running, so started == done < target: ours is the next one. */
    g->running = true;
    uint64_t seq = ++g->started;
    pthread_mutex_unlock(&g->lock);
    int r = g->commit(g->opaque);
    pthread_mutex_lock(&g->lock);
    g->done = seq;
    if (r < 0) {
      g->fail_seq = seq;
      g->fail_err = r;
    }
    g->running = false;
    pthread_cond_broadcast(&g->done_cond);
  }
  int r = g->fail_seq >= target ? g->fail_err : 0;
  pthread_mutex_unlock(&g->lock);
  return r;
}

uint64_t group_commit_count(struct group_commit *g)
{
  pthread_mutex_lock(&g->lock);
  uint64_t n = g->done;
  pthread_mutex_unlock(&g->lock);
  return n;
}
