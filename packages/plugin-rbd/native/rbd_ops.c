/*
 * librados + librbd for the nbdx rbd plugin, as a small N-API addon.
 *
 * Data requests (read, write, discard, write-zeroes, flush) use librbd's asynchronous calls: each
 * request is handed to librbd with a completion and returns a promise at once, so any number of
 * them are in flight from the one JavaScript thread. librbd calls the completion from its own
 * finisher thread; that callback only records the result and queues the request on one
 * thread-safe function, which settles the promise on the JavaScript thread (libuv coalesces the
 * wake-ups when many complete together). No thread is taken per request.
 *
 * Calls that block by nature and are rare (connecting, opening and closing an image, listing a
 * pool, the allocation map, shutting down) run as napi async work on the libuv thread pool.
 *
 * Errors reject with an Error carrying `code` ("ENOENT", "EACCES", "ETIMEDOUT", ...) and `errno`
 * (negative, as Node does), so the plugin maps them like errors from Node's fs.
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#define CHECK(call)                                                                                \
  do {                                                                                             \
    if ((call) != napi_ok) {                                                                       \
      napi_throw_error(env, NULL, "nbdx rbd addon: N-API call failed: " #call);                   \
      return NULL;                                                                                 \
    }                                                                                              \
  } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Errors */

static const char *errno_code(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ERANGE: return "ERANGE";
    case EDQUOT: return "EDQUOT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ESHUTDOWN: return "ESHUTDOWN"; /* Ceph's EBLOCKLISTED */
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENOTCONN: return "ENOTCONN";
    case ECANCELED: return "ECANCELED";
    case EILSEQ: return "EILSEQ";
    default: return "EIO";
  }
}

/* An Error for a negative errno from librados/librbd: "WHAT: strerror" with code and errno. */
static napi_value errno_error(napi_env env, const char *what, int neg) {
  int e = neg < 0 ? -neg : neg;
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(e));
  napi_value code, text, err, num;
  napi_create_string_utf8(env, errno_code(e), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
  napi_create_error(env, code, text, &err);
  napi_create_int32(env, -e, &num);
  napi_set_named_property(env, err, "errno", num);
  return err;
}

static napi_value throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Argument helpers */

/* A JS string as a malloc'd C string; NULL for undefined/null (and *ok stays 1). */
static char *opt_string(napi_env env, napi_value v, int *ok) {
  napi_valuetype t;
  *ok = 1;
  if (napi_typeof(env, v, &t) != napi_ok) {
    *ok = 0;
    return NULL;
  }
  if (t == napi_undefined || t == napi_null) return NULL;
  if (t != napi_string) {
    *ok = 0;
    return NULL;
  }
  size_t len;
  napi_get_value_string_utf8(env, v, NULL, 0, &len);
  char *s = malloc(len + 1);
  if (!s) {
    *ok = 0;
    return NULL;
  }
  napi_get_value_string_utf8(env, v, s, len + 1, &len);
  return s;
}

static int get_u64(napi_env env, napi_value v, uint64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return 0;
  if (!(d >= 0) || d > 9007199254740992.0 || d != (double)(uint64_t)d) return 0;
  *out = (uint64_t)d;
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Handles: a cluster connection and an open image, held by JS as externals. */

typedef struct {
  rados_t cluster;
  int connected;
  int shut; /* rados_shutdown done (or started): no new images */
} Cluster;

typedef struct {
  rbd_image_t image;
  rados_ioctx_t io;
  int closed;
} Image;

static void cluster_finalize(napi_env env, void *data, void *hint) {
  /* Only the struct: shutting a connection down blocks, the plugin does it explicitly (shutdown). */
  free(data);
}

static void image_finalize(napi_env env, void *data, void *hint) { free(data); }

static Cluster *get_cluster(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external) return NULL;
  napi_get_value_external(env, v, &p);
  return p;
}

static Image *get_image(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external) return NULL;
  napi_get_value_external(env, v, &p);
  return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Asynchronous data requests: librbd aio completions delivered through one thread-safe function */

typedef enum { AIO_READ, AIO_WRITE, AIO_DISCARD, AIO_ZEROES, AIO_FLUSH } AioOp;

static const char *aio_names[] = {"librbd read", "librbd write", "librbd discard", "librbd write_zeroes", "librbd flush"};

typedef struct {
  napi_deferred deferred;
  napi_ref buffer; /* keeps the caller's buffer alive while librbd reads into / writes from it */
  ssize_t result;
  size_t expected;
  AioOp op;
} AioReq;

static napi_threadsafe_function completions; /* one per process: the addon is loaded once */
static uint64_t in_flight;

/* librbd's finisher thread: take the result, free the completion (as qemu's rbd driver does, in
 * the callback itself), and queue the request for the JavaScript thread. */
static void aio_done(rbd_completion_t c, void *arg) {
  AioReq *r = arg;
  r->result = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  napi_call_threadsafe_function(completions, r, napi_tsfn_nonblocking);
}

/* The JavaScript thread: settle the promise. env is NULL when Node is tearing down. */
static void aio_settle(napi_env env, napi_value js_cb, void *context, void *data) {
  AioReq *r = data;
  if (env) {
    napi_value v;
    if (r->result < 0) {
      napi_reject_deferred(env, r->deferred, errno_error(env, aio_names[r->op], (int)r->result));
    } else if (r->op == AIO_READ && (size_t)r->result != r->expected) {
      /* librbd zero-fills reads past the end of the image, so a short read is a real error. */
      napi_reject_deferred(env, r->deferred, errno_error(env, "librbd read: short read", -EIO));
    } else {
      napi_create_double(env, (double)r->result, &v);
      napi_resolve_deferred(env, r->deferred, v);
    }
    if (r->buffer) napi_delete_reference(env, r->buffer);
    if (--in_flight == 0) napi_unref_threadsafe_function(env, completions);
  }
  free(r);
}

/* aio(op, image, buffer | null, offset, length) → Promise<number> */
static napi_value start_aio(napi_env env, napi_callback_info info, AioOp op) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Image *im = argc > 0 ? get_image(env, argv[0]) : NULL;
  if (!im) return throw_type(env, "first argument must be an image handle");

  char *data = NULL;
  size_t len = 0;
  uint64_t off = 0;
  napi_value bufv = NULL;
  if (op == AIO_READ || op == AIO_WRITE) {
    bool is_ta = false;
    if (argc < 3 || napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta) return throw_type(env, "buffer must be a Uint8Array");
    napi_typedarray_type tt;
    napi_value ab;
    size_t boff;
    void *p;
    CHECK(napi_get_typedarray_info(env, argv[1], &tt, &len, &p, &ab, &boff));
    if (tt != napi_uint8_array) return throw_type(env, "buffer must be a Uint8Array");
    data = p;
    bufv = argv[1];
    if (!get_u64(env, argv[2], &off)) return throw_type(env, "offset must be a non-negative integer");
  } else if (op == AIO_DISCARD || op == AIO_ZEROES) {
    uint64_t l;
    if (argc < 3 || !get_u64(env, argv[1], &off) || !get_u64(env, argv[2], &l)) return throw_type(env, "offset and length must be non-negative integers");
    len = (size_t)l;
  }

  napi_value promise;
  AioReq *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  r->op = op;
  r->expected = len;
  CHECK(napi_create_promise(env, &r->deferred, &promise));
  if (im->closed) {
    napi_reject_deferred(env, r->deferred, errno_error(env, aio_names[op], -EBADF));
    free(r);
    return promise;
  }
  if (bufv) CHECK(napi_create_reference(env, bufv, 1, &r->buffer));

  rbd_completion_t c;
  int rc = rbd_aio_create_completion(r, aio_done, &c);
  if (rc == 0) {
    switch (op) {
      case AIO_READ: rc = rbd_aio_read(im->image, off, len, data, c); break;
      case AIO_WRITE: rc = rbd_aio_write(im->image, off, len, data, c); break;
      case AIO_DISCARD: rc = rbd_aio_discard(im->image, off, len, c); break;
      /* zero_flags 0: librbd zeroes by discarding with no granularity, so objects are removed,
       * truncated or zeroed in place (never a partial discard that is skipped). */
      case AIO_ZEROES: rc = rbd_aio_write_zeroes(im->image, off, len, c, 0, 0); break;
      case AIO_FLUSH: rc = rbd_aio_flush(im->image, c); break;
    }
    if (rc < 0) rbd_aio_release(c);
  }
  if (rc < 0) {
    napi_reject_deferred(env, r->deferred, errno_error(env, aio_names[op], rc));
    if (r->buffer) napi_delete_reference(env, r->buffer);
    free(r);
    return promise;
  }
  if (in_flight++ == 0) napi_ref_threadsafe_function(env, completions);
  return promise;
}

static napi_value js_read(napi_env env, napi_callback_info info) { return start_aio(env, info, AIO_READ); }
static napi_value js_write(napi_env env, napi_callback_info info) { return start_aio(env, info, AIO_WRITE); }
static napi_value js_discard(napi_env env, napi_callback_info info) { return start_aio(env, info, AIO_DISCARD); }
static napi_value js_write_zeroes(napi_env env, napi_callback_info info) { return start_aio(env, info, AIO_ZEROES); }
static napi_value js_flush(napi_env env, napi_callback_info info) { return start_aio(env, info, AIO_FLUSH); }

/* ------------------------------------------------------------------------------------------ */
/* Blocking calls on the thread pool */

typedef enum { W_CONNECT, W_SHUTDOWN, W_OPEN, W_CLOSE, W_LIST, W_DIFF } WorkOp;

typedef struct {
  double *v; /* offset, length, exists triples */
  size_t n, cap;
  int overflow;
} Triples;

typedef struct {
  WorkOp op;
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep; /* the handle's JS external, alive until the work is done */
  int rc;
  const char *what; /* names the failing step in the error */
  Cluster *cl;
  Image *im;
  /* open / list */
  char *pool, *ns, *name, *snap;
  int readonly;
  rbd_image_info_t st;
  uint64_t overlap;
  uint64_t features;
  /* list */
  rbd_image_spec_t *specs;
  size_t nspecs;
  /* diff */
  uint64_t off, len;
  Triples ext;
} Work;

static int diff_cb(uint64_t off, size_t len, int exists, void *arg) {
  Triples *t = arg;
  if (t->n + 3 > t->cap) {
    size_t cap = t->cap ? t->cap * 2 : 96;
    double *v = realloc(t->v, cap * sizeof *v);
    if (!v) {
      t->overflow = 1;
      return -ENOMEM;
    }
    t->v = v;
    t->cap = cap;
  }
  t->v[t->n++] = (double)off;
  t->v[t->n++] = (double)len;
  t->v[t->n++] = exists ? 1 : 0;
  return 0;
}

static void work_execute(napi_env env, void *data) {
  Work *w = data;
  switch (w->op) {
    case W_CONNECT:
      w->what = "cannot connect to the cluster";
      w->rc = rados_connect(w->cl->cluster);
      if (w->rc == 0) w->cl->connected = 1;
      break;
    case W_SHUTDOWN:
      rados_shutdown(w->cl->cluster);
      w->cl->connected = 0;
      break;
    case W_OPEN: {
      w->what = "pool";
      w->rc = rados_ioctx_create(w->cl->cluster, w->pool, &w->im->io);
      if (w->rc < 0) break;
      rados_ioctx_set_namespace(w->im->io, w->ns ? w->ns : "");
      w->what = "image";
      w->rc = w->readonly ? rbd_open_read_only(w->im->io, w->name, &w->im->image, w->snap)
                          : rbd_open(w->im->io, w->name, &w->im->image, w->snap);
      if (w->rc < 0) {
        rados_ioctx_destroy(w->im->io);
        break;
      }
      w->what = "image stat";
      w->rc = rbd_stat(w->im->image, &w->st, sizeof w->st);
      if (w->rc == 0) w->rc = rbd_get_features(w->im->image, &w->features);
      /* Clones read what they have not written from their parent up to the overlap. */
      if (w->rc == 0 && rbd_get_overlap(w->im->image, &w->overlap) < 0) w->overlap = 0;
      if (w->rc < 0) {
        rbd_close(w->im->image);
        rados_ioctx_destroy(w->im->io);
      }
      break;
    }
    case W_CLOSE:
      w->what = "close";
      w->rc = rbd_close(w->im->image);
      rados_ioctx_destroy(w->im->io);
      break;
    case W_LIST: {
      rados_ioctx_t io;
      w->what = "pool";
      w->rc = rados_ioctx_create(w->cl->cluster, w->pool, &io);
      if (w->rc < 0) break;
      rados_ioctx_set_namespace(io, w->ns ? w->ns : "");
      w->what = "list images";
      size_t max = 64;
      for (;;) {
        w->specs = calloc(max, sizeof *w->specs);
        if (!w->specs) {
          w->rc = -ENOMEM;
          break;
        }
        size_t got = max;
        w->rc = rbd_list2(io, w->specs, &got);
        if (w->rc == -ERANGE && got > max) {
          free(w->specs);
          w->specs = NULL;
          max = got;
          continue;
        }
        if (w->rc >= 0) {
          w->nspecs = got;
          w->rc = 0;
        }
        break;
      }
      rados_ioctx_destroy(io);
      break;
    }
    case W_DIFF:
      /* whole_object=1: with the fast-diff feature this reads the object map, not the objects. */
      w->what = "librbd diff_iterate";
      w->rc = rbd_diff_iterate2(w->im->image, NULL, w->off, w->len, 1, 1, diff_cb, &w->ext);
      break;
  }
}

static napi_value make_string(napi_env env, const char *s) {
  napi_value v;
  napi_create_string_utf8(env, s ? s : "", NAPI_AUTO_LENGTH, &v);
  return v;
}

static void set_num(napi_env env, napi_value o, const char *k, double d) {
  napi_value v;
  napi_create_double(env, d, &v);
  napi_set_named_property(env, o, k, v);
}

static void work_complete(napi_env env, napi_status status, void *data) {
  Work *w = data;
  napi_value result = NULL;
  if (w->rc < 0) {
    char what[512];
    if (w->op == W_OPEN && strcmp(w->what, "pool") == 0) snprintf(what, sizeof what, "pool '%s'", w->pool);
    else if (w->op == W_OPEN && strcmp(w->what, "image") == 0)
      snprintf(what, sizeof what, "image '%s%s%s'", w->name, w->snap ? "@" : "", w->snap ? w->snap : "");
    else if (w->op == W_LIST && strcmp(w->what, "pool") == 0) snprintf(what, sizeof what, "pool '%s'", w->pool);
    else snprintf(what, sizeof what, "%s", w->what);
    napi_reject_deferred(env, w->deferred, errno_error(env, what, w->rc));
    if (w->op == W_OPEN) free(w->im);
  } else {
    switch (w->op) {
      case W_CONNECT:
      case W_SHUTDOWN:
      case W_CLOSE:
        napi_get_undefined(env, &result);
        break;
      case W_OPEN: {
        napi_value ext;
        napi_create_external(env, w->im, image_finalize, NULL, &ext);
        napi_create_object(env, &result);
        napi_set_named_property(env, result, "handle", ext);
        set_num(env, result, "size", (double)w->st.size);
        set_num(env, result, "objectSize", (double)w->st.obj_size);
        set_num(env, result, "features", (double)w->features);
        set_num(env, result, "parentOverlap", (double)w->overlap);
        break;
      }
      case W_LIST: {
        napi_create_array_with_length(env, w->nspecs, &result);
        for (size_t i = 0; i < w->nspecs; i++) napi_set_element(env, result, (uint32_t)i, make_string(env, w->specs[i].name));
        break;
      }
      case W_DIFF: {
        napi_value ab;
        void *p;
        napi_create_arraybuffer(env, w->ext.n * sizeof(double), &p, &ab);
        if (w->ext.n) memcpy(p, w->ext.v, w->ext.n * sizeof(double));
        napi_create_typedarray(env, napi_float64_array, w->ext.n, ab, 0, &result);
        break;
      }
    }
    napi_resolve_deferred(env, w->deferred, result);
  }
  if (w->op == W_CLOSE) free(w->im);
  if (w->specs) rbd_image_spec_list_cleanup(w->specs, w->nspecs), free(w->specs);
  free(w->ext.v);
  free(w->pool);
  free(w->ns);
  free(w->name);
  free(w->snap);
  if (w->keep) napi_delete_reference(env, w->keep);
  napi_delete_async_work(env, w->work);
  free(w);
}

static napi_value queue_work(napi_env env, Work *w, napi_value keep) {
  napi_value promise, name;
  CHECK(napi_create_promise(env, &w->deferred, &promise));
  if (keep) CHECK(napi_create_reference(env, keep, 1, &w->keep));
  CHECK(napi_create_string_utf8(env, "nbdx:rbd", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, work_execute, work_complete, w, &w->work));
  CHECK(napi_queue_async_work(env, w->work));
  return promise;
}

static Work *new_work(napi_env env, WorkOp op) {
  Work *w = calloc(1, sizeof *w);
  if (!w) napi_throw_error(env, "ENOMEM", "out of memory");
  else w->op = op;
  return w;
}

/* ------------------------------------------------------------------------------------------ */
/* The JS functions */

/*
 * create(id | null, confFile | null, settings: [key, value][]) → cluster (not yet connected)
 * The configuration is applied in the order the Ceph tools use: the file (or the default search
 * path when none is named), CEPH_ARGS from the environment, then the explicit settings. Bad
 * settings throw here, synchronously, before anything touches the network.
 */
static napi_value js_create(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) return throw_type(env, "create(id, conf, settings)");
  int ok1, ok2;
  char *id = opt_string(env, argv[0], &ok1);
  char *conf = opt_string(env, argv[1], &ok2);
  bool is_array = false;
  napi_is_array(env, argv[2], &is_array);
  if (!ok1 || !ok2 || !is_array) {
    free(id);
    free(conf);
    return throw_type(env, "create(id: string|null, conf: string|null, settings: [string, string][])");
  }
  Cluster *cl = calloc(1, sizeof *cl);
  if (!cl) {
    free(id);
    free(conf);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  int rc = rados_create(&cl->cluster, id);
  free(id);
  if (rc < 0) {
    free(conf);
    free(cl);
    napi_throw(env, errno_error(env, "rados_create", rc));
    return NULL;
  }
  char what[600];
  rc = rados_conf_read_file(cl->cluster, conf);
  /* Without conf= a missing default file is fine (mon_host= may say all); a named one must load. */
  if (rc < 0 && conf) {
    snprintf(what, sizeof what, "cannot read conf=%s", conf);
    goto fail;
  }
  rc = rados_conf_parse_env(cl->cluster, NULL);
  if (rc < 0) {
    snprintf(what, sizeof what, "CEPH_ARGS");
    goto fail;
  }
  uint32_t n;
  napi_get_array_length(env, argv[2], &n);
  for (uint32_t i = 0; i < n; i++) {
    napi_value pair, kv, vv;
    napi_get_element(env, argv[2], i, &pair);
    napi_get_element(env, pair, 0, &kv);
    napi_get_element(env, pair, 1, &vv);
    int ok3, ok4;
    char *k = opt_string(env, kv, &ok3);
    char *v = opt_string(env, vv, &ok4);
    if (!ok3 || !ok4 || !k || !v) {
      free(k);
      free(v);
      rc = -EINVAL;
      snprintf(what, sizeof what, "settings must be [key, value] string pairs");
      goto fail;
    }
    rc = rados_conf_set(cl->cluster, k, v);
    if (rc < 0) snprintf(what, sizeof what, "Ceph option %s=%s", k, v);
    free(k);
    free(v);
    if (rc < 0) goto fail;
  }
  free(conf);
  napi_value ext;
  CHECK(napi_create_external(env, cl, cluster_finalize, NULL, &ext));
  return ext;

fail:
  free(conf);
  rados_shutdown(cl->cluster);
  free(cl);
  napi_throw(env, errno_error(env, what, rc));
  return NULL;
}

/* connect(cluster) → Promise<void>: waits for the monitors (client_mount_timeout at most). */
static napi_value js_connect(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Cluster *cl = argc ? get_cluster(env, argv[0]) : NULL;
  if (!cl || cl->connected || cl->shut) return throw_type(env, "connect(cluster): a fresh cluster from create()");
  Work *w = new_work(env, W_CONNECT);
  if (!w) return NULL;
  w->cl = cl;
  return queue_work(env, w, argv[0]);
}

/* shutdown(cluster) → Promise<void> (every image must be closed first) */
static napi_value js_shutdown(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Cluster *cl = argc ? get_cluster(env, argv[0]) : NULL;
  if (!cl) return throw_type(env, "shutdown(cluster)");
  Work *w = new_work(env, W_SHUTDOWN);
  if (!w) return NULL;
  if (cl->shut) {
    /* Twice is harmless: resolve at once. */
    napi_value promise, u;
    CHECK(napi_create_promise(env, &w->deferred, &promise));
    napi_get_undefined(env, &u);
    napi_resolve_deferred(env, w->deferred, u);
    free(w);
    return promise;
  }
  cl->shut = 1;
  w->cl = cl;
  return queue_work(env, w, argv[0]);
}

/* open(cluster, pool, namespace | null, image, snap | null, readonly) → Promise<{handle, size, ...}> */
static napi_value js_open(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Cluster *cl = argc == 6 ? get_cluster(env, argv[0]) : NULL;
  if (!cl) return throw_type(env, "open(cluster, pool, namespace, image, snap, readonly)");
  if (!cl->connected || cl->shut) {
    napi_throw(env, errno_error(env, "cluster connection", -ENOTCONN));
    return NULL;
  }
  Work *w = new_work(env, W_OPEN);
  if (!w) return NULL;
  int ok[4];
  w->cl = cl;
  w->pool = opt_string(env, argv[1], &ok[0]);
  w->ns = opt_string(env, argv[2], &ok[1]);
  w->name = opt_string(env, argv[3], &ok[2]);
  w->snap = opt_string(env, argv[4], &ok[3]);
  bool ro = false;
  napi_get_value_bool(env, argv[5], &ro);
  w->readonly = ro || w->snap != NULL;
  w->im = calloc(1, sizeof *w->im);
  if (!ok[0] || !ok[1] || !ok[2] || !ok[3] || !w->pool || !w->name || !w->im) {
    free(w->pool);
    free(w->ns);
    free(w->name);
    free(w->snap);
    free(w->im);
    free(w);
    return throw_type(env, "open: pool and image must be strings");
  }
  return queue_work(env, w, argv[0]);
}

/* close(image) → Promise<void>; requests still in flight complete first (librbd waits for them). */
static napi_value js_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Image *im = argc ? get_image(env, argv[0]) : NULL;
  if (!im) return throw_type(env, "close(image)");
  if (im->closed) return throw_type(env, "close: image already closed");
  im->closed = 1;
  /* The work frees a copy: the external's finalizer frees `im` itself, maybe before the work ends. */
  Image *copy = malloc(sizeof *copy);
  if (!copy) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  *copy = *im;
  Work *w = new_work(env, W_CLOSE);
  if (!w) {
    free(copy);
    return NULL;
  }
  w->im = copy;
  return queue_work(env, w, argv[0]);
}

/* list(cluster, pool, namespace | null) → Promise<string[]> */
static napi_value js_list(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Cluster *cl = argc == 3 ? get_cluster(env, argv[0]) : NULL;
  if (!cl) return throw_type(env, "list(cluster, pool, namespace)");
  if (!cl->connected || cl->shut) {
    napi_throw(env, errno_error(env, "cluster connection", -ENOTCONN));
    return NULL;
  }
  Work *w = new_work(env, W_LIST);
  if (!w) return NULL;
  int ok1, ok2;
  w->cl = cl;
  w->pool = opt_string(env, argv[1], &ok1);
  w->ns = opt_string(env, argv[2], &ok2);
  if (!ok1 || !ok2 || !w->pool) {
    free(w->pool);
    free(w->ns);
    free(w);
    return throw_type(env, "list: pool must be a string");
  }
  return queue_work(env, w, argv[0]);
}

/* diff(image, offset, length) → Promise<Float64Array> of (offset, length, exists) triples */
static napi_value js_diff(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  Image *im = argc == 3 ? get_image(env, argv[0]) : NULL;
  if (!im) return throw_type(env, "diff(image, offset, length)");
  if (im->closed) {
    napi_throw(env, errno_error(env, "librbd diff_iterate", -EBADF));
    return NULL;
  }
  Work *w = new_work(env, W_DIFF);
  if (!w) return NULL;
  if (!get_u64(env, argv[1], &w->off) || !get_u64(env, argv[2], &w->len)) {
    free(w);
    return throw_type(env, "diff: offset and length must be non-negative integers");
  }
  w->im = im;
  return queue_work(env, w, argv[0]);
}

/* ------------------------------------------------------------------------------------------ */

static napi_value js_version(napi_env env, napi_callback_info info) {
  int major, minor, extra;
  char buf[64];
  rbd_version(&major, &minor, &extra);
  snprintf(buf, sizeof buf, "%d.%d.%d", major, minor, extra);
  return make_string(env, buf);
}

NAPI_MODULE_INIT() {
  if (!completions) {
    napi_value name;
    CHECK(napi_create_string_utf8(env, "nbdx:rbd:completions", NAPI_AUTO_LENGTH, &name));
    CHECK(napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, NULL, aio_settle, &completions));
    /* Referenced only while requests are in flight, so an idle image never keeps Node alive. */
    CHECK(napi_unref_threadsafe_function(env, completions));
  }
  napi_property_descriptor props[] = {
      {"create", NULL, js_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"connect", NULL, js_connect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"shutdown", NULL, js_shutdown, NULL, NULL, NULL, napi_enumerable, NULL},
      {"open", NULL, js_open, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, js_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"list", NULL, js_list, NULL, NULL, NULL, napi_enumerable, NULL},
      {"diff", NULL, js_diff, NULL, NULL, NULL, napi_enumerable, NULL},
      {"read", NULL, js_read, NULL, NULL, NULL, napi_enumerable, NULL},
      {"write", NULL, js_write, NULL, NULL, NULL, napi_enumerable, NULL},
      {"discard", NULL, js_discard, NULL, NULL, NULL, napi_enumerable, NULL},
      {"writeZeroes", NULL, js_write_zeroes, NULL, NULL, NULL, napi_enumerable, NULL},
      {"flush", NULL, js_flush, NULL, NULL, NULL, napi_enumerable, NULL},
      {"librbdVersion", NULL, js_version, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}
