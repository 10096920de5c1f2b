/* qmp: a small synchronous client of QEMU's machine protocol (QMP) over a
 * unix socket, for the qemu driver (src/vm/qemu.c) and the hypervisor probe.
 *
 * One connection is one struct qmp: qmp_connect() waits for the socket to
 * accept (QEMU may still be starting), reads the greeting (QEMU's version is
 * kept) and negotiates capabilities; then qmp_execute() sends one command
 * and reads until the reply with its id arrives.  Events that arrive
 * meanwhile (or are read by qmp_poll_events()) are queued with QEMU's own
 * timestamp, converted to CLOCK_REALTIME nanoseconds, so an event read late
 * still says when it happened.
 *
 * Bounds: a line from QEMU longer than QMP_MAX_LINE is an error (-EPROTO,
 * the connection is then unusable); the event queue keeps the newest
 * QMP_MAX_EVENTS and counts what it dropped.  A peer that is not QEMU, or
 * misbehaves, gets a clear error, never unbounded memory.
 *
 * Errors: every call returns 0 or -errno with a message in err: -ETIMEDOUT
 * (no answer in time), -EPIPE (QEMU closed the connection), -EPROTO (not
 * QMP), -EREMOTEIO (QEMU refused the command: err is QEMU's "desc", and
 * qmp_error_class() its "class").  After -ETIMEDOUT, -EPIPE or -EPROTO the
 * connection is marked broken and every later call fails at once.
 *
 * Thread model: none; a struct qmp is used by one thread at a time (the
 * qemu driver holds a per-VM mutex around it).
 */
#ifndef FERRY_VM_QMP_H
#define FERRY_VM_QMP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QMP_MAX_LINE   (4u * 1024 * 1024)   /* longest message taken from QEMU */
#define QMP_MAX_EVENTS 256                  /* events queued before the oldest is dropped */
#define QMP_DEFAULT_TIMEOUT_MS 10000

struct qmp;

struct qmp_event {
  char name[64];          /* "STOP", "RESUME", "MIGRATION", ... */
  uint64_t ts_ns;         /* CLOCK_REALTIME ns from the event's timestamp */
  json_t *data;           /* its "data" member (new reference) or NULL */
};

/* Connects to the QMP socket at path, waiting up to timeout_ms for it to
 * accept and greet; negotiates capabilities.  NULL with err on failure. */
struct qmp *qmp_connect(const char *path, unsigned timeout_ms, char *err, size_t errlen);
void qmp_close(struct qmp *q);

/* QEMU's version from the greeting: "7.2.22", and as numbers. */
const char *qmp_version(const struct qmp *q);
void qmp_version_numbers(const struct qmp *q, int *major, int *minor, int *micro);

/* The timeout of every later request (default QMP_DEFAULT_TIMEOUT_MS). */
void qmp_set_timeout(struct qmp *q, unsigned timeout_ms);

/* Runs cmd with args (borrowed; NULL for none).  On success *ret (if not
 * NULL) is the "return" member (new reference).  See the errors above. */
int qmp_execute(struct qmp *q, const char *cmd, json_t *args, json_t **ret, char *err,
                size_t errlen);
/* The "class" of the last -EREMOTEIO ("GenericError", "CommandNotFound", ...). */
const char *qmp_error_class(const struct qmp *q);

/* Reads whatever QEMU has sent without waiting; events go to the queue.
 * 0, or an error as above (-EPIPE once QEMU has gone). */
int qmp_poll_events(struct qmp *q, char *err, size_t errlen);
/* Takes the oldest queued event; false when none.  Free with qmp_event_clear. */
bool qmp_next_event(struct qmp *q, struct qmp_event *ev);
/* Takes the oldest event called name, from the queue or, waiting up to
 * timeout_ms, from QEMU; other events stay queued.  0 with *ev filled,
 * -ETIMEDOUT, or an error as above. */
int qmp_wait_event(struct qmp *q, const char *name, unsigned timeout_ms, struct qmp_event *ev,
                   char *err, size_t errlen);
void qmp_event_clear(struct qmp_event *ev);
/* Events dropped because the queue was full, since the connection opened. */
uint64_t qmp_events_dropped(const struct qmp *q);
/* True once the connection failed (timeout, EOF, protocol error). */
bool qmp_broken(const struct qmp *q);

#endif
