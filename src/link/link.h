/* link: the site link, the one channel between two ferryd sites.
 *
 * TLS 1.3 only (OpenSSL 3), mutual authentication with pinned certificates:
 * each site has a key pair and a self-signed certificate (its identity, made
 * once by link_identity_init) and trusts a peer only by the SHA-256
 * fingerprint of the peer's certificate, recorded by an explicit pairing step
 * (`ferry site pair`).  No CA: a certificate is trusted because the operator
 * paired it, never because of who signed it.  A peer without a certificate,
 * or whose fingerprint is not the expected one (client side) or not paired
 * (server side), is refused at the handshake with a message that names the
 * fingerprint it presented.
 *
 * Over TLS the connection carries frames (frame.h): every payload checksummed,
 * compressed with zstd at the sender's chosen level.
 *
 * Thread model: a link_conn may be used by one receiving thread and any number
 * of sending threads at once (OpenSSL does not allow concurrent SSL_read and
 * SSL_write on one SSL object, so the socket is non-blocking, every SSL call
 * runs under the connection's lock, and waiting is done with poll() outside
 * it).  link_conn_shutdown() may be called from any thread and wakes both.
 */
#ifndef FERRY_LINK_H
#define FERRY_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "link/frame.h"

#define LINK_FINGERPRINT_LEN 72   /* "sha256:" + 64 lowercase hex + NUL, rounded up */

/* ---- identity ---- */

struct link_identity;

/* Creates DIR/site.key (ECDSA P-256, mode 0600) and DIR/site.crt (self-signed
 * X.509 v3, CN = site_name, valid 10 years) unless both exist; DIR is created
 * (0700) if absent.  Each file is written by temp file + fsync + rename.
 * *created says whether they were made now.  One of the two without the
 * other is an error (never silently replaced).  Returns 0 or -1 with err. */
int link_identity_init(const char *dir, const char *site_name, bool *created,
                       char *err, size_t errlen);
/* Loads DIR/site.key and DIR/site.crt; checks that they belong together.
 * Returns NULL with err. */
struct link_identity *link_identity_load(const char *dir, char *err, size_t errlen);
void link_identity_free(struct link_identity *id);
/* "sha256:<64 lowercase hex>" of the DER certificate. */
const char *link_identity_fingerprint(const struct link_identity *id);
/* The certificate, PEM, NUL-terminated. */
const char *link_identity_cert_pem(const struct link_identity *id);
/* The CN of the certificate. */
const char *link_identity_name(const struct link_identity *id);

/* Fingerprint of a PEM certificate (for pairing).  Returns 0 or -1 with err
 * (not PEM, not a certificate, more than one certificate). */
int link_fingerprint_of_pem(const char *pem, char out[LINK_FINGERPRINT_LEN],
                            char *err, size_t errlen);
/* True if s is a well-formed "sha256:<64 hex>" string. */
bool link_fingerprint_is_valid(const char *s);

/* ---- connections ---- */

struct link_conn;

struct link_stats {
  uint64_t frames_sent, frames_received;
  uint64_t raw_bytes_sent, wire_bytes_sent;          /* payload before / after compression */
  uint64_t raw_bytes_received, wire_bytes_received;
  uint64_t bad_payloads;                             /* -EBADMSG frames received */
};

/* Connects to HOST:PORT (or [V6]:PORT), runs the TLS handshake within
 * timeout_ms, and checks that the server's certificate has the fingerprint
 * expected.  Returns NULL with err ("connection refused", "timed out",
 * "peer presented sha256:... but sha256:... is paired", TLS alerts). */
struct link_conn *link_connect(struct link_identity *id, const char *host_port,
                               const char *expected_fingerprint, unsigned timeout_ms,
                               char *err, size_t errlen);

/* Server side trust: returns true if the fingerprint belongs to a paired
 * peer (and may copy its name into name, for log lines). */
typedef bool (*link_trust_fn)(void *opaque, const char *fingerprint, char *name, size_t namelen);

/* Runs the server side of the handshake on an accepted socket (takes fd;
 * closed on failure).  Returns NULL with err. */
struct link_conn *link_accept(struct link_identity *id, int fd, link_trust_fn trust,
                              void *opaque, unsigned timeout_ms, char *err, size_t errlen);

/* Sends one frame (frame_encode at zstd level `level`, 0 = uncompressed).
 * Thread-safe; the whole frame goes out before another sender's.  Blocks
 * while the socket is full (bounded by timeout_ms of no progress; 0 = no
 * bound).  Returns 0 or -errno: -ETIMEDOUT, -EPIPE / -ECONNRESET (gone),
 * -ESHUTDOWN (link_conn_shutdown), -EIO (TLS error), -EINVAL (len too big). */
int link_send(struct link_conn *c, uint8_t type, uint64_t seq, const void *payload,
              uint32_t len, int level, unsigned timeout_ms);

struct link_msg {
  uint8_t type;
  uint64_t seq;
  const void *data;      /* raw payload, valid until the next link_recv on this conn */
  uint32_t len;
};

/* Receives one frame within timeout_ms (0 = wait forever).  Returns 0;
 * -ETIMEDOUT (nothing complete arrived in time; the stream stays usable);
 * -EBADMSG with m->type and m->seq filled (payload damaged: the stream is
 * still in step, the caller may ask for seq again); -EPROTO (bad header: the
 * connection is unusable); -ECONNRESET / -EPIPE (peer closed); -ESHUTDOWN;
 * -EIO (TLS error).  err (may be NULL) gets the reason. */
int link_recv(struct link_conn *c, struct link_msg *m, unsigned timeout_ms,
              char *err, size_t errlen);

/* Wakes and fails every blocked and later send/recv on c (-ESHUTDOWN).
 * Safe from any thread; c stays valid until link_conn_close(). */
void link_conn_shutdown(struct link_conn *c);
void link_conn_close(struct link_conn *c);

const char *link_conn_peer_fingerprint(const struct link_conn *c);
const char *link_conn_peer_address(const struct link_conn *c);   /* "HOST:PORT" */
void link_conn_stats(struct link_conn *c, struct link_stats *out);

/* ---- listener ---- */

struct link_listener;

/* Called on its own thread for every connection that passed the handshake;
 * the callback owns conn (it must link_conn_close it) and may run as long
 * as it likes (the session lives on this thread). */
typedef void (*link_conn_fn)(void *opaque, struct link_conn *conn);

/* Listens on HOST:PORT (port 0 picks one).  Each accepted socket gets a
 * thread that runs link_accept (handshake timeout handshake_ms) and then
 * on_conn; a refused handshake is logged (WARN, with the peer address and
 * the fingerprint it presented) and the socket closed.  id must outlive the
 * listener (connections do not need it once made).  Returns NULL with
 * err. */
struct link_listener *link_listener_start(struct link_identity *id, const char *host_port,
                                          link_trust_fn trust, void *trust_opaque,
                                          link_conn_fn on_conn, void *conn_opaque,
                                          unsigned handshake_ms, char *err, size_t errlen);
uint16_t link_listener_port(const struct link_listener *l);
/* "HOST:PORT" with the port actually bound. */
const char *link_listener_address(const struct link_listener *l);
/* Stops accepting, shuts down every connection it handed out (their
 * callbacks see -ESHUTDOWN and return), joins every thread, frees.  Not from
 * a callback (it would join its own thread). */
void link_listener_stop(struct link_listener *l);

/* ---- fault injection (tests only) ---- */

/* Every n-th frame with a payload that this process sends afterwards gets one
 * payload bit flipped after its hash was computed (0 turns it off), so the
 * receiver's -EBADMSG path and the session's resend can be tested through
 * TLS, which would otherwise catch every damage on the wire first.  ferryd
 * sets it from FERRY_TEST_CORRUPT_FRAMES. */
void link_test_corrupt_every(unsigned n);

#endif
