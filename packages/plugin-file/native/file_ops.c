/*
 * The few system calls the file plugin needs that Node's fs module does not reach:
 * fallocate, lseek(SEEK_DATA/SEEK_HOLE), posix_fadvise, pwritev2(RWF_DSYNC), sync_file_range and
 * the block-device ioctls. Everything that can block runs as napi async work on the libuv thread
 * pool and returns a promise; only constant-time ioctls (device size, sector size) are synchronous.
 *
 * Errors reject with an Error carrying `code` ("ENOSPC", "EOPNOTSUPP", ...), `errno` (negative,
 * as Node does) and `syscall`, so they map to NBD errors exactly like errors from Node's fs.
 */
#define NAPI_VERSION 8
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <node_api.h>

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/falloc.h>
#include <linux/fs.h>
#endif

/*
 * musl before 1.2.5 has no preadv2/pwritev2 wrappers (the linux-x64-musl prebuild is compiled
 * against such a musl), so outside glibc the system calls are made directly, with the offset
 * split as the kernel's pos_from_hilo() takes it (64-bit kernels use the low word alone).
 * -DNBDX_FILE_RAW_RWV2 does the same on glibc, so that the tests run this path.
 */
#if defined(__linux__) && (!defined(__GLIBC__) || defined(NBDX_FILE_RAW_RWV2))
#include <sys/syscall.h>
#if defined(SYS_preadv2) && defined(SYS_pwritev2)
static ssize_t rw2(long nr, int fd, const struct iovec *iov, int count, off_t offset, int flags) {
  uint64_t pos = (uint64_t)offset;
  /* (long)pos keeps the low half on 32-bit targets and the whole offset on 64-bit ones. */
  return (ssize_t)syscall(nr, fd, iov, count, (long)pos, (long)(pos >> 32), flags);
}
#define preadv2(fd, iov, count, offset, flags) rw2(SYS_preadv2, fd, iov, count, offset, flags)
#define pwritev2(fd, iov, count, offset, flags) rw2(SYS_pwritev2, fd, iov, count, offset, flags)
#else
#undef RWF_DSYNC
#undef RWF_NOWAIT
#endif
#endif

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0
#endif

/* Extent type bits, the same as NBD base:allocation. */
#define EXT_HOLE 1
#define EXT_ZERO 2

#define CHECK(call)                                                                                \
  do {                                                                                             \
    if ((call) != napi_ok) {                                                                       \
      napi_throw_error(env, NULL, "nbdx file addon: N-API call failed: " #call);                  \
      return NULL;                                                                                 \
    }                                                                                              \
  } while (0)

typedef enum {
  OP_FALLOCATE,
  OP_FADVISE,
  OP_MAP,
  OP_DISCARD,
  OP_ZEROOUT,
  OP_PWRITE_DSYNC,
  OP_EVICT,
} op_kind;

static const char *const op_names[] = {
  "fallocate", "posix_fadvise", "lseek", "ioctl(BLKDISCARD)", "ioctl(BLKZEROOUT)", "pwritev2", "sync_file_range",
};

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buffer_ref; /* keeps the written buffer alive while the thread pool uses it */
  op_kind kind;
  int fd;
  int mode; /* fallocate mode, fadvise advice, or "was a write" for evict */
  int64_t offset;
  int64_t length;
  const char *data; /* pwrite source */
  int err;          /* 0 or an errno value */
  const char *failed_call;
  int64_t result;
  double *extents; /* OP_MAP: offset, length, type triples */
  size_t n_extents;
  size_t max_extents;
} op_t;

static const char *errno_code(int e) {
  switch (e) {
  case EPERM: return "EPERM";
  case ENOENT: return "ENOENT";
  case EINTR: return "EINTR";
  case EIO: return "EIO";
  case ENXIO: return "ENXIO";
  case EBADF: return "EBADF";
  case EAGAIN: return "EAGAIN";
  case ENOMEM: return "ENOMEM";
  case EACCES: return "EACCES";
  case EBUSY: return "EBUSY";
  case ENODEV: return "ENODEV";
  case EISDIR: return "EISDIR";
  case EINVAL: return "EINVAL";
  case ETXTBSY: return "ETXTBSY";
  case EFBIG: return "EFBIG";
  case ENOSPC: return "ENOSPC";
  case ESPIPE: return "ESPIPE";
  case EROFS: return "EROFS";
  case ENOSYS: return "ENOSYS";
  case ENOTTY: return "ENOTTY";
  case EOVERFLOW: return "EOVERFLOW";
#ifdef EDQUOT
  case EDQUOT: return "EDQUOT";
#endif
  case EOPNOTSUPP: return "EOPNOTSUPP";
#if defined(ENOTSUP) && ENOTSUP != EOPNOTSUPP
  case ENOTSUP: return "ENOTSUP";
#endif
  default: return "EUNKNOWN";
  }
}

/* ---- the work, on a thread-pool thread: no N-API calls here ------------------------------- */

static int push_extent(op_t *op, int64_t offset, int64_t length, int type, int may_merge) {
  if (length <= 0) return 0;
  if (may_merge && op->n_extents > 0) {
    double *last = op->extents + 3 * (op->n_extents - 1);
    if ((int)last[2] == type && (int64_t)last[0] + (int64_t)last[1] == offset) {
      last[1] += (double)length;
      return 0;
    }
  }
  double *slot = op->extents + 3 * op->n_extents;
  slot[0] = (double)offset;
  slot[1] = (double)length;
  slot[2] = (double)type;
  op->n_extents++;
  return 0;
}

/*
 * Walk [offset, offset+length) with SEEK_DATA/SEEK_HOLE. After max_extents - 1 extents the rest
 * is reported as data, which is always safe (the client just reads it).
 */
static void do_map(op_t *op) {
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  int64_t pos = op->offset;
  const int64_t end = op->offset + op->length;
  /* One iteration may add two extents and the tail one more. */
  op->extents = malloc(sizeof(double) * 3 * (op->max_extents + 2));
  if (!op->extents) {
    op->err = ENOMEM;
    return;
  }
  while (pos < end && op->n_extents + 1 < op->max_extents) {
    off_t data = lseek(op->fd, (off_t)pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) { /* no data from pos to the end of the file */
        push_extent(op, pos, end - pos, EXT_HOLE | EXT_ZERO, 1);
        pos = end;
        break;
      }
      op->err = errno;
      op->failed_call = "lseek(SEEK_DATA)";
      return;
    }
    if (data > pos) {
      int64_t stop = data < end ? data : end;
      push_extent(op, pos, stop - pos, EXT_HOLE | EXT_ZERO, 1);
      pos = stop;
      if (pos >= end) break;
    }
    off_t hole = lseek(op->fd, (off_t)pos, SEEK_HOLE);
    if (hole < 0) {
      if (errno == ENXIO) { /* the file shrank under us */
        push_extent(op, pos, end - pos, EXT_HOLE | EXT_ZERO, 1);
        pos = end;
        break;
      }
      op->err = errno;
      op->failed_call = "lseek(SEEK_HOLE)";
      return;
    }
    int64_t stop = hole < end ? hole : end;
    if (stop <= pos) { /* should not happen; never loop forever */
      stop = end;
    }
    push_extent(op, pos, stop - pos, 0, 1);
    pos = stop;
  }
  /* Not merged: with REQ_ONE the first extent must stay what SEEK_DATA/SEEK_HOLE said. */
  if (pos < end) push_extent(op, pos, end - pos, 0, 0);
#else
  op->err = ENOSYS;
#endif
}

static void do_pwrite_dsync(op_t *op) {
#if defined(__linux__) && defined(RWF_DSYNC)
  int64_t done = 0;
  while (done < op->length) {
    struct iovec iov = {(void *)(op->data + done), (size_t)(op->length - done)};
    ssize_t n = pwritev2(op->fd, &iov, 1, (off_t)(op->offset + done), RWF_DSYNC);
    if (n < 0) {
      if (errno == EINTR) continue;
      op->err = errno;
      return;
    }
    if (n == 0) {
      op->err = EIO;
      return;
    }
    done += n;
  }
  op->result = done;
#else
  op->err = ENOSYS;
#endif
}

static void execute(napi_env env, void *data) {
  (void)env;
  op_t *op = data;
  int r = 0;
  switch (op->kind) {
  case OP_FALLOCATE:
#ifdef __linux__
    do r = fallocate(op->fd, op->mode, (off_t)op->offset, (off_t)op->length);
    while (r < 0 && errno == EINTR);
#else
    r = -1;
    errno = ENOSYS;
#endif
    break;
  case OP_FADVISE:
#if defined(POSIX_FADV_WILLNEED)
    r = posix_fadvise(op->fd, (off_t)op->offset, (off_t)op->length, op->mode);
    if (r != 0) {
      errno = r;
      r = -1;
    }
#else
    r = -1;
    errno = ENOSYS;
#endif
    break;
  case OP_MAP:
    do_map(op);
    return;
  case OP_DISCARD:
  case OP_ZEROOUT: {
#if defined(BLKDISCARD) && defined(BLKZEROOUT)
    uint64_t range[2] = {(uint64_t)op->offset, (uint64_t)op->length};
    do r = ioctl(op->fd, op->kind == OP_DISCARD ? BLKDISCARD : BLKZEROOUT, range);
    while (r < 0 && errno == EINTR);
#else
    r = -1;
    errno = ENOSYS;
#endif
    break;
  }
  case OP_PWRITE_DSYNC:
    do_pwrite_dsync(op);
    return;
  case OP_EVICT:
#ifdef __linux__
    if (op->mode) {
      /* Write the range back and wait, or DONTNEED would leave dirty pages in the cache. */
      do r = sync_file_range(op->fd, (off_t)op->offset, (off_t)op->length,
                             SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
      while (r < 0 && errno == EINTR);
      if (r < 0) break;
    }
    r = posix_fadvise(op->fd, (off_t)op->offset, (off_t)op->length, POSIX_FADV_DONTNEED);
    if (r != 0) {
      errno = r;
      r = -1;
    }
#else
    r = -1;
    errno = ENOSYS;
#endif
    break;
  }
  if (r < 0) op->err = errno;
}

/* ---- back on the JS thread ------------------------------------------------------------------ */

static napi_value make_error(napi_env env, op_t *op) {
  const char *call = op->failed_call ? op->failed_call : op_names[op->kind];
  char message[256];
  snprintf(message, sizeof message, "%s: %s", call, strerror(op->err));
  napi_value msg, code, err, errnum, syscall;
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, errno_code(op->err), NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &err);
  napi_set_named_property(env, err, "code", code);
  napi_create_int32(env, -op->err, &errnum);
  napi_set_named_property(env, err, "errno", errnum);
  napi_create_string_utf8(env, call, NAPI_AUTO_LENGTH, &syscall);
  napi_set_named_property(env, err, "syscall", syscall);
  return err;
}

static void complete(napi_env env, napi_status status, void *data) {
  op_t *op = data;
  napi_value value = NULL;
  if (status != napi_ok && op->err == 0) op->err = EIO;
  if (op->err) {
    napi_reject_deferred(env, op->deferred, make_error(env, op));
  } else {
    if (op->kind == OP_MAP) {
      napi_value ab;
      void *bytes;
      size_t n = op->n_extents * 3;
      if (napi_create_arraybuffer(env, n * sizeof(double), &bytes, &ab) == napi_ok) {
        memcpy(bytes, op->extents, n * sizeof(double));
        napi_create_typedarray(env, napi_float64_array, n, ab, 0, &value);
      }
    } else if (op->kind == OP_PWRITE_DSYNC) {
      napi_create_double(env, (double)op->result, &value);
    } else {
      napi_get_undefined(env, &value);
    }
    if (!value) napi_get_undefined(env, &value);
    napi_resolve_deferred(env, op->deferred, value);
  }
  if (op->buffer_ref) napi_delete_reference(env, op->buffer_ref);
  napi_delete_async_work(env, op->work);
  free(op->extents);
  free(op);
}

/* Read (fd, offset, length, mode) arguments common to every async call. */
static int read_int64(napi_env env, napi_value v, int64_t *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) return 0;
  double d;
  napi_get_value_double(env, v, &d);
  if (!(d >= 0 && d <= 9007199254740991.0) || d != (double)(int64_t)d) return 0;
  *out = (int64_t)d;
  return 1;
}

static napi_value start(napi_env env, op_t *op, const char *name) {
  napi_value promise, resource_name;
  if (napi_create_promise(env, &op->deferred, &promise) != napi_ok) {
    free(op);
    napi_throw_error(env, NULL, "nbdx file addon: cannot create a promise");
    return NULL;
  }
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name);
  if (napi_create_async_work(env, NULL, resource_name, execute, complete, op, &op->work) != napi_ok ||
      napi_queue_async_work(env, op->work) != napi_ok) {
    op->err = EIO;
    napi_reject_deferred(env, op->deferred, make_error(env, op));
    if (op->buffer_ref) napi_delete_reference(env, op->buffer_ref);
    free(op);
  }
  return promise;
}

/* (fd, offset, length[, mode]) → Promise */
static napi_value range_call(napi_env env, napi_callback_info info, op_kind kind, int want_mode) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < (size_t)(3 + want_mode)) {
    napi_throw_type_error(env, NULL, "expected (fd, offset, length, ...)");
    return NULL;
  }
  int32_t fd, mode = 0;
  int64_t offset, length;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || !read_int64(env, argv[1], &offset) ||
      !read_int64(env, argv[2], &length) ||
      (want_mode && napi_get_value_int32(env, argv[3], &mode) != napi_ok)) {
    napi_throw_type_error(env, NULL, "fd, offset, length and mode must be non-negative whole numbers");
    return NULL;
  }
  op_t *op = calloc(1, sizeof *op);
  if (!op) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  op->kind = kind;
  op->fd = fd;
  op->offset = offset;
  op->length = length;
  op->mode = mode;
  if (kind == OP_MAP) op->max_extents = mode > 1 ? (size_t)mode : 2;
  return start(env, op, op_names[kind]);
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) { return range_call(env, info, OP_FALLOCATE, 1); }
static napi_value js_fadvise(napi_env env, napi_callback_info info) { return range_call(env, info, OP_FADVISE, 1); }
/* map(fd, offset, length, maxExtents) → Promise<Float64Array of offset,length,type triples> */
static napi_value js_map(napi_env env, napi_callback_info info) { return range_call(env, info, OP_MAP, 1); }
static napi_value js_discard(napi_env env, napi_callback_info info) { return range_call(env, info, OP_DISCARD, 0); }
static napi_value js_zeroout(napi_env env, napi_callback_info info) { return range_call(env, info, OP_ZEROOUT, 0); }
/* evict(fd, offset, length, wasWrite) → Promise */
static napi_value js_evict(napi_env env, napi_callback_info info) { return range_call(env, info, OP_EVICT, 1); }

/* The arguments (fd) of a call; on a mismatch a TypeError is thrown and 0 returned. */
static int fd_args(napi_env env, napi_callback_info info, int32_t *fd) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd)");
    return 0;
  }
  return 1;
}

/* The arguments (fd, Uint8Array, position) of a call; on a mismatch a TypeError naming `usage`. */
typedef struct {
  int32_t fd;
  napi_value buffer;
  void *bytes;
  size_t length;
  int64_t position;
} buffer_args_t;

static int buffer_args(napi_env env, napi_callback_info info, const char *usage, buffer_args_t *a) {
  size_t argc = 3;
  napi_value argv[3];
  bool is_typed = false;
  napi_typedarray_type type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_int32(env, argv[0], &a->fd) != napi_ok || napi_is_typedarray(env, argv[1], &is_typed) != napi_ok ||
      !is_typed || !read_int64(env, argv[2], &a->position)) {
    napi_throw_type_error(env, NULL, usage);
    return 0;
  }
  if (napi_get_typedarray_info(env, argv[1], &type, &a->length, &a->bytes, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "the buffer must be a Uint8Array");
    return 0;
  }
  a->buffer = argv[1];
  return 1;
}

/* pwriteDsync(fd, buffer, offset) → Promise<bytes written> */
static napi_value js_pwrite_dsync(napi_env env, napi_callback_info info) {
  buffer_args_t a;
  if (!buffer_args(env, info, "expected (fd, Uint8Array, offset)", &a)) return NULL;
  op_t *op = calloc(1, sizeof *op);
  if (!op) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  op->kind = OP_PWRITE_DSYNC;
  op->fd = a.fd;
  op->offset = a.position;
  op->length = (int64_t)a.length;
  op->data = a.bytes;
  if (napi_create_reference(env, a.buffer, 1, &op->buffer_ref) != napi_ok) {
    free(op);
    napi_throw_error(env, NULL, "nbdx file addon: cannot reference the buffer");
    return NULL;
  }
  return start(env, op, "pwritev2");
}

static napi_value throw_errno(napi_env env, const char *call, int e) {
  op_t op = {0};
  op.err = e;
  op.failed_call = call;
  napi_throw(env, make_error(env, &op));
  return NULL;
}

/* blockDeviceSize(fd) → number: BLKGETSIZE64, else the offset of the end. Constant time. */
static napi_value js_device_size(napi_env env, napi_callback_info info) {
  napi_value result;
  int32_t fd;
  if (!fd_args(env, info, &fd)) return NULL;
  uint64_t size = 0;
#ifdef BLKGETSIZE64
  if (ioctl(fd, BLKGETSIZE64, &size) == 0) {
    CHECK(napi_create_double(env, (double)size, &result));
    return result;
  }
#endif
  off_t end = lseek(fd, 0, SEEK_END);
  if (end < 0) return throw_errno(env, "lseek(SEEK_END)", errno);
  CHECK(napi_create_double(env, (double)end, &result));
  return result;
}

/*
 * preadNowait(fd, buffer, position) → bytes read, -1 when the data is not in the page cache
 * (EAGAIN: the caller reads on the thread pool instead), -2 when RWF_NOWAIT is not supported.
 * Synchronous on purpose: with RWF_NOWAIT the kernel only copies cached pages and never sleeps.
 */
static napi_value js_pread_nowait(napi_env env, napi_callback_info info) {
  napi_value result;
  buffer_args_t a;
  if (!buffer_args(env, info, "expected (fd, Uint8Array, position)", &a)) return NULL;
  double n;
#if defined(__linux__) && defined(RWF_NOWAIT)
  struct iovec iov = {a.bytes, a.length};
  ssize_t r;
  do r = preadv2(a.fd, &iov, 1, (off_t)a.position, RWF_NOWAIT);
  while (r < 0 && errno == EINTR);
  if (r >= 0) n = (double)r;
  else if (errno == EAGAIN) n = -1;
  else if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) n = -2;
  else return throw_errno(env, "preadv2", errno);
#else
  n = -2;
#endif
  CHECK(napi_create_double(env, n, &result));
  return result;
}

/* sectorSize(fd) → logical sector size of a block device (BLKSSZGET), or 512. */
static napi_value js_sector_size(napi_env env, napi_callback_info info) {
  napi_value result;
  int32_t fd;
  if (!fd_args(env, info, &fd)) return NULL;
  int sector = 512;
#ifdef BLKSSZGET
  if (ioctl(fd, BLKSSZGET, &sector) != 0 || sector <= 0) sector = 512;
#endif
  CHECK(napi_create_int32(env, sector, &result));
  return result;
}


/*
 * mapShared(fd, length, key) → ArrayBuffer over a read-only mmap(MAP_SHARED) of the first
 * `length` bytes of the file, or null when the kernel refuses the mapping (the caller then keeps using
 * pread). The plugin maps only memory-backed files (tmpfs, ramfs), where reading through the
 * mapping reads the very pages pread would copy from; the core hands views of it to the socket,
 * so only the kernel reads them (a READ reply's one copy, into the socket).
 *
 * One mapping per file serves the whole process: every worker
 * thread that maps the same file gets its own ArrayBuffer over the same addresses, so the page
 * faults that fill a new mapping's page tables are paid once per process, not once per thread.
 * `key` names the file (the caller's device and inode numbers): finding them here with fstat
 * would tie the helper to glibc 2.33, newer than the prebuilds may need.
 * `users` counts mapShared calls not yet ended by detach(); `holders` counts the ArrayBuffers the
 * collectors have not freed. detach() by the last user lets the file go at once (the range
 * becomes anonymous memory, reserved but not allocated, so a late access through a view still
 * queued reads zeroes instead of faulting); the range is unmapped when the last ArrayBuffer is
 * freed.
 */
typedef struct shared_map {
  char key[64];
  size_t length;
  void *addr;
  int users;
  int holders;
  int attached; /* still the file's mapping, found by mapShared */
  struct shared_map *next;
} shared_map_t;

static pthread_mutex_t maps_lock = PTHREAD_MUTEX_INITIALIZER;
static shared_map_t *maps;

static void unlink_map(shared_map_t *m) {
  for (shared_map_t **p = &maps; *p; p = &(*p)->next) {
    if (*p == m) {
      *p = m->next;
      return;
    }
  }
}

static void unmap_finalize(napi_env env, void *data, void *hint) {
  shared_map_t *m = hint;
  pthread_mutex_lock(&maps_lock);
  int last = --m->holders == 0;
  if (last && m->attached) unlink_map(m);
  pthread_mutex_unlock(&maps_lock);
  if (last) {
    munmap(m->addr, m->length);
    free(m);
  }
}

static napi_value js_map_shared(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  double length;
  char key[64];
  size_t key_len = 0;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_double(env, argv[1], &length) != napi_ok || !(length > 0) ||
      length > 9007199254740991.0 || (double)(size_t)length != length ||
      napi_get_value_string_utf8(env, argv[2], key, sizeof key, &key_len) != napi_ok || key_len == 0 ||
      key_len >= sizeof key - 1) {
    napi_throw_type_error(env, NULL, "nbdx file addon: expected (fd, length > 0, key of 1 to 62 bytes)");
    return NULL;
  }
  CHECK(napi_get_null(env, &result));
  pthread_mutex_lock(&maps_lock);
  shared_map_t *m = maps;
  while (m && !(strcmp(m->key, key) == 0 && m->length == (size_t)length)) {
    m = m->next;
  }
  if (!m) {
    void *addr = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, fd, 0);
    if (addr != MAP_FAILED && (m = calloc(1, sizeof *m)) == NULL) munmap(addr, (size_t)length);
    if (m) {
      memcpy(m->key, key, key_len + 1);
      m->length = (size_t)length;
      m->addr = addr;
      m->attached = 1;
      m->next = maps;
      maps = m;
    }
  }
  if (m) {
    m->users++;
    m->holders++;
  }
  pthread_mutex_unlock(&maps_lock);
  if (!m) return result;
  if (napi_create_external_arraybuffer(env, m->addr, m->length, unmap_finalize, m, &result) != napi_ok) {
    /* Runtimes that forbid external memory (a V8 sandbox) say so here: no mapping then. */
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
    pthread_mutex_lock(&maps_lock);
    m->users--;
    pthread_mutex_unlock(&maps_lock);
    unmap_finalize(env, NULL, m);
    CHECK(napi_get_null(env, &result));
  }
  return result;
}

/*
 * detach(arrayBuffer): this user of a mapShared mapping is done with it (see above). The last
 * user's detach replaces the range by anonymous memory now, without waiting for the collectors:
 * a deleted image's memory is given back, and the next mapShared of the file maps it afresh.
 */
static napi_value js_detach(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *base = NULL;
  size_t size = 0;
  if (argc < 1 || napi_get_arraybuffer_info(env, argv[0], &base, &size) != napi_ok || !base || !size) {
    napi_throw_type_error(env, NULL, "nbdx file addon: expected (ArrayBuffer from mapShared)");
    return NULL;
  }
  pthread_mutex_lock(&maps_lock);
  shared_map_t *m = maps;
  while (m && !(m->addr == base && m->length == size)) m = m->next;
  int last = m && --m->users == 0;
  int err = 0;
  if (last) {
    unlink_map(m);
    m->attached = 0;
    void *r = mmap(base, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (r == MAP_FAILED) err = errno;
  }
  pthread_mutex_unlock(&maps_lock);
  if (err) return throw_errno(env, "mmap(MAP_FIXED)", err);
  return NULL;
}

/*
 * resident(arrayBuffer, offset, length) → whether every page of that range of a mapShared
 * mapping is in memory (mincore). Reading a tmpfs hole through a shared mapping would allocate
 * a page for it, so the plugin reads through the mapping only where the data is there already,
 * and uses pread (which reads holes as zeroes without allocating) elsewhere.
 */
static napi_value js_resident(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *base = NULL;
  size_t size = 0;
  double offset, length;
  if (argc < 3 || napi_get_arraybuffer_info(env, argv[0], &base, &size) != napi_ok ||
      napi_get_value_double(env, argv[1], &offset) != napi_ok ||
      napi_get_value_double(env, argv[2], &length) != napi_ok || !(offset >= 0) || !(length >= 0) ||
      offset + length > (double)size) {
    napi_throw_type_error(env, NULL, "nbdx file addon: expected (ArrayBuffer, offset, length) within it");
    return NULL;
  }
  static long page;
  if (!page) page = sysconf(_SC_PAGESIZE);
  uintptr_t start = ((uintptr_t)base + (size_t)offset) & ~(uintptr_t)(page - 1);
  uintptr_t end = (uintptr_t)base + (size_t)offset + (size_t)length;
  int all = 1;
  unsigned char vec[256];
  while (all && start < end) {
    size_t pages = (end - start + page - 1) / page;
    if (pages > sizeof vec) pages = sizeof vec;
    if (mincore((void *)start, pages * page, vec) != 0) {
      all = 0;
      break;
    }
    for (size_t i = 0; i < pages; i++) {
      if (!(vec[i] & 1)) {
        all = 0;
        break;
      }
    }
    start += pages * page;
  }
  CHECK(napi_get_boolean(env, all, &result));
  return result;
}

static void set_int(napi_env env, napi_value obj, const char *name, int value) {
  napi_value v;
  napi_create_int32(env, value, &v);
  napi_set_named_property(env, obj, name, v);
}

static void set_bool(napi_env env, napi_value obj, const char *name, int value) {
  napi_value v;
  napi_get_boolean(env, value != 0, &v);
  napi_set_named_property(env, obj, name, v);
}

static napi_value init(napi_env env, napi_value exports) {
  const napi_property_descriptor fns[] = {
    {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, NULL},
    {"fadvise", NULL, js_fadvise, NULL, NULL, NULL, napi_default, NULL},
    {"map", NULL, js_map, NULL, NULL, NULL, napi_default, NULL},
    {"discard", NULL, js_discard, NULL, NULL, NULL, napi_default, NULL},
    {"zeroout", NULL, js_zeroout, NULL, NULL, NULL, napi_default, NULL},
    {"evict", NULL, js_evict, NULL, NULL, NULL, napi_default, NULL},
    {"pwriteDsync", NULL, js_pwrite_dsync, NULL, NULL, NULL, napi_default, NULL},
    {"blockDeviceSize", NULL, js_device_size, NULL, NULL, NULL, napi_default, NULL},
    {"sectorSize", NULL, js_sector_size, NULL, NULL, NULL, napi_default, NULL},
    {"preadNowait", NULL, js_pread_nowait, NULL, NULL, NULL, napi_default, NULL},
    {"mapShared", NULL, js_map_shared, NULL, NULL, NULL, napi_default, NULL},
    {"resident", NULL, js_resident, NULL, NULL, NULL, napi_default, NULL},
    {"detach", NULL, js_detach, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof fns / sizeof fns[0], fns));

  napi_value c;
  CHECK(napi_create_object(env, &c));
  set_int(env, c, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  set_int(env, c, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  set_int(env, c, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
#ifdef POSIX_FADV_NORMAL
  set_int(env, c, "POSIX_FADV_NORMAL", POSIX_FADV_NORMAL);
  set_int(env, c, "POSIX_FADV_RANDOM", POSIX_FADV_RANDOM);
  set_int(env, c, "POSIX_FADV_SEQUENTIAL", POSIX_FADV_SEQUENTIAL);
  set_int(env, c, "POSIX_FADV_WILLNEED", POSIX_FADV_WILLNEED);
#endif
  CHECK(napi_set_named_property(env, exports, "constants", c));

  napi_value f;
  CHECK(napi_create_object(env, &f));
#ifdef __linux__
  set_bool(env, f, "fallocate", 1);
#else
  set_bool(env, f, "fallocate", 0);
#endif
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  set_bool(env, f, "seekData", 1);
#else
  set_bool(env, f, "seekData", 0);
#endif
#ifdef POSIX_FADV_WILLNEED
  set_bool(env, f, "fadvise", 1);
#else
  set_bool(env, f, "fadvise", 0);
#endif
#if defined(__linux__) && defined(RWF_DSYNC)
  set_bool(env, f, "pwriteDsync", 1);
#else
  set_bool(env, f, "pwriteDsync", 0);
#endif
#if defined(BLKDISCARD) && defined(BLKZEROOUT)
  set_bool(env, f, "blockIoctls", 1);
#else
  set_bool(env, f, "blockIoctls", 0);
#endif
  CHECK(napi_set_named_property(env, exports, "features", f));
  return exports;
}

NAPI_MODULE_INIT() { return init(env, exports); }
