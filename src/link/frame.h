/* frame: the unit of the site link between two ferryd sites.
 *
 * A frame is a fixed 40-byte header followed by a payload of wire_len bytes.
 * The header carries its own checksum, so a damaged header is told apart
 * from a damaged payload:
 *   - bad header (magic, checksum, reserved bits, lengths): the stream is out
 *     of step and cannot be trusted any further -> -EPROTO, the connection
 *     must be dropped (the session resumes on a new one);
 *   - bad payload (hash mismatch, or a zstd payload that does not inflate to
 *     exactly raw_len bytes): the header is sound, so the receiver knows the
 *     frame's seq and the stream stays in step -> -EBADMSG, the receiver
 *     asks for the frame again (the session layer's NACK); nothing of the
 *     frame is used.
 *
 * ON THE WIRE (little endian)
 *   0  u32 magic FRAME_MAGIC ("FRY1")
 *   4  u8  type       (the session protocol's; the frame layer does not
 *                      interpret it)
 *   5  u8  flags      FRAME_F_ZSTD: payload is one zstd frame; other bits
 *                      must be 0
 *   6  u16 reserved   0
 *   8  u64 seq        the session protocol's sequence number
 *   16 u32 wire_len   payload bytes that follow, <= FRAME_MAX_WIRE
 *   20 u32 raw_len    payload bytes after decompression, <= FRAME_MAX_RAW;
 *                     equal to wire_len when not compressed, greater than
 *                     wire_len when compressed (see below)
 *   24 u64 payload_hash XXH3_64bits(payload as sent on the wire)
 *   32 u32 header_check XXH32(bytes 0..31, seed 0)
 *   36 u32 reserved   0
 *
 * The encoder compresses with zstd at the level it is given (0: never) and
 * sends the payload raw when compression does not make it smaller; so a
 * compressed frame whose wire_len is not below its raw_len is a bad header.
 *
 * Thread model: a frame_codec holds zstd contexts and scratch buffers; one
 * per direction of a connection, used by one thread at a time.  The header
 * functions are pure.
 */
#ifndef FERRY_LINK_FRAME_H
#define FERRY_LINK_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_MAGIC        0x31595246u          /* "FRY1" read as little endian */
#define FRAME_HEADER_SIZE  40
#define FRAME_MAX_RAW      (4u * 1024 * 1024)   /* largest payload, decompressed */
#define FRAME_MAX_WIRE     (FRAME_MAX_RAW + FRAME_MAX_RAW / 128 + 4096)  /* >= ZSTD_compressBound */
#define FRAME_F_ZSTD       0x01u

struct frame_header {
  uint8_t type;
  uint8_t flags;
  uint64_t seq;
  uint32_t wire_len;
  uint32_t raw_len;
  uint64_t payload_hash;
};

/* Writes the 40 header bytes (computes header_check). */
void frame_header_encode(const struct frame_header *h, uint8_t out[FRAME_HEADER_SIZE]);
/* Parses and checks 40 header bytes.  Returns 0, or -EPROTO with a message
 * in err ("bad frame magic 0x...", "frame header checksum mismatch",
 * "frame payload of N bytes exceeds the limit of M", ...). */
int frame_header_decode(const uint8_t in[FRAME_HEADER_SIZE], struct frame_header *h,
                        char *err, size_t errlen);

struct frame_codec;
struct frame_codec *frame_codec_new(void);
void frame_codec_free(struct frame_codec *c);

/* Encodes one frame: fills *hdr_out (40 bytes) and points *wire / *wire_len
 * at the payload to send (either payload itself or the codec's compression
 * buffer, valid until the next call).  len <= FRAME_MAX_RAW.  level: 0 = no
 * compression, otherwise a zstd level (negative levels allowed).  Returns 0
 * or -errno (-EINVAL: len too large; -ENOMEM). */
int frame_encode(struct frame_codec *c, uint8_t type, uint64_t seq, const void *payload,
                 uint32_t len, int level, uint8_t hdr_out[FRAME_HEADER_SIZE],
                 const void **wire, uint32_t *wire_len);

/* Checks and decodes the payload of a frame whose header decoded: verifies
 * payload_hash, inflates a zstd payload to exactly raw_len bytes.  On success
 * returns 0 and points *raw at raw_len bytes (wire itself or the codec's
 * buffer, valid until the next call).  -EBADMSG (with a message) when the
 * payload is damaged, -ENOMEM. */
int frame_decode_payload(struct frame_codec *c, const struct frame_header *h, const void *wire,
                         const void **raw, char *err, size_t errlen);

#endif
