/* test_link_frame: checks src/link/frame.c without any network: round trips
 * at every size class and level, each rule of the header (frame.h) broken
 * one at a time with the header check recomputed so the rule itself is what
 * refuses it, damaged payloads that leave the stream in step, and zstd
 * payloads that lie (about their size, their number, their kind). */
#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>
#include <zstd.h>

#include "link/frame.h"

#include "check.h"
#include "link_test.h"

static void put32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

/* Header bytes as the wire format says, with a correct header check. */
static void raw_header(uint8_t out[FRAME_HEADER_SIZE], uint32_t magic, uint8_t type, uint8_t flags,
                       uint16_t res16, uint64_t seq, uint32_t wire_len, uint32_t raw_len,
                       uint64_t hash, uint32_t res32)
{
  put32(out, magic);
  out[4] = type;
  out[5] = flags;
  out[6] = (uint8_t)res16;
  out[7] = (uint8_t)(res16 >> 8);
  put64(out + 8, seq);
  put32(out + 16, wire_len);
  put32(out + 20, raw_len);
  put64(out + 24, hash);
  put32(out + 32, XXH32(out, 32, 0));
  put32(out + 36, res32);
}

/* Encodes, decodes, compares; returns the wire length (or -1).  want_zstd:
 * 1 / 0 whether the payload must go compressed, -1 either. */
static long round_trip(struct frame_codec *enc, struct frame_codec *dec, const uint8_t *payload,
                       uint32_t len, int level, int want_zstd)
{
  uint8_t hdr[FRAME_HEADER_SIZE];
  const void *wire = NULL;
  uint32_t wire_len = 0;
  int rc = frame_encode(enc, 7, 1000 + len, payload, len, level, hdr, &wire, &wire_len);
  CHECK(rc == 0);
  if (rc)
    return -1;
  struct frame_header h;
  char err[256] = "";
  CHECK(frame_header_decode(hdr, &h, err, sizeof err) == 0);
  CHECK(h.type == 7 && h.seq == 1000 + len && h.raw_len == len && h.wire_len == wire_len);
  if (want_zstd >= 0)
    CHECK(!!(h.flags & FRAME_F_ZSTD) == want_zstd);
  if (h.flags & FRAME_F_ZSTD)
    CHECK(wire_len < len);
  else
    CHECK(wire_len == len && (len == 0 || wire == payload));
  /* The decoder gets its own copy, as from a socket. */
  uint8_t *copy = malloc(wire_len ? wire_len : 1);
  memcpy(copy, wire, wire_len);
  const void *raw = NULL;
  rc = frame_decode_payload(dec, &h, copy, &raw, err, sizeof err);
  CHECK(rc == 0);
  if (rc == 0)
    CHECK(raw && (len == 0 || memcmp(raw, payload, len) == 0));
  if (rc)
    fprintf(stderr, "round trip len %u level %d: %s\n", len, level, err);
  free(copy);
  return wire_len;
}

static void test_round_trips(void)
{
  struct frame_codec *enc = frame_codec_new(), *dec = frame_codec_new();
  uint8_t *buf = malloc(FRAME_MAX_RAW + 1);
  CHECK(enc && dec && buf);

  fill_random(buf, 1000, 1);
  round_trip(enc, dec, buf, 1000, 0, 0);            /* raw */
  round_trip(enc, dec, buf, 1000, 3, 0);            /* incompressible: sent raw */
  fill_pattern(buf, 65536, 2);
  round_trip(enc, dec, buf, 65536, 0, 0);
  round_trip(enc, dec, buf, 65536, 1, 1);            /* compressible */
  round_trip(enc, dec, buf, 65536, 3, 1);
  round_trip(enc, dec, buf, 65536, -5, 1);           /* negative levels */
  round_trip(enc, dec, buf, 65536, 1000, 1);         /* clamped to the maximum */
  round_trip(enc, dec, buf, 1, 3, 0);               /* too small to shrink */
  round_trip(enc, dec, NULL, 0, 0, 0);              /* empty */
  round_trip(enc, dec, NULL, 0, 3, 0);
  round_trip(enc, dec, buf, 0, 3, 0);

  fill_random(buf, FRAME_MAX_RAW, 3);
  round_trip(enc, dec, buf, FRAME_MAX_RAW, 0, 0);   /* the largest, raw */
  round_trip(enc, dec, buf, FRAME_MAX_RAW, 1, 0);
  fill_pattern(buf, FRAME_MAX_RAW, 4);
  long w = round_trip(enc, dec, buf, FRAME_MAX_RAW, 3, 1);
  CHECK(w > 0 && w < FRAME_MAX_RAW / 10);
  memset(buf, 0, FRAME_MAX_RAW);
  round_trip(enc, dec, buf, FRAME_MAX_RAW, 1, 1);
  /* Mixed sizes through the same codecs: buffers are reused, not outgrown. */
  for (uint32_t len = 1; len < FRAME_MAX_RAW; len = len * 3 + 11) {
    fill_pattern(buf, len, len);
    round_trip(enc, dec, buf, len, 1, len >= 4096 ? 1 : -1);
  }

  uint8_t hdr[FRAME_HEADER_SIZE];
  const void *wire;
  uint32_t wire_len;
  CHECK(frame_encode(enc, 0, 0, buf, FRAME_MAX_RAW + 1, 0, hdr, &wire, &wire_len) == -EINVAL);
  CHECK(frame_encode(enc, 0, 0, NULL, 10, 0, hdr, &wire, &wire_len) == -EINVAL);

  free(buf);
  frame_codec_free(enc);
  frame_codec_free(dec);
  frame_codec_free(NULL);
}

static bool header_refused(const uint8_t hdr[FRAME_HEADER_SIZE], const char *needle)
{
  struct frame_header h;
  char err[256] = "";
  int rc = frame_header_decode(hdr, &h, err, sizeof err);
  if (rc != -EPROTO || !strstr(err, needle)) {
    fprintf(stderr, "header: rc %d, err '%s', wanted -EPROTO with '%s'\n", rc, err, needle);
    return false;
  }
  return true;
}

static void test_header_checks(void)
{
  uint8_t hdr[FRAME_HEADER_SIZE];
  struct frame_header h;
  char err[256];

  /* The encoder's header equals the hand-made one of the format. */
  struct frame_header in = { .type = 9, .flags = FRAME_F_ZSTD, .seq = 0x0102030405060708ull,
                             .wire_len = 100, .raw_len = 200, .payload_hash = 0xabcdefull };
  uint8_t mine[FRAME_HEADER_SIZE];
  frame_header_encode(&in, hdr);
  raw_header(mine, FRAME_MAGIC, 9, FRAME_F_ZSTD, 0, in.seq, 100, 200, 0xabcdefull, 0);
  CHECK(memcmp(hdr, mine, FRAME_HEADER_SIZE) == 0);
  CHECK(memcmp(hdr, "FRY1", 4) == 0);
  CHECK(frame_header_decode(hdr, &h, err, sizeof err) == 0);
  CHECK(h.type == 9 && h.flags == FRAME_F_ZSTD && h.seq == in.seq && h.wire_len == 100 &&
        h.raw_len == 200 && h.payload_hash == 0xabcdefull);

  raw_header(hdr, 0x31595247u, 1, 0, 0, 1, 10, 10, 0, 0);
  CHECK(header_refused(hdr, "bad frame magic"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, 10, 10, 0, 0);
  hdr[9] ^= 0x10;   /* seq damaged, check not recomputed */
  CHECK(header_refused(hdr, "checksum mismatch"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, 10, 10, 0, 0);
  hdr[33] ^= 1;     /* the check itself damaged */
  CHECK(header_refused(hdr, "checksum mismatch"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0x0100, 1, 10, 10, 0, 0);
  CHECK(header_refused(hdr, "reserved"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, 10, 10, 0, 1u << 31);
  CHECK(header_refused(hdr, "reserved"));
  raw_header(hdr, FRAME_MAGIC, 1, 0x02, 0, 1, 10, 10, 0, 0);
  CHECK(header_refused(hdr, "unknown frame flags"));
  raw_header(hdr, FRAME_MAGIC, 1, 0x80 | FRAME_F_ZSTD, 0, 1, 10, 20, 0, 0);
  CHECK(header_refused(hdr, "unknown frame flags"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, FRAME_MAX_WIRE + 1, FRAME_MAX_WIRE + 1, 0, 0);
  CHECK(header_refused(hdr, "exceeds the limit"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, UINT32_MAX, UINT32_MAX, 0, 0);
  CHECK(header_refused(hdr, "exceeds the limit"));
  raw_header(hdr, FRAME_MAGIC, 1, FRAME_F_ZSTD, 0, 1, 100, FRAME_MAX_RAW + 1, 0, 0);
  CHECK(header_refused(hdr, "exceeds the limit"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, FRAME_MAX_RAW + 1, FRAME_MAX_RAW + 1, 0, 0);
  CHECK(header_refused(hdr, "exceeds the limit"));
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 1, 10, 11, 0, 0);
  CHECK(header_refused(hdr, "raw_len 11 != wire_len 10"));
  raw_header(hdr, FRAME_MAGIC, 1, FRAME_F_ZSTD, 0, 1, 20, 20, 0, 0);
  CHECK(header_refused(hdr, "does not shrink"));
  raw_header(hdr, FRAME_MAGIC, 1, FRAME_F_ZSTD, 0, 1, 0, 0, 0, 0);
  CHECK(header_refused(hdr, "does not shrink"));

  /* The edges that are allowed. */
  raw_header(hdr, FRAME_MAGIC, 255, 0, 0, UINT64_MAX, FRAME_MAX_RAW, FRAME_MAX_RAW, 0, 0);
  CHECK(frame_header_decode(hdr, &h, err, sizeof err) == 0 && h.seq == UINT64_MAX);
  raw_header(hdr, FRAME_MAGIC, 0, FRAME_F_ZSTD, 0, 0, 1, FRAME_MAX_RAW, 0, 0);
  CHECK(frame_header_decode(hdr, &h, err, sizeof err) == 0);
  raw_header(hdr, FRAME_MAGIC, 0, 0, 0, 0, 0, 0, XXH3_64bits("", 0), 0);
  CHECK(frame_header_decode(hdr, &h, err, sizeof err) == 0);
  CHECK(frame_header_decode(hdr, &h, NULL, 0) == 0);
  hdr[0] ^= 1;
  CHECK(frame_header_decode(hdr, &h, NULL, 0) == -EPROTO);   /* no err buffer: fine */
}

/* Three frames in one buffer, as on a stream; the middle one's payload is
 * damaged.  The reader must refuse it and still read the third. */
static void test_damaged_payload(void)
{
  struct frame_codec *enc = frame_codec_new(), *dec = frame_codec_new();
  uint8_t stream[3 * (FRAME_HEADER_SIZE + 70000)];
  size_t used = 0;
  uint8_t payload[70000];
  size_t offs[3];
  for (int i = 0; i < 3; i++) {
    if (i == 1)
      fill_pattern(payload, sizeof payload, 11);
    else
      fill_random(payload, sizeof payload, 10 + i);
    const void *wire;
    uint32_t wire_len;
    CHECK(frame_encode(enc, (uint8_t)(20 + i), 500 + i, payload, sizeof payload, 3,
                       stream + used, &wire, &wire_len) == 0);
    memcpy(stream + used + FRAME_HEADER_SIZE, wire, wire_len);
    offs[i] = used;
    used += FRAME_HEADER_SIZE + wire_len;
  }
  for (int damage = 0; damage < 3; damage++) {
    uint8_t copy[sizeof stream];
    memcpy(copy, stream, used);
    /* a bit in the payload of frame 1, at three different places */
    struct frame_header h1;
    CHECK(frame_header_decode(copy + offs[1], &h1, NULL, 0) == 0);
    size_t at = damage == 0 ? 0 : damage == 1 ? h1.wire_len / 2 : h1.wire_len - 1;
    copy[offs[1] + FRAME_HEADER_SIZE + at] ^= 0x04;
    size_t pos = 0;
    for (int i = 0; i < 3; i++) {
      struct frame_header h;
      char err[256] = "";
      CHECK(frame_header_decode(copy + pos, &h, err, sizeof err) == 0);
      CHECK(h.seq == 500u + i && h.type == 20 + i);
      const void *raw = NULL;
      int rc = frame_decode_payload(dec, &h, copy + pos + FRAME_HEADER_SIZE, &raw, err, sizeof err);
      if (i == 1)
        CHECK(rc == -EBADMSG && strstr(err, "hash mismatch") && strstr(err, "seq 501"));
      else
        CHECK(rc == 0 && h.raw_len == sizeof payload);
      pos += FRAME_HEADER_SIZE + h.wire_len;
    }
    CHECK(pos == used);
  }
  /* An empty payload whose hash is wrong is damaged too. */
  uint8_t hdr[FRAME_HEADER_SIZE];
  struct frame_header h;
  raw_header(hdr, FRAME_MAGIC, 1, 0, 0, 5, 0, 0, 12345, 0);
  CHECK(frame_header_decode(hdr, &h, NULL, 0) == 0);
  const void *raw;
  CHECK(frame_decode_payload(dec, &h, NULL, &raw, NULL, 0) == -EBADMSG);
  frame_codec_free(enc);
  frame_codec_free(dec);
}

/* Decodes wire as a zstd frame that claims raw_len; returns the result. */
static int decode_zstd(struct frame_codec *dec, const void *wire, uint32_t wire_len,
                       uint32_t raw_len, char *err, size_t errlen)
{
  uint8_t hdr[FRAME_HEADER_SIZE];
  raw_header(hdr, FRAME_MAGIC, 3, FRAME_F_ZSTD, 0, 77, wire_len, raw_len,
             XXH3_64bits(wire, wire_len), 0);
  struct frame_header h;
  int rc = frame_header_decode(hdr, &h, err, errlen);
  if (rc < 0)
    return rc;
  const void *raw;
  err[0] = '\0';
  return frame_decode_payload(dec, &h, wire, &raw, err, errlen);
}

/* Offset and size of the Frame_Content_Size field of a zstd frame. */
static bool fcs_field(const uint8_t *f, size_t *off, size_t *size)
{
  static const size_t did_size[4] = { 0, 1, 2, 4 };
  uint8_t fhd = f[4];
  bool single = (fhd >> 5) & 1;
  *off = 5 + (single ? 0 : 1) + did_size[fhd & 3];
  switch (fhd >> 6) {
  case 0: *size = single ? 1 : 0; break;
  case 1: *size = 2; break;
  case 2: *size = 4; break;
  default: *size = 8; break;
  }
  return *size > 0;
}

static void test_lying_zstd(void)
{
  struct frame_codec *dec = frame_codec_new();
  size_t cap = ZSTD_compressBound(FRAME_MAX_RAW);
  uint8_t *src = calloc(1, FRAME_MAX_RAW), *z = malloc(2 * cap);
  char err[256];

  /* A bomb: 4 MiB of zeros in a few hundred bytes, in a frame that says
   * it inflates to 1000.  Refused before anything is inflated. */
  size_t n = ZSTD_compress(z, cap, src, FRAME_MAX_RAW, 3);
  CHECK(!ZSTD_isError(n) && n < 1000);
  CHECK(decode_zstd(dec, z, (uint32_t)n, 1000, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "inflates to 4194304 bytes, header says 1000") != NULL);
  /* Told the truth it is fine. */
  CHECK(decode_zstd(dec, z, (uint32_t)n, FRAME_MAX_RAW, err, sizeof err) == 0);

  /* A frame that does not declare its size. */
  fill_pattern(src, 100000, 5);
  ZSTD_CCtx *cc = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
  ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, 1);
  ZSTD_outBuffer out = { z, cap, 0 };
  ZSTD_inBuffer in = { src, 100000, 0 };
  CHECK(ZSTD_compressStream2(cc, &out, &in, ZSTD_e_end) == 0);
  CHECK(decode_zstd(dec, z, (uint32_t)out.pos, 100000, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "declares no content size") != NULL);
  ZSTD_freeCCtx(cc);

  /* A frame whose declared size is smaller than what it really holds:
   * inflating stops at raw_len and is refused. */
  n = ZSTD_compress(z, cap, src, 100000, 1);
  size_t off = 5, size = 0;
  CHECK(!ZSTD_isError(n) && fcs_field(z, &off, &size) && size == 4);
  uint8_t *lie = malloc(n);
  memcpy(lie, z, n);
  put32(lie + off, 50000);
  CHECK(ZSTD_getFrameContentSize(lie, n) == 50000);
  CHECK(decode_zstd(dec, lie, (uint32_t)n, 50000, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "does not inflate to 50000 bytes") != NULL);
  /* ... or larger: stops short. */
  put32(lie + off, 100001);
  CHECK(decode_zstd(dec, lie, (uint32_t)n, 100001, err, sizeof err) == -EBADMSG);
  free(lie);

  /* Two frames where one belongs. */
  size_t n1 = ZSTD_compress(z, cap, src, 5000, 1);
  size_t n2 = ZSTD_compress(z + n1, cap, src, 5000, 1);
  CHECK(!ZSTD_isError(n1) && !ZSTD_isError(n2));
  CHECK(decode_zstd(dec, z, (uint32_t)(n1 + n2), 5000, err, sizeof err) == -EBADMSG);
  CHECK(decode_zstd(dec, z, (uint32_t)(n1 + n2), 10000, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "not one zstd frame") != NULL);
  /* A frame with bytes after it, or cut short. */
  z[n1] = 0;
  CHECK(decode_zstd(dec, z, (uint32_t)n1 + 1, 5000, err, sizeof err) == -EBADMSG);
  CHECK(decode_zstd(dec, z, (uint32_t)n1 - 1, 5000, err, sizeof err) == -EBADMSG);
  CHECK(decode_zstd(dec, z, (uint32_t)n1, 5000, err, sizeof err) == 0);

  /* A skippable frame, and plain garbage, flagged as zstd. */
  uint8_t skip[16] = { 0x50, 0x2a, 0x4d, 0x18, 8, 0, 0, 0 };
  CHECK(decode_zstd(dec, skip, sizeof skip, 100, err, sizeof err) == -EBADMSG);
  uint8_t junk[64];
  fill_random(junk, sizeof junk, 9);
  CHECK(decode_zstd(dec, junk, sizeof junk, 1000, err, sizeof err) == -EBADMSG);
  /* A valid magic with damaged blocks behind it. */
  n = ZSTD_compress(z, cap, src, 100000, 1);
  for (size_t i = 12; i < n; i += n / 7)
    z[i] ^= 0x5a;
  CHECK(decode_zstd(dec, z, (uint32_t)n, 100000, err, sizeof err) == -EBADMSG);

  /* After all that the codec still works. */
  n = ZSTD_compress(z, cap, src, 100000, 1);
  CHECK(decode_zstd(dec, z, (uint32_t)n, 100000, err, sizeof err) == 0);

  free(src);
  free(z);
  frame_codec_free(dec);
}

int main(void)
{
  test_round_trips();
  test_header_checks();
  test_damaged_payload();
  test_lying_zstd();
  if (failures) {
    fprintf(stderr, "test_link_frame: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_link_frame: ok\n");
  return 0;
}
