/* writer.c: the record writer of ferry's tiny test guest (/bin/writer in the
 * initramfs that tests/guest/build.sh makes; format in docs/guest.md).
 *
 * It appends self-describing 4096-byte records to the guest's disk, one at a
 * time, each made durable (pwrite + fdatasync, O_DIRECT) before the next, so
 * that after a migration tests/guest/check_records.py can prove from the disk
 * alone that no acknowledged record was lost or misplaced and that nothing
 * was written beyond the last one.
 *
 * Design:
 *   - Record i lives at byte i * 4096 and says so (seq, offset); a CRC-32
 *     covers it.  CRC-32 (the zlib polynomial) is written out here rather than
 *     taken from a library because this is a static binary for a guest with
 *     nothing else in it, and the checker gets the same function from
 *     Python's zlib for free.
 *   - On start it scans from record 0 to the first record that is not valid
 *     and continues there; the boot counter is one more than the highest it
 *     saw, so a test can tell the guest booted again (cold migration).
 *   - Records go out at ferry.rate=N per second (kernel command line, default
 *     50; 0 = as fast as the disk takes them), never faster, with no catch-up
 *     burst after a stall.
 *   - An IO error never ends it: it prints `ferry-writer: ERROR ...` and tries
 *     the same IO again 100 ms later (a migration switch-over may make the
 *     disk unavailable for a moment).  At the end of the disk it says so and
 *     idles, keeping the guest alive.
 *
 * Console lines (stdout is the serial console), for tests to wait on:
 *   ferry-writer: start boot B at seq N     before the first write of a boot
 *   ferry-writer: boot B seq N              every second: N = last durable seq
 *   ferry-writer: end of disk at seq N ...  the last record is durable
 *   ferry-writer: ERROR ...                 an IO error (retried)
 *
 * Single-threaded; everything here is internal (static).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE        4096u
#define REC_MAGIC       "FERRYREC"
#define REC_VERSION     1u
#define OFF_SEQ         8u         /* u64 record index */
#define OFF_OFFSET      16u        /* u64 byte offset = seq * REC_SIZE */
#define OFF_BOOT        24u        /* u64 boot counter, from 1 */
#define OFF_NS          32u        /* u64 writer's CLOCK_MONOTONIC, ns */
#define OFF_VERSION     40u        /* u32 REC_VERSION */
#define OFF_RSIZE       44u        /* u32 REC_SIZE */
#define OFF_FILL        48u        /* fill up to OFF_CRC */
#define OFF_CRC         (REC_SIZE - 4u) /* u32 CRC-32 of bytes [0, OFF_CRC) */

#define DEFAULT_RATE    50         /* records per second */
#define RETRY_NS        100000000ull    /* 100 ms between tries of a failed IO */
#define REPORT_NS       1000000000ull   /* progress line period */
#define SCAN_BATCH      64u        /* records per read while scanning */

static uint32_t crc_table[256];

static void crc32_init(void)
{
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++)
      c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}

/* CRC-32 as zlib.crc32(data) computes it (reflected 0xEDB88320, init and
 * final xor 0xFFFFFFFF). */
static uint32_t crc32_buf(const uint8_t *p, size_t n)
{
  uint32_t c = 0xFFFFFFFFu;
  while (n--)
    c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

static uint64_t splitmix64(uint64_t z)
{
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void put_le64(uint8_t *p, uint64_t v)
{
  for (int i = 0; i < 8; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le32(uint8_t *p, uint32_t v)
{
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--)
    v = (v << 8) | p[i];
  return v;
}

static uint32_t get_le32(const uint8_t *p)
{
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The fill: the 8 little-endian bytes of splitmix64(seq), repeated and cut at
 * OFF_CRC. */
static void record_fill(uint8_t *rec, uint64_t seq)
{
  uint8_t pat[8];
  put_le64(pat, splitmix64(seq));
  for (uint32_t i = OFF_FILL; i < OFF_CRC; i++)
    rec[i] = pat[(i - OFF_FILL) % 8];
}

static void record_build(uint8_t *rec, uint64_t seq, uint64_t boot, uint64_t ns)
{
  memcpy(rec, REC_MAGIC, 8);
  put_le64(rec + OFF_SEQ, seq);
  put_le64(rec + OFF_OFFSET, seq * REC_SIZE);
  put_le64(rec + OFF_BOOT, boot);
  put_le64(rec + OFF_NS, ns);
  put_le32(rec + OFF_VERSION, REC_VERSION);
  put_le32(rec + OFF_RSIZE, REC_SIZE);
  record_fill(rec, seq);
  put_le32(rec + OFF_CRC, crc32_buf(rec, OFF_CRC));
}

/* True when rec is a valid record for position seq; *boot gets its boot. */
static bool record_valid(const uint8_t *rec, uint64_t seq, uint64_t *boot)
{
  static uint8_t want[REC_SIZE];

  if (memcmp(rec, REC_MAGIC, 8) != 0 ||
      get_le32(rec + OFF_CRC) != crc32_buf(rec, OFF_CRC) ||
      get_le64(rec + OFF_SEQ) != seq ||
      get_le64(rec + OFF_OFFSET) != seq * REC_SIZE ||
      get_le32(rec + OFF_VERSION) != REC_VERSION ||
      get_le32(rec + OFF_RSIZE) != REC_SIZE)
    return false;
  record_fill(want, seq);
  if (memcmp(rec + OFF_FILL, want + OFF_FILL, OFF_CRC - OFF_FILL) != 0)
    return false;
  *boot = get_le64(rec + OFF_BOOT);
  return true;
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
  struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ull),
                         .tv_nsec = (long)(t % 1000000000ull) };
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
    ;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  printf("ferry-writer: %s\n", line);
  fflush(stdout);
}

/* Error state of the IO being retried: the first failure is printed, then
 * one line a second while it goes on, and one when it succeeds again. */
struct retry {
  unsigned long failures;        /* consecutive failures of this IO */
  uint64_t last_said;            /* now_ns() of the last ERROR line */
};

static void retry_failed(struct retry *r, const char *what, uint64_t seq, int err)
{
  uint64_t now = now_ns();
  r->failures++;
  if (r->failures == 1 || now - r->last_said >= REPORT_NS) {
    say("ERROR %s seq %" PRIu64 ": errno %d (%s), retrying every 100 ms (try %lu)",
      what, seq, err, strerror(err), r->failures);
    r->last_said = now;
  }
  sleep_until(now_ns() + RETRY_NS);
}

static void retry_ok(struct retry *r, const char *what, uint64_t seq)
{
  if (r->failures)
    say("%s seq %" PRIu64 " succeeded after %lu failed tries", what, seq, r->failures);
  r->failures = 0;
}

/* ferry.rate=N from /proc/cmdline; DEFAULT_RATE when absent. */
static long rate_from_cmdline(void)
{
  char buf[4096];
  FILE *f = fopen("/proc/cmdline", "r");
  if (!f)
    return DEFAULT_RATE;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  long rate = DEFAULT_RATE;
  for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok;
       tok = strtok_r(NULL, " \t\n", &save)) {
    if (strncmp(tok, "ferry.rate=", 11) != 0)
      continue;
    char *end;
    errno = 0;
    long v = strtol(tok + 11, &end, 10);
    if (errno || end == tok + 11 || *end || v < 0)
      say("ignoring bad %s (using %d)", tok, DEFAULT_RATE);
    else
      rate = v;
  }
  return rate;
}

static int disk_size(int fd, uint64_t *size)
{
  struct stat st;
  if (fstat(fd, &st) < 0)
    return -1;
  if (S_ISBLK(st.st_mode))
    return ioctl(fd, BLKGETSIZE64, size);
  *size = (uint64_t)st.st_size;
  return 0;
}

static __attribute__((noreturn)) void idle_forever(void)
{
  for (;;)
    pause();
}

/* Scans records from 0; returns the index of the first one that is not
 * valid and sets *max_boot to the highest boot counter seen (0 if none). */
static uint64_t scan(int fd, uint8_t *buf, uint64_t nrec, uint64_t *max_boot)
{
  struct retry r = { 0 };
  uint64_t i = 0;
  *max_boot = 0;
  while (i < nrec) {
    uint64_t n = nrec - i < SCAN_BATCH ? nrec - i : SCAN_BATCH;
    ssize_t got = pread(fd, buf, n * REC_SIZE, (off_t)(i * REC_SIZE));
    if (got < (ssize_t)REC_SIZE) {
      retry_failed(&r, "read", i, got < 0 ? errno : EIO);
      continue;
    }
    retry_ok(&r, "read", i);
    uint64_t have = (uint64_t)got / REC_SIZE;
    for (uint64_t k = 0; k < have; k++, i++) {
      uint64_t boot;
      if (!record_valid(buf + k * REC_SIZE, i, &boot))
        return i;
      if (boot > *max_boot)
        *max_boot = boot;
    }
  }
  return i;
}

static void usage(void)
{
  fprintf(stderr, "usage: writer [--rate N] [DEVICE]   (default /dev/vda, rate from ferry.rate=)\n");
  exit(2);
}

int main(int argc, char **argv)
{
  const char *dev = "/dev/vda";
  long rate = -1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--rate") == 0 && i + 1 < argc) {
      char *end;
      rate = strtol(argv[++i], &end, 10);
      if (*end || rate < 0)
        usage();
    } else if (argv[i][0] == '-') {
      usage();
    } else {
      dev = argv[i];
    }
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  crc32_init();
  if (rate < 0)
    rate = rate_from_cmdline();

  struct retry r = { 0 };
  int fd;
  while ((fd = open(dev, O_RDWR | O_DIRECT | O_CLOEXEC)) < 0)
    retry_failed(&r, "open", 0, errno);
  retry_ok(&r, "open", 0);

  uint64_t size;
  while (disk_size(fd, &size) < 0)
    retry_failed(&r, "size", 0, errno);
  uint64_t nrec = size / REC_SIZE;
  if (nrec == 0) {
    say("ERROR %s holds no whole record (%" PRIu64 " bytes); idling", dev, size);
    idle_forever();
  }

  uint8_t *buf;
  int err = posix_memalign((void **)&buf, REC_SIZE, SCAN_BATCH * REC_SIZE);
  if (err) {
    say("ERROR posix_memalign: errno %d (%s); idling", err, strerror(err));
    idle_forever();
  }

  uint64_t max_boot;
  uint64_t seq = scan(fd, buf, nrec, &max_boot);
  uint64_t boot = max_boot + 1;
  say("start boot %" PRIu64 " at seq %" PRIu64 " (disk %s, %" PRIu64 " records, rate %ld/s)",
    boot, seq, dev, nrec, rate);

  uint64_t period = rate > 0 ? 1000000000ull / (uint64_t)rate : 0;
  uint64_t next = now_ns();             /* when the next record may go */
  uint64_t next_report = next + REPORT_NS;
  bool wrote = false;
  for (; seq < nrec; seq++) {
    if (period) {
      sleep_until(next);
      next += period;
    }
    record_build(buf, seq, boot, now_ns());
    for (;;) {
      ssize_t put = pwrite(fd, buf, REC_SIZE, (off_t)(seq * REC_SIZE));
      if (put != (ssize_t)REC_SIZE) {
        retry_failed(&r, "write", seq, put < 0 ? errno : EIO);
        continue;
      }
      if (fdatasync(fd) < 0) {
        retry_failed(&r, "fdatasync", seq, errno);
        continue;         /* write it again: its fate is unknown */
      }
      break;
    }
    retry_ok(&r, "write", seq);
    wrote = true;
    uint64_t now = now_ns();
    if (period && next < now)
      next = now;           /* no catch-up burst after a stall */
    if (now >= next_report) {
      say("boot %" PRIu64 " seq %" PRIu64, boot, seq);
      next_report = now + REPORT_NS;
    }
  }
  if (wrote)
    say("boot %" PRIu64 " seq %" PRIu64, boot, seq - 1);
  say("end of disk at seq %" PRIu64 " (%" PRIu64 " records); idling", seq - 1, nrec);
  idle_forever();
}
