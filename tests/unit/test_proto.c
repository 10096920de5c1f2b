/* test_proto: the session protocol's encoders and checked parsers
 * (src/replicate/proto.c): round trips, and every refusal a destination or
 * source relies on (a length that lies, a range past 1 PiB, reserved bits,
 * unknown kinds and ops, bad names and ids, duplicate disks). */
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "replicate/proto.h"

#include "check.h"

static char err[256];

static void test_data(void)
{
  uint8_t buf[DATA_HEADER_SIZE + 8];
  struct proto_data d = { .disk = 2, .kind = DATA_KIND_DATA, .flags = DATA_F_BACKGROUND,
                          .offset = 1 << 20, .length = 8 };
  proto_data_encode(&d, buf);
  memcpy(buf + DATA_HEADER_SIZE, "ABCDEFGH", 8);
  struct proto_data o;
  CHECK(proto_data_parse(buf, sizeof buf, &o, err, sizeof err) == 0);
  CHECK(o.disk == 2 && o.kind == DATA_KIND_DATA && o.flags == DATA_F_BACKGROUND);
  CHECK(o.offset == 1 << 20 && o.length == 8 && memcmp(o.bytes, "ABCDEFGH", 8) == 0);
  /* the header says more bytes than the payload has */
  CHECK(proto_data_parse(buf, sizeof buf - 1, &o, err, sizeof err) == -EPROTO);
  CHECK(proto_data_parse(buf, 10, &o, err, sizeof err) == -EPROTO);
  /* a zero range carries no bytes */
  d.kind = DATA_KIND_ZERO;
  d.length = 1ull << 40;
  proto_data_encode(&d, buf);
  CHECK(proto_data_parse(buf, DATA_HEADER_SIZE, &o, err, sizeof err) == 0);
  CHECK(proto_data_parse(buf, DATA_HEADER_SIZE + 1, &o, err, sizeof err) == -EPROTO);
  /* unknown kind, reserved flag bits, disk index, empty or huge ranges */
  struct proto_data bad[] = {
    { .disk = 0, .kind = 3, .offset = 0, .length = 1 },
    { .disk = 0, .kind = DATA_KIND_ZERO, .flags = 2, .offset = 0, .length = 1 },
    { .disk = PROTO_MAX_DISKS, .kind = DATA_KIND_ZERO, .offset = 0, .length = 1 },
    { .disk = 0, .kind = DATA_KIND_ZERO, .offset = 0, .length = 0 },
    { .disk = 0, .kind = DATA_KIND_ZERO, .offset = UINT64_MAX - 1, .length = 2 },
    { .disk = 0, .kind = DATA_KIND_ZERO, .offset = 1ull << 49, .length = 1ull << 50 },
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    proto_data_encode(&bad[i], buf);
    CHECK(proto_data_parse(buf, DATA_HEADER_SIZE, &o, err, sizeof err) == -EPROTO);
  }
  buf[6] = 1;                                  /* the reserved u16 */
  CHECK(proto_data_parse(buf, DATA_HEADER_SIZE, &o, err, sizeof err) == -EPROTO);
}

static void test_blob_hashes_u64(void)
{
  uint8_t buf[64];
  proto_blob_encode(10, 15, buf);
  memcpy(buf + BLOB_HEADER_SIZE, "hello", 5);
  struct proto_blob b;
  CHECK(proto_blob_parse(buf, BLOB_HEADER_SIZE + 5, &b, err, sizeof err) == 0);
  CHECK(b.offset == 10 && b.total == 15 && b.len == 5);
  CHECK(proto_blob_parse(buf, BLOB_HEADER_SIZE + 6, &b, err, sizeof err) == -EPROTO);
  proto_blob_encode(16, 15, buf);
  CHECK(proto_blob_parse(buf, BLOB_HEADER_SIZE, &b, err, sizeof err) == -EPROTO);
  proto_blob_encode(0, (uint64_t)PROTO_MAX_BLOB + 1, buf);
  CHECK(proto_blob_parse(buf, BLOB_HEADER_SIZE, &b, err, sizeof err) == -EPROTO);

  struct proto_hashes h = { .req = 7, .disk = 1, .count = 2, .first = 100 };
  proto_hashes_encode_header(&h, buf);
  proto_u64_encode(111, buf + HASHES_HEADER_SIZE);
  proto_u64_encode(222, buf + HASHES_HEADER_SIZE + 8);
  struct proto_hashes o;
  CHECK(proto_hashes_parse(buf, HASHES_HEADER_SIZE + 16, &o, err, sizeof err) == 0);
  CHECK(o.req == 7 && o.disk == 1 && o.first == 100 && proto_hash_at(&o, 1) == 222);
  CHECK(proto_hashes_parse(buf, HASHES_HEADER_SIZE + 15, &o, err, sizeof err) == -EPROTO);

  uint64_t v;
  proto_u64_encode(42, buf);
  CHECK(proto_u64_parse(buf, 8, &v, err, sizeof err) == 0 && v == 42);
  CHECK(proto_u64_parse(buf, 7, &v, err, sizeof err) == -EPROTO);
}

static json_t *js(const char *text)
{
  return proto_json_parse(text, (uint32_t)strlen(text), err, sizeof err);
}

static void test_json(void)
{
  CHECK(js("[1,2]") == NULL);                           /* not an object */
  CHECK(js("{\"a\":1,\"a\":2}") == NULL);               /* duplicate keys */
  CHECK(js("{\"a\":") == NULL);
  struct proto_ctrl c;
  const char *good[] = {
    "{\"op\":\"flush\",\"req\":1}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"first\":0,\"count\":16384}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":1,\"regions\":[7,3,1000000]}",
    "{\"op\":\"vm_state\",\"req\":3,\"size\":5,\"xxh64\":\"0123456789abcdef\"}",
    "{\"op\":\"activate\",\"req\":4,\"vm\":{\"name\":\"vm1\",\"driver\":\"sim\",\"disks\":[\"vda\"]}}",
    "{\"op\":\"complete\",\"req\":5,\"downtime_ms\":3}",
    "{\"op\":\"abort\",\"req\":6,\"reason\":\"x\"}",
    "{\"op\":\"activate\",\"req\":7,\"incoming\":true,\"vm\":{\"name\":\"vm1\",\"driver\":\"qemu\",\"disks\":[\"vda\"]}}",
    "{\"op\":\"prepare_incoming\",\"req\":8,\"vm\":{\"name\":\"vm1\"}}",
    "{\"op\":\"incoming_status\",\"req\":9}",
    "{\"op\":\"discard_incoming\",\"req\":10}",
  };
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    json_t *j = js(good[i]);
    CHECK(j && proto_parse_ctrl(j, &c, err, sizeof err) == 0);
    if (j && proto_parse_ctrl(j, &c, err, sizeof err) != 0)
      fprintf(stderr, "  %s: %s\n", good[i], err);
    json_decref(j);
  }
  const char *bad[] = {
    "{\"req\":1}",
    "{\"op\":\"flush\"}",
    "{\"op\":\"flush\",\"req\":-1}",
    "{\"op\":\"format\",\"req\":1}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":16,\"first\":0,\"count\":1}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"first\":0,\"count\":16385}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"first\":0,\"count\":0}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"regions\":[1,-2]}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"regions\":[1,\"x\"]}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"regions\":[],\"first\":0,\"count\":1}",
    "{\"op\":\"hash\",\"req\":2,\"disk\":0,\"regions\":7}",
    "{\"op\":\"vm_state\",\"req\":3,\"size\":5,\"xxh64\":\"0123\"}",
    "{\"op\":\"vm_state\",\"req\":3,\"size\":5,\"xxh64\":\"0123456789abcdeZ\"}",
    "{\"op\":\"activate\",\"req\":4,\"vm\":{\"name\":\"../x\",\"driver\":\"sim\",\"disks\":[\"vda\"]}}",
    "{\"op\":\"activate\",\"req\":4,\"vm\":{\"name\":\"vm1\",\"driver\":\"sim\",\"disks\":[]}}",
    "{\"op\":\"activate\",\"req\":4,\"vm\":{\"name\":\"vm1\",\"driver\":\"sim\",\"disks\":[3]}}",
    "{\"op\":\"activate\",\"req\":4,\"incoming\":1,\"vm\":{\"name\":\"vm1\",\"driver\":\"sim\",\"disks\":[\"vda\"]}}",
    "{\"op\":\"prepare_incoming\",\"req\":8}",
    "{\"op\":\"prepare_incoming\",\"req\":8,\"vm\":\"vm1\"}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    json_t *j = js(bad[i]);
    CHECK(!j || proto_parse_ctrl(j, &c, err, sizeof err) == -EPROTO);
    json_decref(j);
  }

  struct proto_hello h;
  json_t *j = js("{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\","
                 "\"source_site\":\"onprem\",\"disks\":[{\"name\":\"vda\",\"size\":1048576,"
                 "\"granularity\":65536},{\"name\":\"vdb\",\"size\":512,\"granularity\":4096}]}");
  CHECK(j && proto_parse_hello(j, &h, err, sizeof err) == 0);
  CHECK(h.ndisks == 2 && strcmp(h.disks[1].name, "vdb") == 0 && h.disks[0].size == 1048576);
  CHECK(strcmp(h.mode, "live") == 0);       /* no "mode": live */
  json_decref(j);
  const char *bad_hello[] = {
    "{\"protocol\":2,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":500,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":5000}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096},{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"source_site\":\"a\",\"disks\":[]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm 1\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"mode\":\"hot\",\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
    "{\"protocol\":1,\"session\":\"m-0123456789ab\",\"vm\":\"vm1\",\"mode\":7,\"source_site\":\"a\",\"disks\":[{\"name\":\"vda\",\"size\":512,\"granularity\":4096}]}",
  };
  for (size_t i = 0; i < sizeof bad_hello / sizeof bad_hello[0]; i++) {
    j = js(bad_hello[i]);
    CHECK(j && proto_parse_hello(j, &h, err, sizeof err) == -EPROTO);
    json_decref(j);
  }
  CHECK(proto_id_is_valid("m-0123456789ab") && !proto_id_is_valid("m-0123456789AB") &&
        !proto_id_is_valid("x-0123456789ab") && !proto_id_is_valid(NULL));
}

/* The warm session's frames: round trips and every bound. */
static void test_warm(void)
{
  char msg[256];
  uint8_t b[64];
  struct proto_fetch f = { .disk = 2, .count = 16, .first = 1234567 }, f2;
  proto_fetch_encode(&f, b);
  CHECK(proto_fetch_parse(b, WARM_FETCH_SIZE, &f2, msg, sizeof msg) == 0 && f2.disk == 2 &&
        f2.count == 16 && f2.first == 1234567);
  CHECK(proto_fetch_parse(b, WARM_FETCH_SIZE - 1, &f2, msg, sizeof msg) == -EPROTO);
  f.count = 17;
  proto_fetch_encode(&f, b);
  CHECK(proto_fetch_parse(b, WARM_FETCH_SIZE, &f2, msg, sizeof msg) == -EPROTO);
  f.count = 0;
  proto_fetch_encode(&f, b);
  CHECK(proto_fetch_parse(b, WARM_FETCH_SIZE, &f2, msg, sizeof msg) == -EPROTO);
  f = (struct proto_fetch){ .disk = PROTO_MAX_DISKS, .count = 1 };
  proto_fetch_encode(&f, b);
  CHECK(proto_fetch_parse(b, WARM_FETCH_SIZE, &f2, msg, sizeof msg) == -EPROTO);

  struct proto_fill fl = { .disk = 0, .count = 1, .first = 9, .kind = WARM_FILL_DATA }, fl2;
  proto_fill_encode_header(&fl, b);
  memcpy(b + WARM_FILL_HEADER, "abcd", 4);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER + 4, &fl2, msg, sizeof msg) == 0 &&
        fl2.len == 4 && memcmp(fl2.bytes, "abcd", 4) == 0 && fl2.first == 9);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER, &fl2, msg, sizeof msg) == -EPROTO);  /* no data */
  fl.kind = WARM_FILL_ZERO;
  proto_fill_encode_header(&fl, b);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER, &fl2, msg, sizeof msg) == 0);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER + 1, &fl2, msg, sizeof msg) == -EPROTO);
  fl.kind = WARM_FILL_ERROR;
  fl.error = 5;
  proto_fill_encode_header(&fl, b);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER, &fl2, msg, sizeof msg) == 0 && fl2.error == 5);
  fl.error = 0;
  proto_fill_encode_header(&fl, b);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER, &fl2, msg, sizeof msg) == -EPROTO);
  fl.kind = 9;
  proto_fill_encode_header(&fl, b);
  CHECK(proto_fill_parse(b, WARM_FILL_HEADER, &fl2, msg, sizeof msg) == -EPROTO);

  struct proto_map mp = { .disk = 1, .kind = WARM_MAP_HOT, .index = 3 }, mp2;
  proto_map_encode_header(&mp, b);
  uint64_t v = htole64(77);
  memcpy(b + WARM_MAP_HEADER, &v, 8);
  CHECK(proto_map_parse(b, WARM_MAP_HEADER + 8, &mp2, msg, sizeof msg) == 0 && mp2.count == 1 &&
        proto_map_value(&mp2, 0) == 77 && mp2.index == 3);
  CHECK(proto_map_parse(b, WARM_MAP_HEADER + 7, &mp2, msg, sizeof msg) == -EPROTO);
  mp.kind = 3;
  proto_map_encode_header(&mp, b);
  CHECK(proto_map_parse(b, WARM_MAP_HEADER, &mp2, msg, sizeof msg) == -EPROTO);

  struct proto_wb wb;
  proto_wb_encode_header(4, 4096, b);
  b[WARM_WB_HEADER] = 'x';
  CHECK(proto_wb_parse(b, WARM_WB_HEADER + 1, &wb, msg, sizeof msg) == 0 && wb.point == 4 &&
        wb.offset == 4096 && wb.len == 1);
  CHECK(proto_wb_parse(b, WARM_WB_HEADER, &wb, msg, sizeof msg) == -EPROTO);   /* empty */
  proto_wb_encode_header(0, 0, b);
  CHECK(proto_wb_parse(b, WARM_WB_HEADER + 1, &wb, msg, sizeof msg) == -EPROTO); /* point 0 */

  struct proto_warm_params wp;
  json_t *j = js("{\"rpo_s\":1200,\"quota\":[1024,0],\"prefetch\":\"hot\",\"hydrate_bps\":0,"
                 "\"degraded_after_s\":300}");
  CHECK(proto_parse_warm_params(j, 2, &wp, msg, sizeof msg) == 0 && wp.rpo_s == 1200 &&
        wp.quota[0] == 1024 && strcmp(wp.prefetch, "hot") == 0);
  CHECK(proto_parse_warm_params(j, 1, &wp, msg, sizeof msg) == -EPROTO);    /* quota count */
  json_decref(j);
  static const char *const bad[] = {
    "{\"rpo_s\":0,\"quota\":[1],\"prefetch\":\"hot\",\"hydrate_bps\":0,\"degraded_after_s\":1}",
    "{\"rpo_s\":5,\"quota\":[1],\"prefetch\":\"warm\",\"hydrate_bps\":0,\"degraded_after_s\":1}",
    "{\"rpo_s\":5,\"quota\":[-1],\"prefetch\":\"hot\",\"hydrate_bps\":0,\"degraded_after_s\":1}",
    "{\"rpo_s\":5,\"quota\":[1],\"prefetch\":\"hot\",\"hydrate_bps\":0,\"degraded_after_s\":0}",
    "{\"rpo_s\":86401,\"quota\":[1],\"prefetch\":\"hot\",\"hydrate_bps\":0,\"degraded_after_s\":1}",
    "[1]",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    j = js(bad[i]);
    CHECK(proto_parse_warm_params(j, 1, &wp, msg, sizeof msg) == -EPROTO);
    json_decref(j);
  }
}

int main(void)
{
  test_data();
  test_blob_hashes_u64();
  test_json();
  test_warm();
  if (failures) {
    fprintf(stderr, "test_proto: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_proto: all checks passed\n");
  return 0;
}
