/* log: see log.h. */
#include "common/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int current_level = LOG_INFO;
static const char *log_progname = "ferry";

static const char *const level_names[] = { "ERROR", "WARN", "INFO", "DEBUG" };

void log_init(const char *progname) { log_progname = progname; }
void log_set_level(enum log_level level) { current_level = level; }
enum log_level log_get_level(void) { return (enum log_level)current_level; }

int log_parse_level(const char *s, enum log_level *out)
{
  static const char *const names[] = { "error", "warn", "info", "debug" };
  for (int i = 0; i < 4; i++) {
    if (strcasecmp(s, names[i]) == 0) {
      *out = (enum log_level)i;
      return 0;
    }
  }
  return -1;
}

void log_msg(enum log_level level, const char *disk, const char *fmt, ...)
{
  if ((int)level > current_level)
    return;

  char line[2048];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s[%d] %s ",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                   tm.tm_sec, ts.tv_nsec / 1000000, log_progname, (int)getpid(),
                   level_names[level]);
  if (disk && n < (int)sizeof line)
    n += snprintf(line + n, sizeof line - n, "disk=%s: ", disk);
  if (n < (int)sizeof line) {
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
  }
  if (n >= (int)sizeof line - 1)
    n = sizeof line - 2;
  line[n++] = '\n';
  ssize_t r = write(STDERR_FILENO, line, n);
  (void)r;
}
