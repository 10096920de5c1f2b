/* frame: encoding and checking of site link frames (format in frame.h).
 *
 * DESIGN
 * The header is checked completely before a single payload byte is read: the
 * receiver sizes its buffer by wire_len, so a header that passed here bounds
 * the memory a peer can make us use (FRAME_MAX_WIRE to receive plus
 * FRAME_MAX_RAW to inflate, per connection).  Beyond what frame.h lists, a
 * compressed frame must be strictly smaller than its raw size: the encoder
 * never sends anything else, so a header that says otherwise is not ours.
 *
 * A zstd payload is trusted only after three checks, each of which leaves
 * the stream in step (-EBADMSG): the XXH3 hash over the wire bytes; exactly
 * one zstd frame filling the payload whose header declares a content size
 * equal to raw_len; and decompression into a buffer of exactly raw_len bytes
 * that yields exactly raw_len bytes.  So a payload can never inflate past
 * raw_len (zstd stops at the buffer's end), whatever it claims.
 *
 * Codec buffers grow on demand (to the largest frame seen, at most
 * ZSTD_compressBound(FRAME_MAX_RAW) to compress and FRAME_MAX_RAW to
 * inflate) and are then reused; so are the zstd contexts.
 *
 * Thread model: a codec is used by one thread at a time (the caller's lock);
 * the header functions are pure.  Naming: frame_* are public (frame.h). */
#include "link/frame.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>
#include <zstd.h>

_Static_assert(ZSTD_COMPRESSBOUND(FRAME_MAX_RAW) <= FRAME_MAX_WIRE,
               "FRAME_MAX_WIRE must hold the worst zstd expansion of FRAME_MAX_RAW");
_Static_assert(FRAME_MAGIC == 0x31595246u, "\"FRY1\" read as little endian");

#define HDR_CHECK_OFF 32
#define BUF_MIN       (64 * 1024)      /* first allocation of a codec buffer */

struct frame_codec {
  ZSTD_CCtx *cctx;         /* made on the first compressed encode */
  ZSTD_DCtx *dctx;         /* made on the first compressed decode */
  int cctx_level;          /* level set on cctx (0: none yet) */
  unsigned char *cbuf;     /* compression output */
  size_t cbuf_cap;
  unsigned char *dbuf;     /* decompression output */
  size_t dbuf_cap;
};

static void put16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* ---- header ---- */

void frame_header_encode(const struct frame_header *h, uint8_t out[FRAME_HEADER_SIZE])
{
  put32(out, FRAME_MAGIC);
  out[4] = h->type;
  out[5] = h->flags;
  put16(out + 6, 0);
  put64(out + 8, h->seq);
  put32(out + 16, h->wire_len);
  put32(out + 20, h->raw_len);
  put64(out + 24, h->payload_hash);
  put32(out + HDR_CHECK_OFF, XXH32(out, HDR_CHECK_OFF, 0));
  put32(out + 36, 0);
}

int frame_header_decode(const uint8_t in[FRAME_HEADER_SIZE], struct frame_header *h,
                        char *err, size_t errlen)
{
  uint32_t magic = get32(in);
  if (magic != FRAME_MAGIC) {
    set_err(err, errlen, "bad frame magic 0x%08x (want 0x%08x)", magic, FRAME_MAGIC);
    return -EPROTO;
  }
  uint32_t check = get32(in + HDR_CHECK_OFF), want = XXH32(in, HDR_CHECK_OFF, 0);
  if (check != want) {
    set_err(err, errlen, "frame header checksum mismatch (0x%08x, computed 0x%08x)", check,
            want);
    return -EPROTO;
  }
  uint8_t flags = in[5];
  uint16_t res16 = get16(in + 6);
  uint32_t res32 = get32(in + 36);
  if (res16 || res32) {
    set_err(err, errlen, "frame header reserved fields are not zero (0x%04x, 0x%08x)", res16,
            res32);
    return -EPROTO;
  }
  if (flags & ~FRAME_F_ZSTD) {
    set_err(err, errlen, "unknown frame flags 0x%02x", flags & ~FRAME_F_ZSTD);
    return -EPROTO;
  }
  uint32_t wire_len = get32(in + 16), raw_len = get32(in + 20);
  if (wire_len > FRAME_MAX_WIRE) {
    set_err(err, errlen, "frame payload of %u bytes exceeds the limit of %u", wire_len,
            FRAME_MAX_WIRE);
    return -EPROTO;
  }
  if (raw_len > FRAME_MAX_RAW) {
    set_err(err, errlen, "frame raw payload of %u bytes exceeds the limit of %u", raw_len,
            FRAME_MAX_RAW);
    return -EPROTO;
  }
  if (!(flags & FRAME_F_ZSTD) && raw_len != wire_len) {
    set_err(err, errlen, "uncompressed frame with raw_len %u != wire_len %u", raw_len,
            wire_len);
    return -EPROTO;
  }
  if ((flags & FRAME_F_ZSTD) && wire_len >= raw_len) {
    set_err(err, errlen, "compressed frame of %u bytes does not shrink its %u raw bytes",
            wire_len, raw_len);
    return -EPROTO;
  }
  h->type = in[4];
  h->flags = flags;
  h->seq = get64(in + 8);
  h->wire_len = wire_len;
  h->raw_len = raw_len;
  h->payload_hash = get64(in + 24);
  return 0;
}

/* ---- codec ---- */

struct frame_codec *frame_codec_new(void)
{
  return calloc(1, sizeof(struct frame_codec));
}

void frame_codec_free(struct frame_codec *c)
{
  if (!c)
    return;
  ZSTD_freeCCtx(c->cctx);
  ZSTD_freeDCtx(c->dctx);
  free(c->cbuf);
  free(c->dbuf);
  free(c);
}

/* Makes *buf hold at least need bytes (need <= limit), doubling from
 * BUF_MIN so a stream of growing frames reallocates a few times only. */
static int buf_reserve(unsigned char **buf, size_t *cap, size_t need, size_t limit)
{
  if (need <= *cap)
    return 0;
  size_t n = *cap ? *cap : BUF_MIN;
  while (n < need)
    n *= 2;
  if (n > limit)
    n = limit;
  unsigned char *p = malloc(n);   /* old contents are never needed */
  if (!p)
    return -ENOMEM;
  free(*buf);
  *buf = p;
  *cap = n;
  return 0;
}

/* Compresses into c->cbuf; returns the compressed size, or 0 when the
 * payload should go raw (it does not shrink, or zstd failed). */
static size_t compress_payload(struct frame_codec *c, const void *payload, uint32_t len,
                               int level, int *rc)
{
  *rc = 0;
  if (!c->cctx) {
    c->cctx = ZSTD_createCCtx();
    if (!c->cctx) {
      *rc = -ENOMEM;
      return 0;
    }
  }
  if (level < ZSTD_minCLevel())
    level = ZSTD_minCLevel();
  if (level > ZSTD_maxCLevel())
    level = ZSTD_maxCLevel();
  if (c->cctx_level != level) {
    if (ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_compressionLevel, level)))
      return 0;
    /* The receiver insists on a declared content size; no zstd checksum:
     * XXH3 over the wire bytes already covers the payload. */
    ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_contentSizeFlag, 1);
    ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_checksumFlag, 0);
    c->cctx_level = level;
  }
  size_t bound = ZSTD_compressBound(len);
  if ((*rc = buf_reserve(&c->cbuf, &c->cbuf_cap, bound, FRAME_MAX_WIRE)) < 0)
    return 0;
  size_t n = ZSTD_compress2(c->cctx, c->cbuf, c->cbuf_cap, payload, len);
  if (ZSTD_isError(n)) {
    ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_only);
    return 0;
  }
  return n < len ? n : 0;
}

int frame_encode(struct frame_codec *c, uint8_t type, uint64_t seq, const void *payload,
                 uint32_t len, int level, uint8_t hdr_out[FRAME_HEADER_SIZE],
                 const void **wire, uint32_t *wire_len)
{
  if (len > FRAME_MAX_RAW || (len && !payload))
    return -EINVAL;
  struct frame_header h = { .type = type, .seq = seq, .raw_len = len, .wire_len = len };
  const void *out = len ? payload : "";
  if (level != 0 && len > 0) {
    int rc;
    size_t n = compress_payload(c, payload, len, level, &rc);
    if (rc < 0)
      return rc;
    if (n) {
      h.flags = FRAME_F_ZSTD;
      h.wire_len = (uint32_t)n;
      out = c->cbuf;
    }
  }
  h.payload_hash = XXH3_64bits(out, h.wire_len);
  frame_header_encode(&h, hdr_out);
  *wire = out;
  *wire_len = h.wire_len;
  return 0;
}

int frame_decode_payload(struct frame_codec *c, const struct frame_header *h, const void *wire,
                         const void **raw, char *err, size_t errlen)
{
  bool zstd = h->flags & FRAME_F_ZSTD;
  /* Only headers that frame_header_decode accepted come here; check the
   * lengths again anyway, they size everything below. */
  if (h->wire_len > FRAME_MAX_WIRE || h->raw_len > FRAME_MAX_RAW ||
      (zstd ? h->wire_len >= h->raw_len : h->wire_len != h->raw_len) ||
      (h->wire_len && !wire)) {
    set_err(err, errlen, "frame header not checked (wire_len %u, raw_len %u)", h->wire_len,
            h->raw_len);
    return -EINVAL;
  }
  if (!wire)
    wire = "";
  uint64_t hash = XXH3_64bits(wire, h->wire_len);
  if (hash != h->payload_hash) {
    set_err(err, errlen, "frame payload hash mismatch (seq %llu, type %u, %u bytes)",
            (unsigned long long)h->seq, h->type, h->wire_len);
    return -EBADMSG;
  }
  if (!zstd) {
    *raw = wire;
    return 0;
  }

  /* One zstd frame, filling the payload exactly, that declares raw_len. */
  size_t fsize = ZSTD_findFrameCompressedSize(wire, h->wire_len);
  if (ZSTD_isError(fsize) || fsize != h->wire_len) {
    set_err(err, errlen, "compressed frame payload (seq %llu) is not one zstd frame of %u bytes",
            (unsigned long long)h->seq, h->wire_len);
    return -EBADMSG;
  }
  unsigned long long content = ZSTD_getFrameContentSize(wire, h->wire_len);
  if (content != h->raw_len) {
    if (content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR)
      set_err(err, errlen, "compressed frame payload (seq %llu) declares no content size",
              (unsigned long long)h->seq);
    else
      set_err(err, errlen,
              "compressed frame payload (seq %llu) inflates to %llu bytes, header says %u",
              (unsigned long long)h->seq, content, h->raw_len);
    return -EBADMSG;
  }
  if (!c->dctx) {
    c->dctx = ZSTD_createDCtx();
    if (!c->dctx)
      return -ENOMEM;
  }
  int rc = buf_reserve(&c->dbuf, &c->dbuf_cap, h->raw_len, FRAME_MAX_RAW);
  if (rc < 0)
    return rc;
  /* dst capacity raw_len, not dbuf_cap: nothing can inflate past raw_len. */
  size_t n = ZSTD_decompressDCtx(c->dctx, c->dbuf, h->raw_len, wire, h->wire_len);
  if (ZSTD_isError(n) || n != h->raw_len) {
    set_err(err, errlen, "compressed frame payload (seq %llu) does not inflate to %u bytes: %s",
            (unsigned long long)h->seq, h->raw_len,
            ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short");
    ZSTD_DCtx_reset(c->dctx, ZSTD_reset_session_only);
    return -EBADMSG;
  }
  *raw = c->dbuf;
  return 0;
}
