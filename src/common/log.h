/* log: levelled, thread-safe log lines on stderr.
 *
 * One line per call: "2026-11-22T06:40:01.123Z ferryd[1234] WARN disk=vm1: message".
 * The disk argument names the disk a line speaks of (NULL when none) so an
 * operator can grep one disk's history out of a busy daemon.  Lines are written
 * with one write(2) so concurrent threads never interleave inside a line. */
#ifndef FERRY_LOG_H
#define FERRY_LOG_H

#include <stdbool.h>

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };

void log_init(const char *progname);
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns -1 on anything else. */
int log_parse_level(const char *s, enum log_level *out);

void log_msg(enum log_level level, const char *disk, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

#define log_error(disk, ...) log_msg(LOG_ERROR, (disk), __VA_ARGS__)
#define log_warn(disk, ...)  log_msg(LOG_WARN, (disk), __VA_ARGS__)
#define log_info(disk, ...)  log_msg(LOG_INFO, (disk), __VA_ARGS__)
#define log_debug(disk, ...) \
  do { if (log_get_level() >= LOG_DEBUG) log_msg(LOG_DEBUG, (disk), __VA_ARGS__); } while (0)

#endif
