/* fuzz_journal: libFuzzer target for the write-back journal's reader
 * (src/cache/journal.c): what a source checks and applies after a
 * destination shipped a journal over the network.
 *
 * The input is the journal's bytes, as the source stores them.  It is checked
 * with journal_check_buffer against 3 disks (FUZZ_DISK_SIZES); refused inputs
 * are also checked with no size check and any number of disks (more of the
 * parser is reachable).  Accepted inputs are applied into small in-memory
 * disks, twice, and checked for the reader's promises: every entry handed to
 * the callback is a known kind inside its disk, with bytes exactly for DATA
 * and STATE; the callback sees info.entries entries carrying info.data_bytes
 * bytes; file_bytes is the input's size; a second apply (a replay) leaves the
 * same disks.  Seeds: fuzz/corpus/journal (fuzz/make_journal_corpus.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache/journal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_NDISKS 3
static const uint64_t FUZZ_DISK_SIZES[FUZZ_NDISKS] = { 1 << 20, 1 << 16, 4096 };

struct sink {
  uint8_t *disk[FUZZ_NDISKS];
  uint64_t entries, data_bytes, state_len;
  unsigned states;
};

static int sink_apply(void *opaque, unsigned kind, unsigned disk, uint64_t off, uint64_t len,
                      const void *bytes)
{
  struct sink *s = opaque;
  if (len == 0 || len > JOURNAL_MAX_ENTRY)
    abort();
  s->entries++;
  switch (kind) {
  case JOURNAL_KIND_DATA:
  case JOURNAL_KIND_ZERO:
    if (disk >= FUZZ_NDISKS || off > FUZZ_DISK_SIZES[disk] || len > FUZZ_DISK_SIZES[disk] - off)
      abort();                          /* a range outside its disk got through */
    if ((kind == JOURNAL_KIND_DATA) != (bytes != NULL))
      abort();
    if (bytes) {
      memcpy(s->disk[disk] + off, bytes, len);   /* ASan: bytes really has len */
      s->data_bytes += len;
    } else {
      memset(s->disk[disk] + off, 0, len);
    }
    return 0;
  case JOURNAL_KIND_STATE: {
    if (disk || off || !bytes || ++s->states > 1)
      abort();
    volatile uint8_t x = ((const uint8_t *)bytes)[0] ^ ((const uint8_t *)bytes)[len - 1];
    (void)x;
    s->data_bytes += len;
    s->state_len = len;
    return 0;
  }
  default:
    abort();
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static struct sink s1, s2;
  if (!s1.disk[0]) {
    for (unsigned d = 0; d < FUZZ_NDISKS; d++) {
      s1.disk[d] = calloc(1, FUZZ_DISK_SIZES[d]);
      s2.disk[d] = calloc(1, FUZZ_DISK_SIZES[d]);
      if (!s1.disk[d] || !s2.disk[d])
        abort();
    }
  }
  /* A copy of exactly the input, so ASan sees any read past its end. */
  uint8_t *p = malloc(size ? size : 1);
  if (!p)
    return 0;
  memcpy(p, data, size);
  char err[256] = "";
  struct journal_info info;
  int r = journal_check_buffer(p, size, FUZZ_DISK_SIZES, FUZZ_NDISKS, &info, err, sizeof err);
  if (r != 0) {
    if (r > 0 || !err[0])
      abort();                          /* refusals are negative and say why */
    struct journal_info any;
    err[0] = 0;
    r = journal_check_buffer(p, size, NULL, 0, &any, err, sizeof err);
    if (r > 0 || (r < 0 && !err[0]) || (r == 0 && any.file_bytes != size))
      abort();
    free(p);
    return 0;
  }
  if (info.file_bytes != size || info.ndisks != FUZZ_NDISKS || info.point_id == 0 ||
      info.data_bytes > size ||
      size != JOURNAL_HEADER_SIZE + JOURNAL_TRAILER_SIZE +
                  info.entries * JOURNAL_ENTRY_HEADER_SIZE + info.data_bytes)
    abort();

  /* Apply twice into the same disks: a replay changes nothing. */
  for (unsigned d = 0; d < FUZZ_NDISKS; d++)
    memset(s1.disk[d], 0xA5, FUZZ_DISK_SIZES[d]);
  s1.entries = s1.data_bytes = s1.state_len = 0;
  s1.states = 0;
  struct journal_info ai;
  if (journal_apply_buffer(p, size, FUZZ_DISK_SIZES, FUZZ_NDISKS, sink_apply, &s1, &ai, err,
                           sizeof err) != 0)
    abort();                            /* it checked; it must apply */
  if (ai.point_id != info.point_id || ai.time_ns != info.time_ns || ai.entries != info.entries ||
      ai.data_bytes != info.data_bytes || ai.file_bytes != info.file_bytes ||
      ai.state_bytes != info.state_bytes || ai.ndisks != info.ndisks || s1.entries != info.entries ||
      s1.data_bytes != info.data_bytes || s1.state_len != info.state_bytes)
    abort();
  for (unsigned d = 0; d < FUZZ_NDISKS; d++)
    memcpy(s2.disk[d], s1.disk[d], FUZZ_DISK_SIZES[d]);
  s1.entries = s1.data_bytes = s1.state_len = 0;
  s1.states = 0;
  if (journal_apply_buffer(p, size, FUZZ_DISK_SIZES, FUZZ_NDISKS, sink_apply, &s1, NULL, err,
                           sizeof err) != 0)
    abort();
  for (unsigned d = 0; d < FUZZ_NDISKS; d++)
    if (memcmp(s2.disk[d], s1.disk[d], FUZZ_DISK_SIZES[d]) != 0)
      abort();
  free(p);
  return 0;
}
