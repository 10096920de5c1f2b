/* fuzz_nbd: libFuzzer target for the NBD server: the handshake, option
 * parsing and request parsing, fed as one byte stream from a client.
 *
 * The input goes into a pipe that the server reads as its socket; replies go
 * to /dev/null.  The export is memory (tests/common/mem_export.c), so every
 * request that passes validation runs for real.  No workers: one thread, so
 * a crash points straight at the parser. */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "mem_export.h"
#include "nbd/server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static int initialised;
  if (!initialised) {
    log_set_level(LOG_ERROR);   /* refused input is logged; keep the run quiet */
    initialised = 1;
  }
  if (size > 1024 * 1024)
    return 0;
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0)
    abort();
  fcntl(p[1], F_SETPIPE_SZ, 1024 * 1024);
  size_t done = 0;
  while (done < size) {
    ssize_t w = write(p[1], data + done, size - done);
    if (w <= 0)
      break;   /* pipe full: the rest is cut off, as a closed connection */
    done += (size_t)w;
  }
  close(p[1]);
  int out = open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (out < 0)
    abort();
  struct nbd_conn_options opt = { .workers = 0, .peer = "fuzz" };
  nbd_serve_fds(&mem_exports, p[0], out, &opt);
  return 0;
}
