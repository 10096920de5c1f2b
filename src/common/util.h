/* util: small helpers shared by every component: sizes, time, full reads and
 * writes, names, cleanup attributes. */
#ifndef FERRY_UTIL_H
#define FERRY_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/types.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))

static inline void cleanup_free(void *p) { free(*(void **)p); }
#define CLEANUP_FREE __attribute__((cleanup(cleanup_free)))

/* Parses "4096", "64K", "64KiB", "1.5G", "2T" (binary units, case-insensitive,
 * optional trailing "B"/"iB").  Returns 0, or -1 with errno EINVAL/ERANGE. */
int parse_size(const char *s, uint64_t *out);
/* Formats bytes as "1.5 GiB" / "512 B". */
void format_size(uint64_t bytes, char *buf, size_t len);
/* Parses a rate such as "50M", "50M/s", "0" (off) in bytes per second. */
int parse_rate(const char *s, uint64_t *out);

uint64_t now_ns(void);       /* CLOCK_MONOTONIC */
uint64_t realtime_ns(void);
/* pthread_cond_timedwait for at most ms milliseconds, on a condition made with
 * CLOCK_MONOTONIC (pthread_condattr_setclock); the caller holds mu. */
void cond_timedwait_ms(pthread_cond_t *cond, pthread_mutex_t *mu, unsigned ms);  /* CLOCK_REALTIME, for timestamps shown to people */

/* Loop until all of buf is transferred.  Return 0, or -1 with errno set;
 * read_full sets errno to 0 and returns -1 on EOF before the first byte, and
 * EPIPE on EOF in the middle. */
int read_full(int fd, void *buf, size_t len);
int write_full(int fd, const void *buf, size_t len);
int pread_full(int fd, void *buf, size_t len, off_t off);
int pwrite_full(int fd, const void *buf, size_t len, off_t off);

/* fsync the directory that holds path, so a create or rename in it is durable. */
int fsync_parent_dir(const char *path);

/* Replaces path with len bytes of buf, durably and atomically: a temp file
 * beside it (PATH.tmp), written and fsynced, renamed over path, the directory
 * fsynced.  A reader (or a crash) sees the old file, no file, or the whole
 * new one.  Returns 0, or -1 with errno set and a message in err. */
int write_file_atomic(const char *path, const void *buf, size_t len, mode_t mode, char *err,
                      size_t errlen);

/* snprintf that says whether it all fitted: 0, or -1 when buf was too small
 * (the text is cut, NUL-terminated).  For paths and messages built from
 * bounded parts, where a cut is an error to report or cannot happen. */
int fmt_into(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Disk and export names: 1..64 chars of [A-Za-z0-9._-], not starting with '.' or '-'. */
bool name_is_valid(const char *name);

/* Parses "HOST:PORT" or "[V6]:PORT"; host is copied into host (NUL-terminated). */
int parse_host_port(const char *s, char *host, size_t hostlen, uint16_t *port);

#endif
