/*
 * Socket operations Node's net module does not offer, for the nbdx server:
 *
 *   dup(fd)                   a second descriptor for an accepted connection, so that one thread
 *                             can hand the connection to another and close its own handle (libuv
 *                             always closes the descriptor it wraps; the duplicate lives on)
 *   setBuffer(fd, kind, n)    SO_SNDBUF / SO_RCVBUF, returning what the kernel granted
 *   getBuffer(fd, kind)       the current size
 *
 * All of them are single, non-blocking system calls, so they run synchronously. Errors throw an
 * Error carrying `code` ("EBADF", ...), `errno` (negative, as Node does) and `syscall`.
 */
#define NAPI_VERSION 8
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *errno_code(int err) {
  switch (err) {
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOTSOCK: return "ENOTSOCK";
    case ENOPROTOOPT: return "ENOPROTOOPT";
    case EPERM: return "EPERM";
    case ENOMEM: return "ENOMEM";
    case ENOBUFS: return "ENOBUFS";
    default: return "EIO";
  }
}

static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  char message[128];
  snprintf(message, sizeof message, "%s, %s", errno_code(err), strerror(err));
  napi_value msg, code, error, errno_value, syscall_value;
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, errno_code(err), NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &error);
  napi_create_int32(env, -err, &errno_value);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value);
  napi_set_named_property(env, error, "errno", errno_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  napi_throw(env, error);
  return NULL;
}

/* Integer arguments: a descriptor, or a size. Anything else is a TypeError, not a crash. */
static int int_args(napi_env env, napi_callback_info info, size_t want, int32_t *out) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want) {
    napi_throw_type_error(env, NULL, "missing argument");
    return 0;
  }
  for (size_t i = 0; i < want; i++) {
    if (napi_get_value_int32(env, argv[i], &out[i]) != napi_ok || out[i] < 0) {
      napi_throw_type_error(env, NULL, "arguments must be non-negative integers");
      return 0;
    }
  }
  return 1;
}

static napi_value number(napi_env env, int32_t n) {
  napi_value v;
  napi_create_int32(env, n, &v);
  return v;
}

static napi_value do_dup(napi_env env, napi_callback_info info) {
  int32_t a[1];
  if (!int_args(env, info, 1, a)) return NULL;
  /* Close-on-exec, like every descriptor Node opens: children of --run must not inherit it. */
  int fd = fcntl(a[0], F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "dup");
  return number(env, fd);
}

/* kind 0: send buffer, 1: receive buffer. */
static int option_of(napi_env env, int32_t kind) {
  if (kind == 0) return SO_SNDBUF;
  if (kind == 1) return SO_RCVBUF;
  napi_throw_range_error(env, NULL, "buffer kind must be 0 (send) or 1 (receive)");
  return -1;
}

static napi_value get_buffer(napi_env env, napi_callback_info info) {
  int32_t a[2];
  if (!int_args(env, info, 2, a)) return NULL;
  int opt = option_of(env, a[1]);
  if (opt < 0) return NULL;
  int value = 0;
  socklen_t len = sizeof value;
  if (getsockopt(a[0], SOL_SOCKET, opt, &value, &len) < 0) return throw_errno(env, errno, "getsockopt");
  return number(env, value);
}

/*
 * Asks for n bytes. The kernel doubles the request (for its own bookkeeping) and caps it at
 * net.core.wmem_max / rmem_max; what it granted is returned, so the caller can log it.
 */
static napi_value set_buffer(napi_env env, napi_callback_info info) {
  int32_t a[3];
  if (!int_args(env, info, 3, a)) return NULL;
  int opt = option_of(env, a[1]);
  if (opt < 0) return NULL;
  int value = a[2];
  if (setsockopt(a[0], SOL_SOCKET, opt, &value, sizeof value) < 0) return throw_errno(env, errno, "setsockopt");
  socklen_t len = sizeof value;
  if (getsockopt(a[0], SOL_SOCKET, opt, &value, &len) < 0) return throw_errno(env, errno, "getsockopt");
  return number(env, value);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"dup", NULL, do_dup, NULL, NULL, NULL, napi_enumerable, NULL},
    {"getBuffer", NULL, get_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
    {"setBuffer", NULL, set_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
