/* control: the control socket of a running sim VM: a unix stream socket
 * (mode 0600) speaking JSON lines.  Each request is one line holding one
 * JSON object {"cmd": NAME, ...args} (an optional "id" of any type is
 * echoed in the reply); each reply is one line, {"ok": true, ...} or
 * {"ok": false, "error": "..."}.  Commands and their replies are in
 * docs/simvm.md.
 *
 * Robustness: a line that is not JSON, not an object, names no known
 * command or carries an unknown or ill-typed field gets an error reply and
 * the connection goes on; a line longer than CTL_LINE_MAX gets an error and
 * the connection is closed (it cannot be resynchronised).  At most
 * CTL_MAX_CLIENTS connections at once; one more is told so and closed.
 *
 * Thread model: an acceptor thread, and one thread per client, which runs
 * that client's commands (so a long verify or a pause waiting for a
 * reconnect does not hold up another client's status). */
#ifndef FERRY_SIMVM_CONTROL_H
#define FERRY_SIMVM_CONTROL_H

#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "vm/simvm/vm.h"

#define CTL_LINE_MAX    65536
#define CTL_MAX_CLIENTS 16

struct ctl_client {
  int fd;
  pthread_t thread;
  bool used;                   /* under srv->lock */
  bool finished;               /* the thread returned, may be joined */
  struct ctl_server *srv;
};

struct ctl_server {
  struct vm *vm;
  const char *path;
  int listen_fd;
  int stop_pipe[2];
  dev_t dev;                   /* of the socket file we bound, to unlink only ours */
  ino_t ino;
  pthread_t thread;
  bool started;
  pthread_mutex_t lock;
  bool stopping;
  struct ctl_client clients[CTL_MAX_CLIENTS];
};

/* Binds the socket at path (a stale socket file is replaced; a live one,
 * or a file that is not a socket, is refused).  Returns 0 or -1 with err. */
int ctl_listen(struct ctl_server *srv, const char *path, char *err, size_t errlen);
int ctl_start(struct ctl_server *srv, struct vm *vm, char *err, size_t errlen);
/* Stops accepting, ends every client connection, joins, removes the socket. */
void ctl_stop(struct ctl_server *srv);

/* Runs one request line and returns the reply (never NULL); *exit_code is
 * set (>= 0) when the reply must be followed by the VM's exit with that
 * status (stop). */
json_t *ctl_execute(struct vm *vm, const char *line, size_t len, int *exit_code);

/* `ferry-simvm ctl SOCK COMMAND [JSON-ARGS]`: sends one request, prints the
 * reply line.  Returns the exit status (0 ok, 1 error reply or failure, 2
 * usage). */
int ctl_client_main(const char *sock, const char *cmd, const char *args);

#endif
