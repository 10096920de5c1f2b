/* fuzz_link_frame: libFuzzer target for the site link's frame decoder
 * (src/link/frame.c): the header checks and the payload checks (hash, zstd
 * content size, inflation), fed as one byte stream of frames the way a
 * receiver reads them off the connection.
 *
 * Input: one mode byte, then frames (40-byte header + wire_len bytes).
 *   bit 0  recompute each header's check before decoding, and
 *   bit 1  recompute each payload hash, so that mutations get past the
 *          checksums into the length rules and the zstd decoder (without
 *          them the fuzzer would mostly test XXH3);
 *   bits 2-3  zstd level of the re-encode: 0, 1, 3, -1.
 * For every frame: a header refused must be -EPROTO and ends the stream (as
 * on a connection); a header accepted must re-encode to the same 40 bytes;
 * a payload is decoded from an exactly sized copy (so ASan sees any read
 * past wire_len) and must give 0 or -EBADMSG; a decoded payload is encoded
 * again and must come back identical.  The codecs live across inputs, as on
 * a connection, so state left behind by a bad frame is caught too. */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "link/frame.h"

#define ROUND_TRIP_MAX (256 * 1024)   /* larger payloads are decoded, not re-encoded */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
  if (!cond) {
    fprintf(stderr, "fuzz_link_frame: %s\n", what);
    abort();
  }
}

static uint32_t get32(const uint8_t *p)
{
  uint32_t v;
  memcpy(&v, p, 4);
  return le32toh(v);
}

/* Encodes raw again and decodes the result: must be raw. */
static void round_trip(struct frame_codec *enc, struct frame_codec *dec2,
                       const struct frame_header *h, const void *raw, int level)
{
  uint8_t hdr[FRAME_HEADER_SIZE];
  const void *wire;
  uint32_t wire_len;
  int rc = frame_encode(enc, h->type, h->seq, raw, h->raw_len, level, hdr, &wire, &wire_len);
  check(rc == 0, "encode of a decoded payload failed");
  struct frame_header h2;
  char err[256];
  check(frame_header_decode(hdr, &h2, err, sizeof err) == 0, "own header refused");
  check(h2.type == h->type && h2.seq == h->seq && h2.raw_len == h->raw_len &&
        h2.wire_len == wire_len, "own header fields differ");
  uint8_t *copy = malloc(wire_len ? wire_len : 1);
  memcpy(copy, wire, wire_len);
  const void *back;
  check(frame_decode_payload(dec2, &h2, copy, &back, err, sizeof err) == 0, "own payload refused");
  check(h->raw_len == 0 || memcmp(back, raw, h->raw_len) == 0, "round trip differs");
  free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static struct frame_codec *dec, *enc, *dec2;
  static const int levels[4] = { 0, 1, 3, -1 };
  if (!dec) {
    dec = frame_codec_new();
    enc = frame_codec_new();
    dec2 = frame_codec_new();
    check(dec && enc && dec2, "codec_new");
  }
  if (size < 1)
    return 0;
  uint8_t mode = data[0];
  int level = levels[(mode >> 2) & 3];
  size_t pos = 1;
  while (size - pos >= FRAME_HEADER_SIZE) {
    uint8_t hdr[FRAME_HEADER_SIZE];
    memcpy(hdr, data + pos, FRAME_HEADER_SIZE);
    size_t avail = size - pos - FRAME_HEADER_SIZE;
    const uint8_t *payload = data + pos + FRAME_HEADER_SIZE;
    uint32_t claimed = get32(hdr + 16);
    if (mode & 2) {
      uint64_t hash = htole64(XXH3_64bits(payload, claimed < avail ? claimed : avail));
      memcpy(hdr + 24, &hash, 8);
    }
    if (mode & 1) {
      uint32_t chk = htole32(XXH32(hdr, 32, 0));
      memcpy(hdr + 32, &chk, 4);
    }

    struct frame_header h;
    char err[256] = "";
    int rc = frame_header_decode(hdr, &h, err, sizeof err);
    if (rc != 0) {
      check(rc == -EPROTO && err[0], "header refused without -EPROTO and a message");
      break;   /* out of step: a connection ends here */
    }
    uint8_t again[FRAME_HEADER_SIZE];
    frame_header_encode(&h, again);
    check(memcmp(again, hdr, FRAME_HEADER_SIZE) == 0, "accepted header does not re-encode");
    check(h.wire_len <= FRAME_MAX_WIRE && h.raw_len <= FRAME_MAX_RAW, "limits");
    if (h.wire_len > avail)
      break;   /* the stream ends inside the payload */

    uint8_t *copy = malloc(h.wire_len ? h.wire_len : 1);
    memcpy(copy, payload, h.wire_len);
    const void *raw = NULL;
    err[0] = '\0';
    rc = frame_decode_payload(dec, &h, copy, &raw, err, sizeof err);
    check(rc == 0 || rc == -EBADMSG, "payload result neither 0 nor -EBADMSG");
    if (rc == -EBADMSG)
      check(err[0] != '\0', "-EBADMSG without a message");
    if (rc == 0) {
      check(raw != NULL, "no payload pointer");
      volatile uint64_t sink = XXH64(raw, h.raw_len, 0);   /* every byte must be readable */
      (void)sink;
      if (h.raw_len <= ROUND_TRIP_MAX)
        round_trip(enc, dec2, &h, raw, level);
    }
    free(copy);
    pos += FRAME_HEADER_SIZE + h.wire_len;
  }
  return 0;
}
