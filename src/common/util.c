/* util: see util.h. */
#include "common/util.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

int parse_size(const char *s, uint64_t *out)
{
  if (!s || !*s || *s == '-' || isspace((unsigned char)*s)) {
    errno = EINVAL;
    return -1;
  }
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || !isfinite(v) || v < 0) {
    errno = errno ? errno : EINVAL;
    return -1;
  }
  static const struct { const char *suffix; int shift; } units[] = {
    { "", 0 }, { "b", 0 },
    { "k", 10 }, { "kb", 10 }, { "kib", 10 },
    { "m", 20 }, { "mb", 20 }, { "mib", 20 },
    { "g", 30 }, { "gb", 30 }, { "gib", 30 },
    { "t", 40 }, { "tb", 40 }, { "tib", 40 },
    { "p", 50 }, { "pb", 50 }, { "pib", 50 },
  };
  /* Whole numbers are parsed exactly: a double has only 53 bits. */
  size_t digits = strspn(s, "0123456789");
  bool integer = digits > 0 && s + digits == end;
  for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
    if (strcasecmp(end, units[i].suffix) == 0) {
      if (integer) {
        errno = 0;
        unsigned long long n = strtoull(s, NULL, 10);
        if (errno == ERANGE || (units[i].shift && n > (UINT64_MAX >> units[i].shift))) {
          errno = ERANGE;
          return -1;
        }
        *out = (uint64_t)n << units[i].shift;
        return 0;
      }
      double bytes = ldexp(v, units[i].shift);
      if (bytes >= 18446744073709551616.0) {
        errno = ERANGE;
        return -1;
      }
      if (bytes != floor(bytes)) { /* "1.3K" is not a whole number of bytes */
        errno = EINVAL;
        return -1;
      }
      *out = (uint64_t)bytes;
      return 0;
    }
  }
  errno = EINVAL;
  return -1;
}

int parse_rate(const char *s, uint64_t *out)
{
  char buf[64];
  size_t n = strlen(s);
  if (n >= sizeof buf) {
    errno = EINVAL;
    return -1;
  }
  memcpy(buf, s, n + 1);
  if (n > 2 && strcasecmp(buf + n - 2, "/s") == 0)
    buf[n - 2] = '\0';
  return parse_size(buf, out);
}

void format_size(uint64_t bytes, char *buf, size_t len)
{
  static const char *const names[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  int unit = 0;
  double v = (double)bytes;
  while (v >= 1024.0 && unit < 6) {
    v /= 1024.0;
    unit++;
  }
  if (unit == 0)
    snprintf(buf, len, "%llu B", (unsigned long long)bytes);
  else if (v == floor(v))
    snprintf(buf, len, "%.0f %s", v, names[unit]);
  else
    snprintf(buf, len, "%.1f %s", v, names[unit]);
}

uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

uint64_t realtime_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

int read_full(int fd, void *buf, size_t len)
{
  char *p = buf;
  size_t done = 0;
  while (done < len) {
    ssize_t r = read(fd, p + done, len - done);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      errno = done ? EPIPE : 0;
      return -1;
    }
    done += r;
  }
  return 0;
}

int write_full(int fd, const void *buf, size_t len)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t r = write(fd, p, len);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    len -= r;
  }
  return 0;
}

int pread_full(int fd, void *buf, size_t len, off_t off)
{
  char *p = buf;
  while (len > 0) {
    ssize_t r = pread(fd, p, len, off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) { /* past end of file: reads as zeroes (sparse tail) */
      memset(p, 0, len);
      return 0;
    }
    p += r;
    off += r;
    len -= r;
  }
  return 0;
}

int pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t r = pwrite(fd, p, len, off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    off += r;
    len -= r;
  }
  return 0;
}

int fsync_parent_dir(const char *path)
{
  char *copy = strdup(path);
  if (!copy)
    return -1;
  int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  free(copy);
  if (fd < 0)
    return -1;
  int r = fsync(fd);
  int saved = errno;
  close(fd);
  errno = saved;
  return r;
}

int write_file_atomic(const char *path, const void *buf, size_t len, mode_t mode, char *err,
                      size_t errlen)
{
  char *tmp = NULL;
  if (asprintf(&tmp, "%s.tmp", path) < 0) {
    errno = ENOMEM;
    if (err && errlen)
      snprintf(err, errlen, "out of memory");
    return -1;
  }
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  const char *what = tmp;
  if (fd < 0 || write_full(fd, buf, len) < 0 || fsync(fd) < 0)
    goto fail;
  if (close(fd) < 0) {
    fd = -1;
    goto fail;
  }
  fd = -1;
  what = path;
  if (rename(tmp, path) < 0 || fsync_parent_dir(path) < 0)
    goto fail;
  free(tmp);
  return 0;
fail: {
    int e = errno ? errno : EIO;
    if (err && errlen)
      snprintf(err, errlen, "cannot write %s: %s", what, strerror(e));
    if (fd >= 0)
      close(fd);
    unlink(tmp);
    free(tmp);
    errno = e;
    return -1;
  }
}

bool name_is_valid(const char *name)
{
  size_t n = name ? strlen(name) : 0;
  if (n == 0 || n > 64 || name[0] == '.' || name[0] == '-')
    return false;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = name[i];
    if (!isalnum(c) && c != '.' && c != '_' && c != '-')
      return false;
  }
  return true;
}

int parse_host_port(const char *s, char *host, size_t hostlen, uint16_t *port)
{
  const char *colon;
  const char *h = s;
  size_t hl;
  if (*s == '[') {
    const char *close = strchr(s, ']');
    if (!close || close[1] != ':')
      goto bad;
    h = s + 1;
    hl = close - h;
    colon = close + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon)
      goto bad;
    hl = colon - s;
  }
  if (hl == 0 || hl >= hostlen)
    goto bad;
  char *end;
  errno = 0;
  unsigned long p = strtoul(colon + 1, &end, 10);
  if (errno || *end || end == colon + 1 || p > 65535)
    goto bad;
  memcpy(host, h, hl);
  host[hl] = '\0';
  *port = (uint16_t)p;
  return 0;
bad:
  errno = EINVAL;
  return -1;
}

int fmt_into(char *buf, size_t len, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, len, fmt, ap);
  va_end(ap);
  return n < 0 || (size_t)n >= len ? -1 : 0;
}

void cond_timedwait_ms(pthread_cond_t *cond, pthread_mutex_t *mu, unsigned ms)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_nsec += (long)(ms % 1000) * 1000000L;
  ts.tv_sec += ms / 1000 + ts.tv_nsec / 1000000000L;
  ts.tv_nsec %= 1000000000L;
  pthread_cond_timedwait(cond, mu, &ts);
}
