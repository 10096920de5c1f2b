/* test_util: checks the shared helpers of src/common/util.c that every
 * component leans on to read operator input: sizes, rates, names and
 * addresses.  Garbage must be refused (never read as some other number), and
 * what is accepted must be exact.  Exits non-zero on the first failure. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#include "check.h"

static void size_ok(const char *s, uint64_t want)
{
  uint64_t v = 12345;
  errno = 0;
  int r = parse_size(s, &v);
  if (r != 0 || v != want) {
    fprintf(stderr, "parse_size(\"%s\"): got r=%d v=%llu errno=%d, want %llu\n", s, r,
            (unsigned long long)v, errno, (unsigned long long)want);
    failures++;
  }
}

static void size_bad(const char *s, int want_errno)
{
  uint64_t v = 12345;
  errno = 0;
  int r = parse_size(s, &v);
  if (r != -1 || errno != want_errno || v != 12345) {
    fprintf(stderr, "parse_size(\"%s\"): got r=%d v=%llu errno=%d, want -1 errno=%d untouched\n",
            s ? s : "(null)", r, (unsigned long long)v, errno, want_errno);
    failures++;
  }
}

static void test_parse_size(void)
{
  size_ok("0", 0);
  size_ok("1", 1);
  size_ok("4096", 4096);
  size_ok("512B", 512);
  size_ok("64K", 65536);
  size_ok("64k", 65536);
  size_ok("64KB", 65536);
  size_ok("64KiB", 65536);
  size_ok("64kib", 65536);
  size_ok("10M", 10ull << 20);
  size_ok("10MiB", 10ull << 20);
  size_ok("1.5G", 3ull << 29);
  size_ok("10G", 10ull << 30);
  size_ok("2T", 2ull << 40);
  size_ok("1P", 1ull << 50);
  size_ok("0.5K", 512);
  size_ok("16383P", 16383ull << 50);               /* the largest P that fits */
  size_ok("9007199254740992", 9007199254740992ull); /* 2^53 */
  /* Exact byte counts above 2^53 must not be rounded to a neighbour. */
  size_ok("9007199254740993", 9007199254740993ull);
  size_ok("18446744073709550591", 18446744073709550591ull);

  /* garbage */
  size_bad(NULL, EINVAL);
  size_bad("", EINVAL);
  size_bad(" ", EINVAL);
  size_bad(" 1", EINVAL);
  size_bad("1 ", EINVAL);
  size_bad("-1", EINVAL);
  size_bad("-0", EINVAL);
  size_bad("K", EINVAL);
  size_bad("1X", EINVAL);
  size_bad("1KK", EINVAL);
  size_bad("1KiBB", EINVAL);
  size_bad("1.3K", EINVAL);   /* not a whole number of bytes */
  size_bad("0.5", EINVAL);
  size_bad("nan", EINVAL);
  size_bad("inf", EINVAL);
  size_bad("infinity", EINVAL);
  size_bad("10G/s", EINVAL);  /* that is a rate */

  /* overflow */
  size_bad("16384P", ERANGE);               /* 2^64 */
  size_bad("18446744073709551616", ERANGE); /* 2^64 */
  size_bad("99999999999999999999999", ERANGE);
  size_bad("1e400", ERANGE);
  size_bad("100000000000000000000P", ERANGE);
}

static void rate_ok(const char *s, uint64_t want)
{
  uint64_t v = 7;
  if (parse_rate(s, &v) != 0 || v != want) {
    fprintf(stderr, "parse_rate(\"%s\"): got %llu, want %llu\n", s, (unsigned long long)v,
            (unsigned long long)want);
    failures++;
  }
}

static void rate_bad(const char *s)
{
  uint64_t v = 7;
  errno = 0;
  if (parse_rate(s, &v) != -1 || errno == 0 || v != 7) {
    fprintf(stderr, "parse_rate(\"%s\"): accepted (%llu)\n", s, (unsigned long long)v);
    failures++;
  }
}

static void test_parse_rate(void)
{
  rate_ok("0", 0);
  rate_ok("50M", 50ull << 20);
  rate_ok("50M/s", 50ull << 20);
  rate_ok("50m/S", 50ull << 20);
  rate_ok("1048576", 1048576);
  rate_ok("1G/s", 1ull << 30);
  rate_bad("");
  rate_bad("/s");
  rate_bad("M/s");
  rate_bad("50M/s/s");
  rate_bad("50M/m");
  rate_bad("-5M");
  rate_bad("fast");
  /* a string longer than any rate */
  char big[200];
  memset(big, '1', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  rate_bad(big);
}

static void fmt_is(uint64_t bytes, const char *want)
{
  char buf[32];
  format_size(bytes, buf, sizeof buf);
  if (strcmp(buf, want) != 0) {
    fprintf(stderr, "format_size(%llu) = \"%s\", want \"%s\"\n", (unsigned long long)bytes, buf,
            want);
    failures++;
  }
}

static void test_format_size(void)
{
  fmt_is(0, "0 B");
  fmt_is(1, "1 B");
  fmt_is(512, "512 B");
  fmt_is(1023, "1023 B");
  fmt_is(1024, "1 KiB");
  fmt_is(1536, "1.5 KiB");
  fmt_is(65536, "64 KiB");
  fmt_is(1ull << 20, "1 MiB");
  fmt_is(10ull << 30, "10 GiB");
  fmt_is(3ull << 29, "1.5 GiB");
  fmt_is(1ull << 40, "1 TiB");
  fmt_is(1ull << 50, "1 PiB");
  fmt_is(1ull << 60, "1 EiB");
  fmt_is(UINT64_MAX, "16 EiB");

  /* A short buffer is cut, never overrun. */
  char small[4];
  memset(small, 'x', sizeof small);
  format_size(10ull << 30, small, sizeof small);
  CHECK(memchr(small, '\0', sizeof small) != NULL);

  /* Round trip: what format_size prints for whole units parses back. */
  uint64_t v;
  CHECK(parse_size("64K", &v) == 0 && v == 65536);
}

static void test_name_is_valid(void)
{
  CHECK(name_is_valid("vm1"));
  CHECK(name_is_valid("a"));
  CHECK(name_is_valid("A-b_c.d"));
  CHECK(name_is_valid("0disk"));
  CHECK(name_is_valid("x."));
  CHECK(name_is_valid("x-"));
  CHECK(name_is_valid("_x"));
  char n64[65], n65[66];
  memset(n64, 'a', 64);
  n64[64] = '\0';
  memset(n65, 'a', 65);
  n65[65] = '\0';
  CHECK(name_is_valid(n64));
  CHECK(!name_is_valid(n65));

  CHECK(!name_is_valid(NULL));
  CHECK(!name_is_valid(""));
  CHECK(!name_is_valid("."));
  CHECK(!name_is_valid(".."));
  CHECK(!name_is_valid(".hidden"));
  CHECK(!name_is_valid("-rf"));
  CHECK(!name_is_valid("a/b"));
  CHECK(!name_is_valid("../x"));
  CHECK(!name_is_valid("a b"));
  CHECK(!name_is_valid("a?b"));
  CHECK(!name_is_valid("a%2Fb"));
  CHECK(!name_is_valid("a\nb"));
  CHECK(!name_is_valid("caf\xc3\xa9"));  /* non-ASCII */
}

static void hp_ok(const char *s, const char *want_host, uint16_t want_port)
{
  char host[64] = "untouched";
  uint16_t port = 1;
  if (parse_host_port(s, host, sizeof host, &port) != 0 || strcmp(host, want_host) != 0 ||
      port != want_port) {
    fprintf(stderr, "parse_host_port(\"%s\"): got host \"%s\" port %u, want \"%s\" %u\n", s, host,
            port, want_host, want_port);
    failures++;
  }
}

static void hp_bad(const char *s, size_t hostlen)
{
  char host[64];
  uint16_t port = 1;
  errno = 0;
  if (parse_host_port(s, host, hostlen, &port) != -1 || errno != EINVAL) {
    fprintf(stderr, "parse_host_port(\"%s\", hostlen %zu): accepted\n", s, hostlen);
    failures++;
  }
}

static void test_parse_host_port(void)
{
  hp_ok("127.0.0.1:7450", "127.0.0.1", 7450);
  hp_ok("localhost:0", "localhost", 0);
  hp_ok("example.com:65535", "example.com", 65535);
  hp_ok("[::1]:7450", "::1", 7450);
  hp_ok("[::]:0", "::", 0);
  hp_ok("[fe80::1%eth0]:10809", "fe80::1%eth0", 10809);
  hp_ok("[2001:db8::dead:beef]:443", "2001:db8::dead:beef", 443);

  hp_bad("", 64);
  hp_bad("127.0.0.1", 64);         /* no port */
  hp_bad("127.0.0.1:", 64);        /* empty port */
  hp_bad(":7450", 64);             /* empty host */
  hp_bad("host:65536", 64);
  hp_bad("host:99999999999999999999", 64);
  hp_bad("host:-1", 64);
  hp_bad("host:80x", 64);
  hp_bad("host:x80", 64);
  hp_bad("[::1]", 64);             /* no port */
  hp_bad("[::1]:", 64);
  hp_bad("[::1]7450", 64);         /* missing colon */
  hp_bad("[::1:7450", 64);         /* unclosed bracket */
  hp_bad("[]:80", 64);
  hp_bad("averyveryverylonghostname:80", 8);  /* host does not fit */
  hp_bad("abcdefgh:80", 8);                   /* 8 chars + NUL does not fit in 8 */
  hp_ok("abcdefg:80", "abcdefg", 80);         /* 7 + NUL fits (checked with 64 too) */
  {
    char host[8];
    uint16_t port;
    CHECK(parse_host_port("abcdefg:80", host, sizeof host, &port) == 0 &&
          strcmp(host, "abcdefg") == 0 && port == 80);
  }
}

int main(void)
{
  test_parse_size();
  test_parse_rate();
  test_format_size();
  test_name_is_valid();
  test_parse_host_port();
  if (failures) {
    fprintf(stderr, "test_util: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_util: ok\n");
  return 0;
}
