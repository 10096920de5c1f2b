/* fuzz_proto: libFuzzer target for every parser of the replication session
 * protocol (src/replicate/proto.c): what a destination reads from a source
 * (HELLO, DATA, CTRL, BLOB, PING, TUNNEL_OPEN, QUERY, and the VM description
 * in them: vm_spec_from_json) and what a source reads from a destination
 * (HELLO_OK, REPLY, ACK, NACK, HASHES, ERROR, QUERY_REPLY), and a warm
 * session's frames both ways (WARM_HELLO and its "warm" parameters,
 * WARM_FETCH, WARM_FILL, WARM_MAP, WARM_WB, WARM_REQ/REPLY).
 *
 * The first input byte picks the frame type (as on the wire), the rest is the
 * payload, exactly as link_recv hands it over.  Accepted inputs are checked
 * for the parsers' promises: every range a parse returns lies inside the
 * payload it came from. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "replicate/proto.h"
#include "vm/vm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static int initialised;
  if (!initialised) {
    log_set_level(LOG_ERROR);
    initialised = 1;
  }
  if (size < 1 || size > (1u << 20))
    return 0;
  uint8_t type = data[0] % 25;
  /* A copy of exactly the payload, so ASan sees any read past its end. */
  uint32_t len = (uint32_t)(size - 1);
  uint8_t *p = malloc(len ? len : 1);
  if (!p)
    return 0;
  memcpy(p, data + 1, len);
  char err[256];
  switch (type) {
  case MSG_DATA: {
    struct proto_data d;
    if (proto_data_parse(p, len, &d, err, sizeof err) == 0) {
      if (d.kind == DATA_KIND_DATA) {
        if ((const uint8_t *)d.bytes + d.length != p + len)
          abort();
        volatile uint8_t x = d.length ? ((const uint8_t *)d.bytes)[d.length - 1] : 0;
        (void)x;
      }
      uint8_t hdr[DATA_HEADER_SIZE];
      proto_data_encode(&d, hdr);
      if (memcmp(hdr, p, DATA_HEADER_SIZE) != 0)
        abort();                          /* parse and encode agree */
    }
    break;
  }
  case MSG_BLOB: {
    struct proto_blob b;
    if (proto_blob_parse(p, len, &b, err, sizeof err) == 0 &&
        ((const uint8_t *)b.bytes + b.len != p + len || b.offset + b.len > b.total))
      abort();
    break;
  }
  case MSG_HASHES: {
    struct proto_hashes h;
    if (proto_hashes_parse(p, len, &h, err, sizeof err) == 0)
      for (uint32_t i = 0; i < h.count; i++)
        (void)proto_hash_at(&h, i);
    break;
  }
  case MSG_WARM_FETCH: {
    struct proto_fetch f;
    if (proto_fetch_parse(p, len, &f, err, sizeof err) == 0) {
      uint8_t b[WARM_FETCH_SIZE];
      proto_fetch_encode(&f, b);
      if (memcmp(b, p, WARM_FETCH_SIZE) != 0 || f.count == 0 || f.count > WARM_MAX_FETCH)
        abort();
    }
    break;
  }
  case MSG_WARM_FILL: {
    struct proto_fill f;
    if (proto_fill_parse(p, len, &f, err, sizeof err) == 0) {
      if ((const uint8_t *)f.bytes + f.len != p + len || (f.kind != WARM_FILL_DATA && f.len))
        abort();
      volatile uint8_t x = f.len ? ((const uint8_t *)f.bytes)[f.len - 1] : 0;
      (void)x;
    }
    break;
  }
  case MSG_WARM_MAP: {
    struct proto_map m;
    if (proto_map_parse(p, len, &m, err, sizeof err) == 0) {
      if (m.values + 8 * (size_t)m.count != p + len)
        abort();
      for (uint32_t i = 0; i < m.count; i++)
        (void)proto_map_value(&m, i);
    }
    break;
  }
  case MSG_WARM_WB: {
    struct proto_wb w;
    if (proto_wb_parse(p, len, &w, err, sizeof err) == 0 &&
        (const uint8_t *)w.bytes + w.len != p + len)
      abort();
    break;
  }
  case MSG_ACK:
  case MSG_NACK:
  case MSG_PING:
  case MSG_PONG: {
    uint64_t v;
    proto_u64_parse(p, len, &v, err, sizeof err);
    break;
  }
  default: {
    json_t *j = proto_json_parse(p, len, err, sizeof err);
    if (j) {
      struct proto_ctrl c;
      struct proto_hello h;
      proto_parse_ctrl(j, &c, err, sizeof err);
      if (proto_parse_hello(j, &h, err, sizeof err) == 0) {
        struct proto_warm_params wp;
        if (proto_parse_warm_params(json_object_get(j, "warm"), h.ndisks, &wp, err,
                                    sizeof err) == 0 &&
            (wp.rpo_s < 1 || wp.rpo_s > 86400 || strlen(wp.prefetch) > 4))
          abort();
      }
      /* The VM a peer describes (activate, prepare_incoming, QUERY). */
      static struct vm_spec spec;
      const json_t *vm = json_object_get(j, "vm");
      if (vm_spec_from_json(vm ? vm : j, &spec, err, sizeof err) == 0) {
        if (strlen(spec.name) > 64 || spec.ndisks > VM_MAX_DISKS || spec.nnics > VM_MAX_NICS)
          abort();
        json_t *back = vm_spec_to_json(&spec);
        static struct vm_spec again;
        if (vm_spec_from_json(back, &again, err, sizeof err) != 0)
          abort();                        /* what we describe we must accept */
        json_decref(back);
      }
      for (unsigned i = 0; i < h.ndisks && i < PROTO_MAX_DISKS; i++)
        if (strlen(h.disks[i].name) > 64)
          abort();
      json_decref(j);
    }
    break;
  }
  }
  free(p);
  return 0;
}
