/* internal: what migration.c, source.c, dest.c and hash.c share.  Not for
 * use outside src/replicate.
 *
 * struct migration is one row of the migrations table plus its live state.
 * Its lock guards every field marked (L); fields marked (T) belong to the
 * thread that runs the migration (the source driver, or the destination
 * session's connection thread) and are read by others only through the
 * progress snapshot it publishes under the lock. */
#ifndef FERRY_REPLICATE_INTERNAL_H
#define FERRY_REPLICATE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/bitmap.h"
#include "disk/throttle.h"
#include "replicate/migration.h"
#include "replicate/proto.h"
#include "vm/vm.h"

struct disk;
struct link_conn;
struct link_msg;

#define MIG_ID_LEN 16
#define WINDOW_MIN (4u * 1024 * 1024)      /* unacknowledged payload in flight: at least */
#define WINDOW_MAX (64u * 1024 * 1024)     /* ... and at most (memory bound) */
#define CHUNK_BYTES (1024u * 1024)         /* largest DATA payload we send */
#define DEST_SYNC_BYTES (2u * 1024 * 1024) /* the destination syncs and acks after this */
#define DEST_SYNC_NS (50ull * 1000000)     /* ... or this long after the first unsynced frame */

/* One frame sent and not yet acknowledged (source).  Kept so that it can be
 * sent again after a NACK (same seq) or a reconnect (DATA only, renumbered). */
struct ring_entry {
  uint64_t seq;
  uint8_t type;
  bool background;                 /* DATA from the background cursor */
  uint32_t disk;
  uint64_t off, len;               /* DATA: range */
  void *payload;                   /* malloc'ed copy of the frame payload */
  uint32_t plen;
};

struct mig_disk {
  char name[65];
  struct disk *d;                  /* this site's disk (a reference) */
  uint64_t size, gran, nregions;

  /* source (T) */
  struct bitmap pending;           /* regions to send again (behind the cursor) */
  struct bitmap verified;          /* regions found equal at the destination */
  uint64_t cursor;                 /* background copy: bytes sent so far */
  uint64_t acked_bg;               /* background bytes the destination holds durably */
  uint64_t sweep;                  /* verify sweep: next region */
  uint64_t resend_mark;            /* after a restart: background sent up to here before */
  char pending_path[4096];
  uint64_t *seg_alloc;             /* allocated bytes per 64 MiB segment, at start */
  uint64_t nseg;

  /* destination (T) */
  uint64_t bg_hwm;                 /* background data applied up to here */
  uint64_t bg_hwm_durable;
};

/* The progress snapshot the API reads (L). */
struct mig_progress {
  char phase[24];                  /* background, foreground, converging, cutover, ... */
  char verdict[200];
  char link_state[24];             /* up, connecting, down */
  char link_error[256];
  uint64_t bytes_total;            /* background data to copy (allocated at start) */
  uint64_t bytes_left;             /* background data not yet copied; never goes up */
  uint64_t backlog_bytes;          /* dirty data behind the cursor not yet sent */
  double backlog_trend_bps;        /* + growing, - shrinking */
  double link_bps;                 /* wire bytes per second */
  double repl_bps;                 /* payload bytes the destination acknowledged per second */
  double capacity_bps;             /* what the link can carry, as far as we have seen */
  double vm_write_bps;             /* the VM's writes to its disks */
  double dirty_bps;                /* newly dirtied bytes per second */
  double eta_s;                    /* -1: unknown / not converging */
  uint64_t backpressure_bps;       /* VM write limit set by write backpressure, 0 = none */
  uint64_t rate_limit_bps;         /* replication cap */
  int zstd_level;                  /* compression level now (adapted to link and CPU) */
  uint64_t wire_bytes_sent, payload_bytes_sent;   /* wire: closed connections + the open one */
  uint64_t data_bytes_sent;        /* DATA payload (not zero ranges) */
  uint64_t zero_bytes_sent;        /* logical bytes sent as zero ranges */
  uint64_t bg_data_bytes, fg_data_bytes;
  uint64_t resent_bytes;           /* sent again after a reconnect, NACK or restart */
  uint64_t resent_frames, nacks, reconnects, restarts;
  uint64_t verify_repairs;         /* regions the sweep found different and not dirty */
  uint64_t verified_regions;
  uint64_t downtime_ms;            /* pause to resume, after cutover */
  uint64_t cutover_started_ns;     /* realtime of the pause request (survives restarts) */
  uint64_t cutover_attempts;
  uint64_t final_drain_bytes;
  uint64_t ram_bytes_sent, ram_bytes_left;   /* qemu live: QEMU's RAM migration */
  uint64_t verify_regions_at_cutover;
  /* destination */
  uint64_t applied_seq, durable_seq;
  uint64_t received_bytes, duplicate_frames, bad_frames;
};

struct migration {
  struct migrations *ms;
  pthread_mutex_t lock;
  pthread_cond_t cond;             /* acks, replies, link state, cancel (L) */

  char id[MIG_ID_LEN];
  char role[12];                   /* "source" | "destination" */
  char vm[65];
  char peer[65];
  char mode[8];
  char state[24];                  /* (L) */
  char error[512];                 /* (L) */
  char created_at[32], finished_at[32];
  uint64_t max_downtime_ms;
  bool verify_full;
  struct throttle rate;            /* replication backpressure */
  struct vm_spec vmspec;            /* as the destination gets it (networks mapped) */
  json_t *preflight;               /* the checks that let it start (source) */

  unsigned ndisks;
  struct mig_disk disks[PROTO_MAX_DISKS];

  struct mig_progress prog;        /* (L) */

  /* source */
  pthread_t thread;
  bool thread_started;
  bool cancel;                     /* (L) operator asked */
  bool stop;                       /* (L) ferryd is stopping: persist and leave */
  struct link_conn *conn;          /* (L) current connection, NULL when down */
  bool conn_dead;                  /* (L) the receiver saw the connection fail */
  pthread_t receiver;
  bool receiver_started;
  uint64_t next_seq;               /* (T) */
  uint64_t acked_seq;              /* (L) */
  uint64_t nack_from;              /* (L) 0: none pending */
  struct ring_entry *ring;         /* (L) oldest first */
  size_t ring_n, ring_cap, ring_bytes;
  size_t window;                   /* (L) current window, WINDOW_MIN..WINDOW_MAX */
  uint64_t next_req;               /* (T) */
  json_t *reply;                   /* (L) the awaited CTRL reply */
  uint64_t reply_req;
  void *hashes;                    /* (L) the awaited HASHES payload (malloc'ed) */
  uint32_t hashes_len;
  uint64_t last_heard_ns;          /* (L) any frame from the destination */
  bool remote_fatal;               /* (L) the destination refused for good */
  uint64_t wire_base;              /* (L) wire bytes of the connections closed so far */

  /* destination */
  struct link_conn *owner;         /* (L) connection serving the session */
  bool owner_busy;                 /* (L) */
  uint64_t applied_seq;            /* (T) */
  uint8_t *blob;                   /* (T) VM state being received */
  uint64_t blob_total, blob_have;
  bool blob_ready;                 /* (T) checked and on disk */

  /* warm (warm_source.c, warm_dest.c) */
  struct proto_warm_params warm;   /* as asked (source) or received (destination) */
  struct warm_src *wsrc;           /* source driver's state (T) */
  struct warm_dst *wdst;           /* destination's state: lives as long as the migration */
  json_t *warm_prog;               /* (L) figures: persisted in progress as "warm" */
  char warm_cmd[16];               /* (L) operator's request: commit, back, back-rpo, rpo-now */
  uint64_t warm_cmd_seq, warm_cmd_done_seq;   /* (L) request numbers, to wait for the answer */
  int warm_cmd_result;             /* (L) 0 or -errno of the last request answered */
  char warm_cmd_error[512];        /* (L) */
};

/* migration.c */
void mig_set_state(struct migration *m, const char *state, const char *error);
int mig_persist(struct migration *m);      /* row: state, progress, error */
void mig_get_peer_link(struct migration *m, char *link, size_t len, char *fp, size_t fplen);
struct migrations_shared {
  const char *data_dir;
  struct db *db;
  struct registry *reg;
  struct site *site;
  struct vm_manager *vms;
};
const struct migrations_shared *mig_shared(struct migration *m);
const struct migrations_shared *migrations_shared(struct migrations *ms);
struct migration *mig_create_destination(struct migrations *ms, const struct proto_hello *h,
                                         const char *peer, char *err, size_t errlen);
struct migration *mig_find(struct migrations *ms, const char *id);   /* no ref counting:
                                                                        migrations live as
                                                                        long as ms */
void mig_dir(struct migration *m, char *buf, size_t len);
json_t *mig_progress_json(struct migration *m);    /* caller holds m->lock */
void mig_progress_from_json(struct migration *m, json_t *p);

/* source.c */
void *source_main(void *arg);

/* warm_source.c / warm_dest.c */
void *warm_source_main(void *arg);
/* Serves a link connection whose first frame was WARM_HELLO. */
void warm_dest_serve(struct migrations *ms, struct link_conn *conn, const struct link_msg *hello);
int warm_dest_recover(struct migration *m);     /* at start */
void warm_dest_close(struct migration *m);      /* stops and frees the destination's state */
/* The figures of a warm migration for the API (caller holds m->lock). */
json_t *warm_status_json_locked(struct migration *m);
bool mig_terminal(const char *state);

/* dest.c */
struct link_msg;
/* Parses and checks a (WARM_)HELLO and that the certificate is the site it
 * names; the parsed JSON (the caller frees it), or NULL after an ERROR went
 * out and the connection was closed. */
json_t *dest_accept_hello(struct migrations *ms, struct link_conn *conn,
                          const struct link_msg *hello, bool warm, struct proto_hello *h,
                          char *peer, size_t peerlen);
void dest_send_error(struct link_conn *conn, const char *msg, bool fatal);
/* Finds or creates the session's migration and makes conn its owner (an
 * older connection is shut down first); dest_release_session lets go. */
struct migration *dest_take_session(struct migrations *ms, struct link_conn *conn,
                                    const struct proto_hello *h, const char *peer,
                                    char *err, size_t errlen);
void dest_release_session(struct migration *m);
/* A BLOB frame: the next piece of the VM state into m->blob. */
int dest_apply_blob(struct migration *m, const struct link_msg *lm, char *err, size_t errlen);
/* Serves a link connection whose first frame (hello) was HELLO. */
void dest_serve(struct migrations *ms, struct link_conn *conn, const struct link_msg *hello);
int dest_recover(struct migration *m);     /* at start: reopen the session's disks */

/* hash.c: the region hash both sides compute (XXH3-64 of the region's
 * bytes; a region that is a hole hashes as zeros without being read).
 * region_hash returns 0 (read and hashed), 1 (a hole: not read) or -errno. */
int region_hash(struct disk *d, uint64_t gran, uint64_t region, void *buf, uint64_t *out);
uint64_t zero_region_hash(uint64_t gran);
bool buffer_is_zero(const void *buf, size_t len);

#endif
