/* proto: the replication session protocol carried in site link frames
 * (docs/protocol.md has the whole story; this is the wire layout).
 *
 * One session per migration, on one link connection at a time, opened by
 * the source.  The source's frames that change the destination (DATA, CTRL,
 * BLOB) carry consecutive sequence numbers starting at 1; the destination
 * applies them strictly in order, so "everything up to seq N" describes its
 * state, acknowledges durability with ACK(N), and after a reconnect tells the
 * source the N it holds (HELLO_OK), from which the source sends again.  A
 * frame whose payload fails its checksum is answered by NACK(seq): the source
 * sends again from seq, and the destination drops what arrives out of order
 * meanwhile.  HELLO, PING and the destination's frames are not sequenced
 * (seq 0).
 *
 *   type         dir   payload
 *   HELLO    1   s->d  JSON {"session","migration","vm","mode","source_site","disks":[{"name",
 *                      "size","granularity"}],"protocol":1}
 *   HELLO_OK 2   d->s  JSON {"session","applied_seq","state","disks":[{"name","bg_hwm"}]}
 *   DATA     3   s->d  data header (below) + bytes for DATA_KIND_DATA
 *   CTRL     4   s->d  JSON {"op":..., "req":N, ...}   (proto_parse_ctrl)
 *   REPLY    5   d->s  JSON {"req":N, "ok":bool, "error":"...", ...}
 *   ACK      6   d->s  u64 applied_seq, everything up to it durable
 *   NACK     7   d->s  u64 seq to send again from
 *   PING     8   s->d  u64 sender's clock (ns), echoed in PONG
 *   PONG     9   d->s  u64 the PING's value
 *   BLOB    10   s->d  u64 offset, u64 total, bytes: a piece of the VM state
 *   HASHES  11   d->s  u64 req, u32 disk, u32 count, u64 first region, count x u64
 *   ERROR   12   d->s  JSON {"error":"...","fatal":bool}; the sender closes after it
 *
 * Two other kinds of link connection start with another first frame:
 *   TUNNEL_OPEN 13 s->d  JSON {"migration"}; d->s JSON {"ok":true} (or ERROR): a
 *                        tunnel for a QEMU migration stream (tunnel.c)
 *   TUNNEL_DATA 14 both  bytes of the stream
 *   TUNNEL_EOF  15 both  end of that direction
 *   QUERY       16 s->d  JSON {"op":"preflight", ...}: a question that changes
 *                        nothing (preflight.c); answered by
 *   QUERY_REPLY 17 d->s  JSON, then the connection closes
 *
 * A warm migration's session (warm_source.c, warm_dest.c; docs/protocol.md)
 * starts with WARM_HELLO and uses only unsequenced frames: every request is
 * idempotent and asked again after a reconnect.
 *   WARM_HELLO  18 s->d  HELLO's JSON with "mode":"warm" and "warm":{rpo_s, quota:[..],
 *                        prefetch, hydrate_bps, degraded_after_s}; answered by WARM_REPLY req 0
 *   WARM_REQ    19 both  JSON {"op":..., "req":N, ...}; req 0 wants no answer
 *   WARM_REPLY  20 both  JSON {"req":N, "ok":bool, "error":"...", ...}
 *   WARM_FETCH  21 d->s  u32 disk, u32 count, u64 first region: a cache miss or hydration
 *   WARM_FILL   22 s->d  u32 disk, u32 count, u64 first region, u32 kind (1 data, 2 zero,
 *                        3 error), u32 errno; data: the regions' bytes clipped at the disk end
 *   WARM_MAP    23 s->d  u32 disk, u32 kind (1 holes: bitmap words from u64 index; 2 hot:
 *                        region numbers from position u64 index), u64 index, u64 values
 *   WARM_WB     24 d->s  u64 point, u64 offset, bytes of that point's journal file
 *   (BLOB       10 s->d  the VM state, as in live migration, unsequenced here)
 *
 * DATA header (24 bytes, little endian): u32 disk index, u8 kind (1 data,
 * 2 zero), u8 flags (DATA_F_BACKGROUND: sent by the background cursor, so
 * the destination's background high-water mark moves to its end), u16 0,
 * u64 offset, u64 length.  Data frames carry exactly `length` bytes after the
 * header; zero frames none (length may exceed a frame).
 *
 * Every parser here validates everything it reads and returns -EPROTO with a
 * message on anything malformed; none trusts a length it has not checked
 * against the payload (fuzz/fuzz_proto.c).
 */
#ifndef FERRY_PROTO_H
#define FERRY_PROTO_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION 1

enum proto_type {
  MSG_HELLO = 1,
  MSG_HELLO_OK = 2,
  MSG_DATA = 3,
  MSG_CTRL = 4,
  MSG_REPLY = 5,
  MSG_ACK = 6,
  MSG_NACK = 7,
  MSG_PING = 8,
  MSG_PONG = 9,
  MSG_BLOB = 10,
  MSG_HASHES = 11,
  MSG_ERROR = 12,
  MSG_TUNNEL_OPEN = 13,
  MSG_TUNNEL_DATA = 14,
  MSG_TUNNEL_EOF = 15,
  MSG_QUERY = 16,
  MSG_QUERY_REPLY = 17,
  MSG_WARM_HELLO = 18,
  MSG_WARM_REQ = 19,
  MSG_WARM_REPLY = 20,
  MSG_WARM_FETCH = 21,
  MSG_WARM_FILL = 22,
  MSG_WARM_MAP = 23,
  MSG_WARM_WB = 24,
};
const char *proto_type_name(unsigned type);
/* True for the source's frames that carry a sequence number. */
bool proto_is_sequenced(unsigned type);

#define DATA_HEADER_SIZE 24
#define DATA_KIND_DATA 1
#define DATA_KIND_ZERO 2
#define DATA_F_BACKGROUND 1u
#define PROTO_MAX_DISKS 16
#define PROTO_MAX_HASHES 16384                /* regions per HASHES reply */
#define PROTO_MAX_BLOB (256u * 1024 * 1024)   /* largest VM state */

struct proto_data {
  uint32_t disk;
  uint8_t kind;
  uint8_t flags;
  uint64_t offset, length;
  const void *bytes;         /* DATA_KIND_DATA: length bytes, inside the payload */
};

void proto_data_encode(const struct proto_data *d, uint8_t out[DATA_HEADER_SIZE]);
int proto_data_parse(const void *payload, uint32_t len, struct proto_data *out, char *err,
                     size_t errlen);

struct proto_blob {
  uint64_t offset, total;
  const void *bytes;
  uint32_t len;
};
#define BLOB_HEADER_SIZE 16
void proto_blob_encode(uint64_t offset, uint64_t total, uint8_t out[BLOB_HEADER_SIZE]);
int proto_blob_parse(const void *payload, uint32_t len, struct proto_blob *out, char *err,
                     size_t errlen);

#define HASHES_HEADER_SIZE 24
struct proto_hashes {
  uint64_t req;
  uint32_t disk, count;
  uint64_t first;
  const uint8_t *hashes;     /* count little-endian u64, inside the payload */
};
void proto_hashes_encode_header(const struct proto_hashes *h, uint8_t out[HASHES_HEADER_SIZE]);
int proto_hashes_parse(const void *payload, uint32_t len, struct proto_hashes *out, char *err,
                       size_t errlen);
uint64_t proto_hash_at(const struct proto_hashes *h, uint32_t i);

/* u64 payloads of ACK, NACK, PING, PONG. */
void proto_u64_encode(uint64_t v, uint8_t out[8]);
int proto_u64_parse(const void *payload, uint32_t len, uint64_t *out, char *err, size_t errlen);

/* A JSON object payload (HELLO, HELLO_OK, CTRL, REPLY, ERROR); NULL with err
 * when not one (or deeper/longer than sane). */
json_t *proto_json_parse(const void *payload, uint32_t len, char *err, size_t errlen);

/* CTRL requests, checked field by field. */
enum proto_op {
  OP_FLUSH = 1,        /* make everything applied durable; reply {"applied_seq"} */
  OP_HASH,             /* {"disk","first","count"} or {"disk","regions":[...]}: reply is a
                          HASHES frame, one hash per region in the order asked */
  OP_VM_STATE,         /* {"size","xxh64"}: the BLOB frames before it are the whole state */
  OP_ACTIVATE,         /* {"vm":{vm_spec_to_json},"incoming":bool}: the destination becomes
                          authoritative and starts the VM (from the state sent), or, with
                          "incoming", just takes the disks: its QEMU is waiting for RAM */
  OP_COMPLETE,         /* {"downtime_ms", ...}: the migration is done */
  OP_ABORT,            /* {"reason"}: undo everything at the destination */
  OP_PREPARE_INCOMING, /* {"vm"}: start the VM's QEMU waiting for its RAM (-incoming) */
  OP_INCOMING_STATUS,  /* reply {"status","running","resumed_at_ns","exited"} */
  OP_DISCARD_INCOMING, /* the waiting QEMU goes; disks fenced again (refused once the
                          guest ran there) */
};
struct proto_ctrl {
  enum proto_op op;
  uint64_t req;
  uint32_t disk;                   /* HASH */
  uint64_t first, count;           /* HASH: regions [first, first+count), or ... */
  json_t *regions;                 /* ... these count regions (borrowed), when not NULL */
  uint64_t size, xxh64;            /* VM_STATE */
  json_t *body;                    /* the whole request (borrowed from the parse) */
};
int proto_parse_ctrl(json_t *j, struct proto_ctrl *out, char *err, size_t errlen);

/* HELLO, checked: names valid, sizes and granularities sane, <= PROTO_MAX_DISKS. */
struct proto_hello_disk {
  char name[65];
  uint64_t size, granularity;
};
struct proto_hello {
  char session[48];
  char mode[8];                    /* "live" (default) | "cold" | "warm" */
  char vm[65];
  char source_site[65];
  unsigned ndisks;
  struct proto_hello_disk disks[PROTO_MAX_DISKS];
};
int proto_parse_hello(json_t *j, struct proto_hello *out, char *err, size_t errlen);

/* ---- warm sessions ---- */
#define WARM_MAX_FETCH 16            /* regions per FETCH (= CACHE_MAX_FETCH_REGIONS) */
#define WARM_FETCH_SIZE 16
#define WARM_FILL_HEADER 24
#define WARM_FILL_DATA 1
#define WARM_FILL_ZERO 2
#define WARM_FILL_ERROR 3
#define WARM_MAP_HEADER 16
#define WARM_MAP_HOLES 1
#define WARM_MAP_HOT 2
#define WARM_MAP_MAX_VALUES 8192     /* u64 values per MAP frame */
#define WARM_WB_HEADER 16
struct proto_fetch {
  uint32_t disk, count;
  uint64_t first;
};
void proto_fetch_encode(const struct proto_fetch *f, uint8_t out[WARM_FETCH_SIZE]);
/* count 1..WARM_MAX_FETCH; disk < PROTO_MAX_DISKS.  The caller checks the range. */
int proto_fetch_parse(const void *payload, uint32_t len, struct proto_fetch *out, char *err,
                      size_t errlen);
struct proto_fill {
  uint32_t disk, count;
  uint64_t first;
  uint32_t kind, error;
  const void *bytes;                 /* WARM_FILL_DATA: len bytes inside the payload */
  uint32_t len;
};
void proto_fill_encode_header(const struct proto_fill *f, uint8_t out[WARM_FILL_HEADER]);
/* Checks the header; data only with kind DATA (the caller checks its length
 * against the regions' clipped size), none otherwise. */
int proto_fill_parse(const void *payload, uint32_t len, struct proto_fill *out, char *err,
                     size_t errlen);
struct proto_map {
  uint32_t disk, kind;
  uint64_t index;
  const uint8_t *values;             /* count little-endian u64 */
  uint32_t count;
};
void proto_map_encode_header(const struct proto_map *m, uint8_t out[WARM_MAP_HEADER]);
int proto_map_parse(const void *payload, uint32_t len, struct proto_map *out, char *err,
                    size_t errlen);
uint64_t proto_map_value(const struct proto_map *m, uint32_t i);
struct proto_wb {
  uint64_t point, offset;
  const void *bytes;
  uint32_t len;
};
void proto_wb_encode_header(uint64_t point, uint64_t offset, uint8_t out[WARM_WB_HEADER]);
int proto_wb_parse(const void *payload, uint32_t len, struct proto_wb *out, char *err,
                   size_t errlen);
/* The "warm" object of a WARM_HELLO, checked. */
struct proto_warm_params {
  uint64_t rpo_s;                    /* 1..86400 */
  uint64_t quota[PROTO_MAX_DISKS];   /* bytes of cache per disk (0: the disk's size) */
  char prefetch[8];                  /* "hot" | "none" */
  uint64_t hydrate_bps;              /* 0 = no background hydration */
  uint64_t degraded_after_s;         /* 1..86400 */
};
int proto_parse_warm_params(json_t *j, unsigned ndisks, struct proto_warm_params *out,
                            char *err, size_t errlen);

/* Migration ids: "m-" + 12 lowercase hex digits. */
bool proto_id_is_valid(const char *s);

#endif
