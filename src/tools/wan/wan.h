/* wan: ferry-wan's internal interface, shared by its four files.
 *
 *   wan.c      entry point: flags, ready file, signals, the `ctl` client
 *   proxy.c    the event loop, the forwarded connections, delay queues, the
 *              shared per-direction rate limit, stall / cut / flip
 *   control.c  the control channel: a line protocol on a unix or loopback
 *              TCP socket, one reply line per command
 *   parse.c    durations and rates, parsed and formatted
 *
 * Naming: wan_* is called across files; everything else is static.
 * Thread model: one thread.  Every function here runs on the event loop's
 * thread (or before it starts), so nothing takes a lock. */
#ifndef FERRY_WAN_H
#define FERRY_WAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NS_PER_MS 1000000ull
#define NS_PER_S  1000000000ull

#define WAN_DELAY_MAX_NS   (60 * NS_PER_S)        /* one-way delay */
#define WAN_CUT_MAX_NS     (24 * 3600 * NS_PER_S) /* `cut DURATION` */
#define WAN_RATE_MIN_BPS   8ull                   /* 1 byte/s */
#define WAN_RATE_MAX_BPS   10000000000000ull      /* 10 Tbit/s */
#define WAN_FLIP_MAX       1000000ull             /* `flip N` */
#define WAN_CTL_LINE_MAX   1024                   /* control line, without "\n" */
#define WAN_REPLY_MAX      2048                   /* control reply, with "\n" */

#ifndef FERRY_VERSION
#define FERRY_VERSION "0.1.0"
#endif

#define container_of(ptr, type, member) \
  ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* Directions.  UP is listen side -> connect side, DOWN the way back. */
enum wan_dir { WAN_UP = 0, WAN_DOWN = 1 };

/* --- parse.c ------------------------------------------------------------ */
/* "0", "250us", "10ms", "1.5s", "2min" (units ns, us, ms, s, min; a number
 * other than 0 needs one).  Returns 0, -EINVAL, or -ERANGE above max_ns. */
int wan_parse_duration(const char *s, uint64_t max_ns, uint64_t *ns);
/* Bits per second into *bps (0 = unlimited).  Bit forms use decimal units:
 * "100mbit", "1.5gbit", "512kbit", "2000bit", or a plain number ("1000000"),
 * each optionally followed by "/s".  Byte forms use binary units, as ferry's
 * other size flags do: "12.5M", "64K", "1GiB/s", "100B" (1M = 2^20 bytes/s).
 * Returns 0, -EINVAL, or -ERANGE outside [WAN_RATE_MIN_BPS, WAN_RATE_MAX_BPS]. */
int wan_parse_rate(const char *s, uint64_t *bps);
/* "0", "10ms", "1500us", "2s". */
void wan_format_duration(uint64_t ns, char *buf, size_t len);
/* "unlimited", "100mbit", "1gbit", "104857600bit". */
void wan_format_rate(uint64_t bps, char *buf, size_t len);

/* --- proxy.c: the event loop ------------------------------------------- */
struct wan;

/* Something on the event loop.  The loop passes the epoll events to fn. */
struct wan_handler {
  void (*fn)(struct wan *w, struct wan_handler *h, uint32_t events);
};

/* Sets fd's epoll interest (0 removes it from the loop).  Returns 0 or -errno. */
int wan_watch(struct wan *w, int fd, struct wan_handler *h, uint32_t events, uint32_t *current);

struct wan_config {
  const char *listen;        /* HOST:PORT, port 0 picks one */
  const char *connect;       /* HOST:PORT */
  const char *control;       /* unix:PATH, loopback HOST:PORT, or NULL */
  uint64_t delay_ns;         /* one-way, each direction */
  uint64_t rate_bps;         /* per direction, 0 = unlimited */
};

/* Binds the listener and control socket, resolves the target.  NULL with a
 * message in err on failure. */
struct wan *wan_create(const struct wan_config *cfg, char *err, size_t errlen);
/* Runs until quit or a stop signal (SIGTERM/SIGINT/SIGHUP, which the caller
 * has blocked).  Returns 0, or -errno if the loop itself failed. */
int wan_run(struct wan *w);
void wan_destroy(struct wan *w);
const char *wan_listen_address(const struct wan *w);    /* "127.0.0.1:PORT" */
const char *wan_control_address(const struct wan *w);   /* NULL when none */

/* What the control commands do (proxy.c). */
void wan_set_delay(struct wan *w, uint64_t ns);
void wan_set_rate(struct wan *w, uint64_t bps);
void wan_set_stall(struct wan *w, bool stalled);
/* Resets every connection and refuses new ones until wan_restore, or for
 * duration_ns when that is not 0.  Returns how many connections were reset. */
unsigned wan_cut(struct wan *w, uint64_t duration_ns);
void wan_restore(struct wan *w);                        /* ends cut and stall */
void wan_flip(struct wan *w, bool up, bool down, uint64_t n);
/* One line of JSON (no newline) into buf; returns its length. */
size_t wan_stats_json(struct wan *w, char *buf, size_t len);
void wan_quit(struct wan *w);

/* --- control.c ---------------------------------------------------------- */
struct wan_control;

/* Listens on spec ("unix:PATH" or a loopback "HOST:PORT").  NULL with a
 * message in err on failure. */
struct wan_control *wan_control_start(struct wan *w, const char *spec, char *err,
                                      size_t errlen);
/* Closes every control client and the listener; removes a unix socket. */
void wan_control_stop(struct wan_control *ctl);
const char *wan_control_addr(const struct wan_control *ctl);
/* File descriptors were freed: re-arm what EMFILE paused. */
void wan_control_resume(struct wan_control *ctl);
/* Runs one command line; writes the reply line (no newline) into reply. */
void wan_control_execute(struct wan *w, char *line, char *reply, size_t len);

#endif
