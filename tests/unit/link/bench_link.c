/* bench_link: loopback throughput of link_send/link_recv with 1 MiB frames,
 * by zstd level and kind of data.  Run by hand (a release build gives the
 * meaningful numbers):
 *
 *   BUILD/tests/unit/link/bench_link [SECONDS_PER_CASE] [FRAME_BYTES]
 *
 * One sender thread on the client, the listener's receiving thread on the
 * server, one TLS connection over 127.0.0.1.  MB/s is raw payload (10^6
 * bytes) per second, counted when the receiver has it decoded; "wire" is the
 * share of the raw bytes that went over TLS.  Data kinds: "random" does not
 * compress; "mixed" is what disk blocks often look like: a quarter zero
 * blocks, the rest text-like bytes (16 symbols, about 2:1 by entropy alone). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "link/link.h"

#include "link_test.h"

static char fp_client[LINK_FINGERPRINT_LEN];
static _Atomic uint64_t got_bytes, got_frames;

static bool trust(void *opaque, const char *fp, char *name, size_t namelen)
{
  return strcmp(fp, fp_client) == 0;
}

static void on_conn(void *opaque, struct link_conn *c)
{
  struct link_msg m;
  int rc;
  while ((rc = link_recv(c, &m, 0, NULL, 0)) == 0 || rc == -EBADMSG) {
    if (m.type == 9) {   /* end of a case: tell the sender everything arrived */
      link_send(c, 9, m.seq, NULL, 0, 0, 10000);
      continue;
    }
    /* Touch the data as a real receiver would. */
    volatile uint8_t sink = m.len ? ((const uint8_t *)m.data)[m.len - 1] : 0;
    (void)sink;
    atomic_fetch_add(&got_bytes, m.len);
    atomic_fetch_add(&got_frames, 1);
  }
  link_conn_close(c);
}

static void fill_mixed(uint8_t *buf, size_t len, uint64_t seed)
{
  static const char sym[] = "etaoinshrdlu .,\n";
  fill_random(buf, len, seed);
  for (size_t b = 0; b < len; b += 4096) {
    size_t n = MIN((size_t)4096, len - b);
    if ((b / 4096) % 4 == 1)
      memset(buf + b, 0, n);
    else
      for (size_t i = 0; i < n; i++)
        buf[b + i] = (uint8_t)sym[buf[b + i] & 15];
  }
}

static struct identity_pair {
  struct link_identity *server, *client;
} make_ids(const char *tmp)
{
  struct identity_pair p = { 0 };
  const char *names[2] = { "bench-server", "bench-client" };
  struct link_identity **ids[2] = { &p.server, &p.client };
  for (int k = 0; k < 2; k++) {
    char dir[512], err[512];
    bool created;
    snprintf(dir, sizeof dir, "%s/%s", tmp, names[k]);
    if (link_identity_init(dir, names[k], &created, err, sizeof err) < 0 ||
        !(*ids[k] = link_identity_load(dir, err, sizeof err))) {
      fprintf(stderr, "identity: %s\n", err);
      exit(1);
    }
  }
  return p;
}

int main(int argc, char **argv)
{
  double secs = argc > 1 ? atof(argv[1]) : 3.0;
  uint32_t frame = argc > 2 ? (uint32_t)atoi(argv[2]) : (1u << 20);
  if (secs <= 0 || frame == 0 || frame > FRAME_MAX_RAW) {
    fprintf(stderr, "usage: bench_link [SECONDS_PER_CASE] [FRAME_BYTES <= %u]\n", FRAME_MAX_RAW);
    return 2;
  }
  log_set_level(LOG_WARN);
  char *tmp = make_tmpdir("link-bench");
  struct identity_pair ids = make_ids(tmp);
  snprintf(fp_client, sizeof fp_client, "%s", link_identity_fingerprint(ids.client));
  char err[512];
  struct link_listener *l = link_listener_start(ids.server, "127.0.0.1:0", trust, NULL, on_conn,
                                                NULL, 5000, err, sizeof err);
  if (!l) {
    fprintf(stderr, "listener: %s\n", err);
    return 1;
  }
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%u", link_listener_port(l));
  struct link_conn *c = link_connect(ids.client, addr, link_identity_fingerprint(ids.server),
                                     5000, err, sizeof err);
  if (!c) {
    fprintf(stderr, "connect: %s\n", err);
    return 1;
  }

  enum { NBUF = 8 };
  uint8_t *bufs[2][NBUF];
  for (int i = 0; i < NBUF; i++) {
    bufs[0][i] = malloc(frame);
    bufs[1][i] = malloc(frame);
    fill_random(bufs[0][i], frame, (uint64_t)i + 1);
    fill_mixed(bufs[1][i], frame, (uint64_t)i + 100);
  }
  static const char *kinds[2] = { "random", "mixed" };
  static const int levels[] = { 0, 1, 3 };
  printf("%-7s %5s %10s %8s %8s\n", "data", "level", "MB/s", "wire", "frames");
  uint64_t seq = 0;
  for (int kind = 0; kind < 2; kind++) {
    for (size_t li = 0; li < ARRAY_SIZE(levels); li++) {
      struct link_stats s0, s1;
      link_conn_stats(c, &s0);
      atomic_store(&got_bytes, 0);
      atomic_store(&got_frames, 0);
      uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9);
      int rc = 0;
      for (unsigned n = 0; now_ns() < end; n++) {
        if ((rc = link_send(c, 1, seq++, bufs[kind][n % NBUF], frame, levels[li], 10000)) < 0)
          break;
      }
      /* Count only what the receiver has: wait for its echo of the marker. */
      struct link_msg m;
      if (rc == 0)
        rc = link_send(c, 9, seq, NULL, 0, 0, 10000);
      while (rc == 0 && (rc = link_recv(c, &m, 30000, err, sizeof err)) == 0 && m.type != 9)
        ;
      double el = (double)(now_ns() - t0) / 1e9;
      if (rc < 0) {
        fprintf(stderr, "bench: %s\n", strerror(-rc));
        return 1;
      }
      link_conn_stats(c, &s1);
      double raw = (double)(s1.raw_bytes_sent - s0.raw_bytes_sent);
      double wire = (double)(s1.wire_bytes_sent - s0.wire_bytes_sent);
      printf("%-7s %5d %10.1f %7.1f%% %8llu\n", kinds[kind], levels[li],
             (double)atomic_load(&got_bytes) / 1e6 / el, raw ? 100.0 * wire / raw : 0.0,
             (unsigned long long)atomic_load(&got_frames));
      fflush(stdout);
    }
  }
  link_conn_close(c);
  link_listener_stop(l);
  for (int i = 0; i < NBUF; i++) {
    free(bufs[0][i]);
    free(bufs[1][i]);
  }
  link_identity_free(ids.server);
  link_identity_free(ids.client);
  remove_tree(tmp);
  return 0;
}
