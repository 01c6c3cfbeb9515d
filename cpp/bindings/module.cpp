// pybind11 module qkv_native._core: buffer checks, output allocation, GIL release.
// No math here: every op forwards to a driver in cpp/src. The Python layer
// (python/qkv_native/functional.py) owns defaults and most user-facing checks; the
// checks here are the ones memory safety depends on, so a direct call cannot crash.
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define QKV_HAVE_PTHREAD_ATFORK 1
#endif
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "array_cache.h"
#include "qkv/attention.h"
#include "qkv/dispatch.h"
#include "qkv/elementwise.h"
#include "qkv/gemm.h"
#include "qkv/projection.h"

namespace py = pybind11;
using qkv::idx;

namespace {

// A float32 NumPy array seen as a pointer, shape and element strides.
struct Arr {
  float* ptr = nullptr;
  std::vector<idx> shape, strides;
  idx size() const {
    idx n = 1;
    for (idx s : shape) n *= s;
    return n;
  }
};

std::string shape_str(const std::vector<idx>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// By kind and size (not identity: an array that went through pickle has an equal
// but distinct dtype object), in native byte order.
bool is_dtype(const py::dtype& dt, char kind, py::ssize_t size) {
  if (dt.kind() != kind || dt.itemsize() != size) return false;
  // byte order from the descriptor ('=' native, '|' not applicable, or spelled out),
  // not dtype.isnative: an attribute lookup, a third of a small op's call overhead
  constexpr char kNative = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  const char order = dt.byteorder();
  return order == '=' || order == '|' || order == kNative;
}
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

Arr as_f32(const py::handle& obj, const char* name, int ndim, bool writable = false) {
  if (!py::isinstance<py::array>(obj))
    type_error(std::string(name) + " must be a numpy.ndarray of float32, got " + std::string(py::str(py::type::of(obj))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!is_dtype(a.dtype(), 'f', 4))
    type_error(std::string(name) + " must have dtype float32, got " + std::string(py::str(a.dtype())) +
               " (convert explicitly with .astype(np.float32))");
  if (a.ndim() != ndim)
    value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                shape_str(std::vector<idx>(a.shape(), a.shape() + a.ndim())));
  if (writable && !a.writeable()) value_error(std::string(name) + " must be writeable");
  Arr r;
  r.ptr = static_cast<float*>(const_cast<void*>(a.data()));
  r.shape.resize(static_cast<size_t>(ndim));
  r.strides.resize(static_cast<size_t>(ndim));
  for (int i = 0; i < ndim; ++i) {
    r.shape[i] = a.shape(i);
    const idx st = a.strides(i);
    if (st % static_cast<idx>(sizeof(float)) != 0)
      value_error(std::string(name) + " has a stride that is not a multiple of 4 bytes (misaligned view)");
    r.strides[i] = st / static_cast<idx>(sizeof(float));
  }
  if (r.size() > 0 && reinterpret_cast<std::uintptr_t>(r.ptr) % alignof(float) != 0)
    value_error(std::string(name) + " is not aligned to 4 bytes (a view at an odd byte offset); pass a copy");
  if (ndim > 0 && r.shape.back() > 1 && r.strides.back() != 1 && r.size() > 0)
    value_error(std::string(name) + " must be contiguous in its last axis (stride 1), got stride " +
                std::to_string(r.strides.back()) + " elements; pass np.ascontiguousarray(" + name + ")");
  return r;
}

// A yes/no argument as functional._flag takes it: a bool, Python's or NumPy's, not any
// object that converts (PackedWeight(w, 2.5) packed the transpose, trans=None did not).
bool as_flag(const py::handle& obj, const char* name) {
  if (!PyBool_Check(obj.ptr()) && !py::isinstance(obj, py::module_::import("numpy").attr("bool_")))
    type_error(std::string(name) + " must be a bool, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  return obj.cast<bool>();
}

void expect_shape(const Arr& a, const char* name, const std::vector<idx>& shape) {
  if (a.shape != shape)
    value_error(std::string(name) + " must have shape " + shape_str(shape) + ", got " + shape_str(a.shape));
}

// Element i of a 1-D int64 (i64) or int32 array, read by copy: a view at an odd byte
// offset is not aligned for the integer type, and dereferencing it would be undefined.
idx read_int(const py::array& a, py::ssize_t i, bool i64) {
  const char* p = static_cast<const char*>(a.data()) + i * a.strides(0);
  if (i64) {
    std::int64_t v;
    std::memcpy(&v, p, sizeof v);
    return static_cast<idx>(v);
  }
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return static_cast<idx>(v);
}

// Checked product of sizes: a ValueError, not an overflow, for absurd shapes.
idx checked_numel(const std::vector<idx>& shape, const char* what) {
  idx n = 1;
  for (idx s : shape) {
    if (s < 0) value_error(std::string(what) + ": negative size");
    if (__builtin_mul_overflow(n, s, &n) || n > (idx(1) << 40))
      value_error(std::string(what) + " of shape " + shape_str(shape) + " is too large");
  }
  return n;
}

// A new C-contiguous array; large ones take their memory from Note [array cache].
py::array_t<float> empty_f32(const std::vector<idx>& shape, const char* what) {
  const idx n = checked_numel(shape, what);
  const std::vector<py::ssize_t> dims(shape.begin(), shape.end());
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(float);
  if (bytes < qkv::ArrayCache::kMinBytes) return py::array_t<float>(dims);
  struct Owned {  // the capsule's value: the block and its size
    void* ptr;
    std::size_t bytes;
  };
  qkv::ArrayCache& cache = qkv::ArrayCache::instance();
  auto owned = std::make_unique<Owned>(Owned{nullptr, bytes});
  owned->ptr = cache.take(bytes);  // std::bad_alloc -> MemoryError
  py::capsule base;
  try {
    base = py::capsule(owned.get(), [](void* p) {
      std::unique_ptr<Owned> o(static_cast<Owned*>(p));
      qkv::ArrayCache::instance().give(o->ptr, o->bytes);
    });
  } catch (...) {
    cache.give(owned->ptr, bytes);
    throw;
  }
  float* data = static_cast<float*>(owned.release()->ptr);  // the capsule owns it now
  return py::array_t<float>(dims, data, base);
}

Arr view_of(py::array_t<float>& a) {
  Arr r;
  r.ptr = a.mutable_data();
  r.shape.resize(static_cast<size_t>(a.ndim()));
  r.strides.resize(static_cast<size_t>(a.ndim()));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    r.shape[i] = a.shape(i);
    r.strides[i] = a.strides(i) / static_cast<idx>(sizeof(float));
  }
  return r;
}

// True when two index tuples of a map to one address: sorted by |stride|, each
// stride must step past everything the smaller ones span.
bool self_overlapping(const Arr& a) {
  if (a.size() <= 1) return false;
  std::vector<std::pair<idx, idx>> dims;  // (|stride|, extent)
  for (size_t i = 0; i < a.shape.size(); ++i)
    if (a.shape[i] > 1) dims.emplace_back(a.strides[i] < 0 ? -a.strides[i] : a.strides[i], a.shape[i]);
  std::sort(dims.begin(), dims.end());
  idx span = 1;  // elements covered by the smaller dims
  for (const auto& [stride, extent] : dims) {
    if (stride < span) return true;
    span = stride * (extent - 1) + span;
  }
  return false;
}

// Output: the given `out` (checked: float32, shape, writeable) or a new array.
std::pair<py::array_t<float>, Arr> output(const py::object& out, const char* name, const std::vector<idx>& shape) {
  if (out.is_none()) {
    py::array_t<float> a = empty_f32(shape, name);
    Arr v = view_of(a);
    return {a, v};
  }
  Arr v = as_f32(out, name, static_cast<int>(shape.size()), true);
  expect_shape(v, name, shape);
  if (self_overlapping(v)) value_error(std::string(name) + " has overlapping elements (e.g. a zero stride); pass a fresh array");
  return {py::reinterpret_borrow<py::array_t<float>>(out), v};
}

qkv::Tensor4 tensor4(const Arr& a) {
  qkv::Tensor4 t;
  t.ptr = a.ptr;
  t.batch = a.shape[0];
  t.heads = a.shape[1];
  t.seq = a.shape[2];
  t.dim = a.shape[3];
  t.bs = a.strides[0];
  t.hs = a.strides[1];
  t.ss = a.strides[2];
  return t;
}

std::atomic<int> g_num_threads{0};
// The most threads an op starts, whatever set_num_threads or OMP_NUM_THREADS say
// (thread creation failing inside a parallel region would abort the process)
constexpr int kMaxThreads = 1024;

// The threads the next op started from this thread may use: set_num_threads'
// ceiling (or kMaxThreads), lowered by this thread's OpenMP limit (threadpoolctl,
// OMP_NUM_THREADS).
int thread_ceiling() {
  const int n = g_num_threads.load();
  return n > 0 ? n : kMaxThreads;
}
int effective_threads() { return std::min(thread_ceiling(), omp_get_max_threads()); }

// Note [fork]
// GNU OpenMP keeps its worker threads in a pool that fork() does not copy. In a child
// forked after the parent ran a team of several threads (multiprocessing's 'fork'
// start method, the default on Linux before Python 3.14; a server that preloads and
// forks workers), the next parallel region waits forever for workers that do not
// exist: a matmul in a multiprocessing.Pool worker hung. So such a child runs every
// op on one thread (set at the fork, in the child only; the parent keeps its
// threads), and set_num_threads refuses more there with a RuntimeError that names
// the way out: the 'spawn' or 'forkserver' start method. A child forked before any
// team started (or from a parent that ran on one thread) keeps its threads. A team
// started by another library on the same OpenMP runtime is not seen here.
std::atomic<bool> g_forked_single{false};
void after_fork_in_child() {  // a pthread_atfork child handler: atomics only
  if (qkv::teams_started()) {
    g_num_threads.store(1);
    g_forked_single.store(true);
  }
}

const qkv::KernelTable& active_kernels() {
  try {
    return qkv::kernels();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("QKV_NATIVE_ISA: ") + e.what());
  }
}

// Runs f with the GIL released, under this thread's OpenMP limit and set_num_threads.
// Note [exit during an op]: the GIL is taken back by a plain call, not by a guard's
// destructor. A daemon thread still inside an op when the interpreter exits is ended
// by CPython as it asks for the GIL back (pthread_exit, which unwinds the stack); from
// a destructor (noexcept) that unwinding called std::terminate, and the whole process
// aborted at exit ("terminate called without an active exception", SIGABRT).
template <class F>
void run_native(F&& f) {
  const int n = thread_ceiling();
  PyThreadState* const state = PyEval_SaveThread();
  try {
    // set_num_threads is a ceiling for every calling thread; a lower limit already in
    // force in this thread (threadpoolctl, omp_set_num_threads) is kept.
    if (n < omp_get_max_threads()) omp_set_num_threads(n);
    f();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

// A right operand packed once (Note [packed weights] in qkv/gemm.h): w (K, N), or
// with trans a (N, K) array (a PyTorch Linear.weight) packed as its transpose.
// Several weights packed together (pack_weights) share one buffer, so that a model's
// weights fill whole huge pages (Note [huge pages]); each holds it alive.
struct PackedWeight {
  // Set by every constructor, cleared by the destructor: PackedWeight.__new__ without
  // __init__ hands the methods raw memory (pybind11 allocates the value lazily),
  // which checked() refuses instead of reading garbage sizes and pointers
  static constexpr std::uint64_t kLive = 0x21576b6361507671;
  std::uint64_t live = kLive;
  idx K = 0, N = 0;
  std::shared_ptr<qkv::AlignedBuffer> buf;
  idx offset = 0;  // floats into *buf

  PackedWeight() = default;
  PackedWeight(const PackedWeight&) = default;
  PackedWeight(PackedWeight&&) = default;
  PackedWeight& operator=(const PackedWeight&) = default;
  PackedWeight& operator=(PackedWeight&&) = default;
  ~PackedWeight() { *static_cast<volatile std::uint64_t*>(&live) = 0; }
  const PackedWeight& checked() const {
    if (live != kLive) type_error("PackedWeight is not initialised: construct it with PackedWeight(w)");
    return *this;
  }
  PackedWeight(const py::object& w_obj, bool trans) {
    *this = std::move(pack_all({w_obj}, trans)[0]);
  }

  // Packs every w of `ws` into one new buffer, each at a 64-byte boundary.
  static std::vector<PackedWeight> pack_all(const std::vector<py::object>& ws, bool trans) {
    std::vector<Arr> arrs;
    std::vector<PackedWeight> out(ws.size());
    idx total = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      const std::string name = ws.size() == 1 ? "w" : "ws[" + std::to_string(i) + "]";
      arrs.push_back(as_f32(ws[i], name.c_str(), 2));
      PackedWeight& p = out[i];
      p.K = trans ? arrs[i].shape[1] : arrs[i].shape[0];
      p.N = trans ? arrs[i].shape[0] : arrs[i].shape[1];
      p.offset = total;
      const idx size = checked_numel({qkv::ceil_div(p.N, qkv::kPackedPanel), qkv::kPackedPanel, p.K}, name.c_str());
      total = checked_numel({qkv::ceil_div(total + size, 16), 16}, "packed weights");
    }
    auto buf = std::make_shared<qkv::AlignedBuffer>(std::max<idx>(1, total));
    for (PackedWeight& p : out) p.buf = buf;
    run_native([&] {
      for (size_t i = 0; i < out.size(); ++i) {
        qkv::PlainMat B(arrs[i].ptr, arrs[i].strides[0], 1, trans);
        qkv::pack_b(B.map, out[i].K, out[i].N, buf->data() + out[i].offset);
      }
    });
    return out;
  }

  qkv::PackedB view() const { return {buf->data() + offset, K, N}; }
  py::array_t<float> to_array() const {
    py::array_t<float> a({K, N});
    float* dst = a.mutable_data();
    const qkv::PackedB b = view();
    for (idx p = 0; p < K; ++p)
      for (idx j = 0; j < N; ++j) dst[p * N + j] = *b.at(p, j);
    return a;
  }
};

const PackedWeight* as_packed(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) return nullptr;  // the common case, and a cheaper test
  return py::isinstance<PackedWeight>(obj) ? &obj.cast<const PackedWeight&>().checked() : nullptr;
}

// ---------------------------------------------------------------------------
py::array_t<float> matmul(const py::object& a_obj, const py::object& b_obj, bool trans_a, bool trans_b, float alpha,
                          float beta, const py::object& out) {
  const auto& kt = active_kernels();
  const PackedWeight* pw = as_packed(b_obj);
  if (!py::isinstance<py::array>(a_obj)) type_error("a must be a numpy.ndarray of float32");
  if (!pw && !py::isinstance<py::array>(b_obj)) type_error("b must be a numpy.ndarray of float32 or a PackedWeight");
  if (pw && trans_b)
    value_error("trans_b does not apply to a PackedWeight: pack the transpose instead (pack_weight(w, trans=True))");
  const int nda = static_cast<int>(py::reinterpret_borrow<py::array>(a_obj).ndim());
  const int ndb = pw ? 2 : static_cast<int>(py::reinterpret_borrow<py::array>(b_obj).ndim());
  if (nda != 2 && nda != 3) value_error("a must be 2-D (M, K) or 3-D (batch, M, K), got " + std::to_string(nda) + "-D");
  if (ndb != 2 && ndb != 3) value_error("b must be 2-D (K, N) or 3-D (batch, K, N), got " + std::to_string(ndb) + "-D");
  Arr a = as_f32(a_obj, "a", nda), b;
  if (pw) b.shape = {pw->K, pw->N}, b.strides = {pw->N, 1};
  else b = as_f32(b_obj, "b", ndb);
  const idx ba = nda == 3 ? a.shape[0] : 1, bb = ndb == 3 ? b.shape[0] : 1;
  if (nda == 3 && ndb == 3 && ba != bb)
    value_error("a and b must have the same batch size, got " + std::to_string(ba) + " and " + std::to_string(bb));
  const idx batch = nda == 3 ? ba : bb;  // a 2-D operand broadcasts against the other's batch (even 0)
  const int oa = nda - 2, ob = ndb - 2;
  const idx M = trans_a ? a.shape[oa + 1] : a.shape[oa], Ka = trans_a ? a.shape[oa] : a.shape[oa + 1];
  const idx Kb = trans_b ? b.shape[ob + 1] : b.shape[ob], N = trans_b ? b.shape[ob] : b.shape[ob + 1];
  if (Ka != Kb)
    value_error("inner dimensions differ: op(a) is " + shape_str({M, Ka}) + " and op(b) is " + shape_str({Kb, N}));
  std::vector<idx> oshape = (nda == 3 || ndb == 3) ? std::vector<idx>{batch, M, N} : std::vector<idx>{M, N};
  if (beta != 0.0f && out.is_none()) value_error("beta != 0 needs out= (the C that beta scales)");
  auto [res, c] = output(out, "out", oshape);
  if (c.size() == 0) return res;  // nothing to write (not a loop over 2**40 empty products)
  const idx c_rs = c.strides[c.shape.size() - 2];
  // element strides of op(a), op(b) for one batch item
  const idx a_rs = a.strides[oa], a_cs = a.strides[oa + 1];
  const idx b_rs = b.strides[ob], b_cs = b.strides[ob + 1];
  run_native([&] {
    for (idx i = 0; i < batch; ++i) {
      const float* ap = a.ptr + (nda == 3 ? i * a.strides[0] : 0);
      const float* bp = b.ptr + (ndb == 3 ? i * b.strides[0] : 0);
      float* cp = c.ptr + (oshape.size() == 3 ? i * c.strides[0] : 0);
      qkv::PlainMat A(ap, trans_a ? a_cs : a_rs, trans_a ? a_rs : a_cs);
      qkv::PlainMat C(cp, c_rs, 1);
      if (pw) {
        qkv::gemm(kt, M, A.map, pw->view(), alpha, beta, C.map, nullptr);
        continue;
      }
      qkv::PlainMat B(bp, trans_b ? b_cs : b_rs, trans_b ? b_rs : b_cs);
      qkv::gemm(kt, M, N, Ka, alpha, A.map, B.map, beta, C.map, nullptr);
    }
  });
  return res;
}

// out (M×N) = act(x (M×K) · w (K×N) + b + beta·out): the dense layer, bias, GELU and
// (beta != 0, out given) a residual added to out's old contents, all in the GEMM's store.
py::array_t<float> linear(const py::object& x_obj, const py::object& w_obj, const py::object& b_obj,
                          const std::string& activation, const py::object& out, float beta) {
  const auto& kt = active_kernels();
  const PackedWeight* pw = as_packed(w_obj);
  Arr x = as_f32(x_obj, "x", 2), w;
  if (pw) w.shape = {pw->K, pw->N}, w.strides = {pw->N, 1};
  else w = as_f32(w_obj, "w", 2);
  const idx M = x.shape[0], K = x.shape[1], N = w.shape[1];
  if (w.shape[0] != K)
    value_error("w must have shape (d_in=" + std::to_string(K) + ", d_out), got " + shape_str(w.shape));
  int act = 0;
  if (activation == "gelu") act = 1;
  else if (activation != "none") value_error("activation must be 'none' or 'gelu', got '" + activation + "'");
  const float* bias = nullptr;
  if (!b_obj.is_none()) {
    Arr b = as_f32(b_obj, "b", 1);
    expect_shape(b, "b", {N});
    bias = b.ptr;
  }
  if (beta != 0.0f && out.is_none()) value_error("beta != 0 adds to out: pass out");
  auto [res, c] = output(out, "out", {M, N});
  run_native([&] {
    qkv::PlainMat A(x.ptr, x.strides[0], 1), B(w.ptr, w.strides[0], 1), C(c.ptr, c.strides[0], 1);
    if (pw) qkv::gemm(kt, M, A.map, pw->view(), 1.0f, beta, C.map, bias, act);
    else qkv::gemm(kt, M, N, K, 1.0f, A.map, B.map, beta, C.map, bias, act);
  });
  return res;
}

py::tuple layer_norm(const py::object& x_obj, const py::object& g_obj, const py::object& b_obj, float eps,
                     const py::object& out) {
  const auto& kt = active_kernels();
  Arr x = as_f32(x_obj, "x", 2), g = as_f32(g_obj, "weight", 1), b = as_f32(b_obj, "bias", 1);
  const idx rows = x.shape[0], n = x.shape[1];
  if (n == 0) value_error("x must have at least one feature to normalise (its last axis is empty)");
  expect_shape(g, "weight", {n});
  expect_shape(b, "bias", {n});
  if (!(eps > 0.0f)) value_error("eps must be positive");
  auto [y, ya] = output(out, "out", {rows, n});  // out may be x itself: each row is read before it is written
  auto [mean, ma] = output(py::none(), "mean", {rows});
  auto [rstd, ra] = output(py::none(), "rstd", {rows});
  run_native([&] {
    qkv::layer_norm_forward(kt, rows, n, x.ptr, x.strides[0], g.ptr, b.ptr, eps, ya.ptr, ya.strides[0], ma.ptr,
                            ra.ptr);
  });
  return py::make_tuple(y, mean, rstd);
}

py::tuple layer_norm_backward(const py::object& dy_obj, const py::object& x_obj, const py::object& g_obj,
                              const py::object& mean_obj, const py::object& rstd_obj) {
  const auto& kt = active_kernels();
  Arr dy = as_f32(dy_obj, "dy", 2), x = as_f32(x_obj, "x", 2), g = as_f32(g_obj, "weight", 1),
      mean = as_f32(mean_obj, "mean", 1), rstd = as_f32(rstd_obj, "rstd", 1);
  const idx rows = x.shape[0], n = x.shape[1];
  expect_shape(dy, "dy", {rows, n});
  expect_shape(g, "weight", {n});
  expect_shape(mean, "mean", {rows});
  expect_shape(rstd, "rstd", {rows});
  auto [dx, dxa] = output(py::none(), "dx", {rows, n});
  auto [dg, dga] = output(py::none(), "dweight", {n});
  auto [db, dba] = output(py::none(), "dbias", {n});
  run_native([&] {
    qkv::layer_norm_backward(kt, rows, n, dy.ptr, dy.strides[0], x.ptr, x.strides[0], g.ptr, mean.ptr, rstd.ptr,
                             dxa.ptr, n, dga.ptr, dba.ptr);
  });
  return py::make_tuple(dx, dg, db);
}

// A 1-D integer array (int32 or int64, any stride) of length n, read into int64s.
std::vector<std::int64_t> int64_vector(const py::object& obj, const char* name, idx n) {
  if (!py::isinstance<py::array>(obj)) type_error(std::string(name) + " must be a numpy array of integers");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  const bool i8 = is_dtype(a.dtype(), 'i', 8), i4 = is_dtype(a.dtype(), 'i', 4);
  if (!i8 && !i4) type_error(std::string(name) + " must be a numpy array of int32 or int64, got " +
                             std::string(py::str(a.dtype())));
  if (a.ndim() != 1 || a.shape(0) != n)
    value_error(std::string(name) + " must have shape (" + std::to_string(n) + ",), got " +
                shape_str(std::vector<idx>(a.shape(), a.shape() + a.ndim())));
  std::vector<std::int64_t> out(static_cast<size_t>(n));
  for (idx i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] = read_int(a, i, i8);
  }
  return out;
}

// (loss, dlogits): mean softmax cross-entropy of logits (rows, c) against targets (rows,).
py::tuple softmax_cross_entropy(const py::object& logits_obj, const py::object& targets_obj, std::int64_t ignore_index,
                                float label_smoothing, const py::object& out) {
  const auto& kt = active_kernels();
  Arr x = as_f32(logits_obj, "logits", 2);
  const idx rows = x.shape[0], c = x.shape[1];
  if (c < 1) value_error("logits must have at least one class, got shape " + shape_str(x.shape));
  if (!(label_smoothing >= 0.0f && label_smoothing < 1.0f))
    value_error("label_smoothing must lie in [0, 1), got " + std::to_string(label_smoothing));
  const std::vector<std::int64_t> t = int64_vector(targets_obj, "targets", rows);
  for (idx r = 0; r < rows; ++r)
    if (t[r] != ignore_index && (t[r] < 0 || t[r] >= c))
      value_error("targets must lie in [0, " + std::to_string(c) + ") or equal ignore_index=" +
                  std::to_string(ignore_index) + ", got targets[" + std::to_string(r) + "] = " + std::to_string(t[r]));
  auto [dx, dxa] = output(out, "out", {rows, c});
  if (dxa.ptr == x.ptr && rows * c > 0) value_error("out must not be logits");
  double loss = 0.0;
  run_native([&] {
    loss = qkv::softmax_cross_entropy(kt, rows, c, x.ptr, x.strides[0], t.data(), ignore_index, label_smoothing,
                                      dxa.ptr, dxa.strides[0]);
  });
  return py::make_tuple(loss, dx);
}

// (y, mask): inverted dropout of a C-contiguous x, drop probability threshold / 2^32.
py::tuple dropout(const py::object& x_obj, std::uint64_t seed, std::uint32_t threshold, float scale) {
  const auto& kt = active_kernels();
  if (!py::isinstance<py::array>(x_obj)) type_error("x must be a numpy.ndarray of float32");
  py::array xa = py::reinterpret_borrow<py::array>(x_obj);
  if (!(xa.flags() & py::array::c_style)) value_error("x must be C-contiguous");
  Arr x = as_f32(x_obj, "x", static_cast<int>(xa.ndim()));
  auto [y, ya] = output(py::none(), "y", x.shape);
  auto [mask, ma] = output(py::none(), "mask", x.shape);
  const idx n = x.size();
  run_native([&] { qkv::dropout_forward(kt, n, x.ptr, ya.ptr, ma.ptr, seed, threshold, scale); });
  return py::make_tuple(y, mask);
}

// The flat buffers and parameter table shared by the optimizer updates: every buffer
// is 1-D contiguous float32 of offsets[-1] elements (only an optional one may be None).
struct FlatBuffer {
  const char* name;
  const py::object* obj;
  bool optional = false;
};
struct FlatParams {
  std::vector<std::int64_t> offsets;
  std::vector<std::uint8_t> decay;
  idx n_params = 0;
};

FlatParams flat_params(const py::object& offsets_obj, const py::object& decay_obj,
                       std::initializer_list<FlatBuffer> buffers) {
  FlatParams f;
  if (!py::isinstance<py::array>(offsets_obj)) type_error("offsets must be a numpy array of integers");
  const idx n_off = py::reinterpret_borrow<py::array>(offsets_obj).ndim() == 1
                        ? py::reinterpret_borrow<py::array>(offsets_obj).shape(0) : 0;
  if (n_off < 1) value_error("offsets must have shape (n_params + 1,)");
  f.offsets = int64_vector(offsets_obj, "offsets", n_off);
  f.n_params = n_off - 1;
  for (idx p = 0; p < f.n_params; ++p)
    if (f.offsets[p + 1] < f.offsets[p]) value_error("offsets must be non-decreasing");
  if (f.offsets[0] != 0) value_error("offsets must start at 0");
  if (!py::isinstance<py::array>(decay_obj)) type_error("decay must be a numpy array of bool");
  py::array d = py::reinterpret_borrow<py::array>(decay_obj);
  if (!is_dtype(d.dtype(), 'b', 1) || d.ndim() != 1 || d.shape(0) != f.n_params)
    value_error("decay must be a bool array of shape (" + std::to_string(f.n_params) + ",)");
  f.decay.resize(static_cast<size_t>(f.n_params));
  for (idx p = 0; p < f.n_params; ++p) f.decay[p] = *(static_cast<const char*>(d.data()) + p * d.strides(0)) != 0;
  const idx total = f.offsets.back();
  for (const auto& [name, obj, optional] : buffers) {
    if (obj->is_none()) {
      if (optional) continue;
      type_error(std::string(name) + " must be a float32 numpy array, got None");
    }
    Arr a = as_f32(*obj, name, 1, true);
    expect_shape(a, name, {total});
  }
  return f;
}

float* flat_ptr(const py::object& obj) {
  return obj.is_none() ? nullptr : static_cast<float*>(py::reinterpret_borrow<py::array>(obj).mutable_data());
}

void adam_update(const py::object& w, const py::object& g, const py::object& m, const py::object& v,
                 const py::object& offsets, const py::object& decay, float beta1, float one_minus_beta1, float beta2,
                 float one_minus_beta2, float bias2_sqrt, float eps, float step_size, float decay_mul, float l2) {
  const auto& kt = active_kernels();
  FlatParams f = flat_params(offsets, decay, {{"w", &w}, {"g", &g}, {"m", &m}, {"v", &v}});
  qkv::AdamStep plain{1.0f, 0.0f, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, step_size,
                      false, false};
  qkv::AdamStep decayed = plain;
  decayed.decay_mul = decay_mul;
  decayed.l2 = l2;
  decayed.decoupled = decay_mul != 1.0f;
  decayed.coupled = l2 != 0.0f;
  float *wp = flat_ptr(w), *gp = flat_ptr(g), *mp = flat_ptr(m), *vp = flat_ptr(v);
  run_native([&] {
    qkv::adam_update(kt, f.n_params, f.offsets.data(), f.decay.data(), wp, gp, mp, vp, decayed, plain);
  });
}

void sgd_update(const py::object& w, const py::object& g, const py::object& buf, const py::object& offsets,
                const py::object& decay, float wd, float momentum, float one_minus_dampening, float lr, bool first,
                bool nesterov) {
  const auto& kt = active_kernels();
  FlatParams f = flat_params(offsets, decay, {{"w", &w}, {"g", &g}, {"buf", &buf, true}});
  qkv::SgdStep plain{0.0f, momentum, one_minus_dampening, lr, false, !buf.is_none(), first, nesterov};
  qkv::SgdStep decayed = plain;
  decayed.wd = wd;
  decayed.has_wd = wd != 0.0f;
  float *wp = flat_ptr(w), *gp = flat_ptr(g), *bp = flat_ptr(buf);
  run_native([&] {
    qkv::sgd_update(kt, f.n_params, f.offsets.data(), f.decay.data(), wp, gp, bp, decayed, plain);
  });
}

py::array_t<float> gelu(const py::object& x_obj) {
  const auto& kt = active_kernels();
  Arr x = as_f32(x_obj, "x", 2);
  auto [y, ya] = output(py::none(), "y", x.shape);
  run_native([&] { qkv::gelu_forward(kt, x.shape[0], x.shape[1], x.ptr, x.strides[0], ya.ptr, x.shape[1]); });
  return y;
}

py::array_t<float> gelu_backward(const py::object& x_obj, const py::object& dy_obj) {
  const auto& kt = active_kernels();
  Arr x = as_f32(x_obj, "x", 2), dy = as_f32(dy_obj, "dy", 2);
  expect_shape(dy, "dy", x.shape);
  auto [dx, dxa] = output(py::none(), "dx", x.shape);
  run_native([&] {
    qkv::gelu_backward(kt, x.shape[0], x.shape[1], x.ptr, x.strides[0], dy.ptr, dy.strides[0], dxa.ptr, x.shape[1]);
  });
  return dx;
}

// Segments of one head-major (batch, heads, seq, d_head) tensor, appended to segs.
void add_head_segments(std::vector<qkv::Segment>& segs, const Arr& t) {
  for (idx h = 0; h < t.shape[1]; ++h) segs.push_back({t.ptr + h * t.strides[1], t.strides[0], t.strides[2]});
}
// Segments of the column blocks of a (d_model, heads·d_head) weight: one per head.
void add_weight_segments(std::vector<qkv::Segment>& segs, const Arr& w, idx d_head) {
  for (idx h = 0; h * d_head < w.shape[1]; ++h) segs.push_back({w.ptr + h * d_head * w.strides[1], 0, w.strides[0]});
}

struct ProjShapes {
  idx batch, seq, d_model, num_heads, num_kv_heads, d_head, d_q, d_kv, N;
};

// Shapes of a projection of x (batch, seq, d_model) to num_heads query heads and
// num_kv_heads key/value heads of d_head.
ProjShapes projection_shapes(const Arr& x, idx num_heads, idx num_kv_heads, idx d_head) {
  ProjShapes s;
  s.batch = x.shape[0];
  s.seq = x.shape[1];
  s.d_model = x.shape[2];
  s.num_heads = num_heads;
  s.num_kv_heads = num_kv_heads;
  s.d_head = d_head;
  s.d_q = num_heads * d_head;
  s.d_kv = num_kv_heads * d_head;
  s.N = s.d_q + 2 * s.d_kv;
  checked_numel({s.batch, s.seq, s.N}, "projection output");
  return s;
}

void check_heads(idx num_heads, idx num_kv_heads) {
  if (num_heads <= 0) value_error("num_heads must be positive, got " + std::to_string(num_heads));
  if (num_kv_heads <= 0) value_error("num_kv_heads must be positive, got " + std::to_string(num_kv_heads));
  if (num_heads % num_kv_heads != 0)
    value_error("num_kv_heads must divide num_heads, got num_heads=" + std::to_string(num_heads) +
                ", num_kv_heads=" + std::to_string(num_kv_heads));
  // the maps keep a segment (24 bytes) per head of every operand, even an empty one
  constexpr idx kMaxHeads = idx{1} << 20;
  if (num_heads > kMaxHeads || num_kv_heads > kMaxHeads)
    value_error("num_heads and num_kv_heads must be at most 2**20, got num_heads=" + std::to_string(num_heads) +
                ", num_kv_heads=" + std::to_string(num_kv_heads));
}

ProjShapes check_projection(const Arr& x, const Arr& wq, const Arr& wk, const Arr& wv, idx num_heads,
                            idx num_kv_heads) {
  check_heads(num_heads, num_kv_heads);
  const idx d_model = x.shape[2];
  if (wq.shape[0] != d_model) value_error("w_q must have shape (d_model=" + std::to_string(d_model) + ", d_q), got " + shape_str(wq.shape));
  if (wq.shape[1] % num_heads != 0)
    value_error("num_heads=" + std::to_string(num_heads) + " must divide d_q=" + std::to_string(wq.shape[1]));
  if (wq.shape[1] == 0) value_error("d_head must be positive (w_q has 0 columns)");
  const ProjShapes s = projection_shapes(x, num_heads, num_kv_heads, wq.shape[1] / num_heads);
  expect_shape(wk, "w_k", {s.d_model, s.d_kv});
  expect_shape(wv, "w_v", {s.d_model, s.d_kv});
  return s;
}

// q, k, v outputs of a projection (given or new, checked), and `project(x, out)`
// run on the maps that read x and write their heads.
template <class F>
py::tuple project_heads(const Arr& x, const ProjShapes& s, const py::object& q_out, const py::object& k_out,
                        const py::object& v_out, F&& project) {
  auto [q, qa] = output(q_out, "out[0]", {s.batch, s.num_heads, s.seq, s.d_head});
  auto [k, ka] = output(k_out, "out[1]", {s.batch, s.num_kv_heads, s.seq, s.d_head});
  auto [v, va] = output(v_out, "out[2]", {s.batch, s.num_kv_heads, s.seq, s.d_head});
  std::vector<qkv::Segment> osegs;
  add_head_segments(osegs, qa);
  add_head_segments(osegs, ka);
  add_head_segments(osegs, va);
  qkv::Segment xseg{x.ptr, x.strides[0], x.strides[1]};
  qkv::MatMap xm{&xseg, 1, qkv::MatMap().seg_cols, std::max<idx>(s.seq, 1), false};
  qkv::MatMap om{osegs.data(), 1, s.d_head, std::max<idx>(s.seq, 1), false};
  run_native([&] { project(xm, om); });
  return py::make_tuple(q, k, v);
}

py::tuple qkv_project(const py::object& x_obj, const py::object& wq_obj, const py::object& wk_obj,
                      const py::object& wv_obj, const py::object& bq_obj, const py::object& bk_obj,
                      const py::object& bv_obj, idx num_heads, idx num_kv_heads, const py::object& q_out,
                      const py::object& k_out, const py::object& v_out) {
  const auto& kt = active_kernels();
  Arr x = as_f32(x_obj, "x", 3), wq = as_f32(wq_obj, "w_q", 2), wk = as_f32(wk_obj, "w_k", 2),
      wv = as_f32(wv_obj, "w_v", 2);
  const ProjShapes s = check_projection(x, wq, wk, wv, num_heads, num_kv_heads);
  std::vector<float> bias;
  const bool any_bias = !bq_obj.is_none() || !bk_obj.is_none() || !bv_obj.is_none();
  if (any_bias) {
    bias.assign(static_cast<size_t>(s.N), 0.0f);
    const py::object* objs[3] = {&bq_obj, &bk_obj, &bv_obj};
    const char* names[3] = {"b_q", "b_k", "b_v"};
    const idx lens[3] = {s.d_q, s.d_kv, s.d_kv}, offs[3] = {0, s.d_q, s.d_q + s.d_kv};
    for (int t = 0; t < 3; ++t) {
      if (objs[t]->is_none()) continue;
      Arr bt = as_f32(*objs[t], names[t], 1);
      expect_shape(bt, names[t], {lens[t]});
      for (idx j = 0; j < lens[t]; ++j) bias[offs[t] + j] = bt.ptr[j * bt.strides[0]];
    }
  }
  std::vector<qkv::Segment> wsegs;
  add_weight_segments(wsegs, wq, s.d_head);
  add_weight_segments(wsegs, wk, s.d_head);
  add_weight_segments(wsegs, wv, s.d_head);
  qkv::MatMap wm{wsegs.data(), 1, s.d_head, qkv::MatMap().rows_per_batch, false};
  return project_heads(x, s, q_out, k_out, v_out, [&](const qkv::MatMap& xm, const qkv::MatMap& om) {
    qkv::gemm(kt, s.batch * s.seq, s.N, s.d_model, 1.0f, xm, wm, 0.0f, om, any_bias ? bias.data() : nullptr);
  });
}

// qkv_project with [W_Q | W_K | W_V] packed once (a PackedWeight of (d_model, N)).
py::tuple qkv_project_packed(const py::object& x_obj, const PackedWeight& w, const py::object& b_obj,
                             idx num_heads, idx num_kv_heads, const py::object& q_out, const py::object& k_out,
                             const py::object& v_out) {
  const auto& kt = active_kernels();
  w.checked();
  Arr x = as_f32(x_obj, "x", 3);
  check_heads(num_heads, num_kv_heads);
  const idx heads = num_heads + 2 * num_kv_heads;
  if (w.K != x.shape[2])
    value_error("w_qkv must have d_model=" + std::to_string(x.shape[2]) + " rows, got shape " + shape_str({w.K, w.N}));
  if (w.N == 0 || w.N % heads != 0)
    value_error("w_qkv must have (num_heads + 2*num_kv_heads)*d_head = " + std::to_string(heads) +
                "*d_head columns, got shape " + shape_str({w.K, w.N}));
  const ProjShapes s = projection_shapes(x, num_heads, num_kv_heads, w.N / heads);
  const float* bias = nullptr;
  if (!b_obj.is_none()) {
    Arr b = as_f32(b_obj, "b_qkv", 1);
    expect_shape(b, "b_qkv", {s.N});
    bias = b.ptr;
  }
  return project_heads(x, s, q_out, k_out, v_out, [&](const qkv::MatMap& xm, const qkv::MatMap& om) {
    qkv::gemm(kt, s.batch * s.seq, xm, w.view(), 1.0f, 0.0f, om, bias);
  });
}

py::tuple qkv_project_backward(const py::object& x_obj, const py::object& wq_obj, const py::object& wk_obj,
                               const py::object& wv_obj, const py::object& dq_obj, const py::object& dk_obj,
                               const py::object& dv_obj, idx num_heads, idx num_kv_heads, bool need_dx,
                               bool need_dw, bool need_db) {
  const auto& kt = active_kernels();
  Arr x = as_f32(x_obj, "x", 3), wq = as_f32(wq_obj, "w_q", 2), wk = as_f32(wk_obj, "w_k", 2),
      wv = as_f32(wv_obj, "w_v", 2);
  const ProjShapes s = check_projection(x, wq, wk, wv, num_heads, num_kv_heads);
  Arr dq = as_f32(dq_obj, "dq", 4), dk = as_f32(dk_obj, "dk", 4), dv = as_f32(dv_obj, "dv", 4);
  expect_shape(dq, "dq", {s.batch, s.num_heads, s.seq, s.d_head});
  expect_shape(dk, "dk", {s.batch, s.num_kv_heads, s.seq, s.d_head});
  expect_shape(dv, "dv", {s.batch, s.num_kv_heads, s.seq, s.d_head});
  py::object dx = py::none(), dwq = py::none(), dwk = py::none(), dwv = py::none(), dbq = py::none(),
             dbk = py::none(), dbv = py::none();
  std::vector<qkv::Segment> wsegs, dsegs, dwsegs;
  add_weight_segments(wsegs, wq, s.d_head);
  add_weight_segments(wsegs, wk, s.d_head);
  add_weight_segments(wsegs, wv, s.d_head);
  add_head_segments(dsegs, dq);
  add_head_segments(dsegs, dk);
  add_head_segments(dsegs, dv);
  qkv::Segment xseg{x.ptr, x.strides[0], x.strides[1]};
  qkv::MatMap xm{&xseg, 1, qkv::MatMap().seg_cols, std::max<idx>(s.seq, 1), false};
  qkv::MatMap wm{wsegs.data(), 1, s.d_head, qkv::MatMap().rows_per_batch, false};
  qkv::MatMap dm{dsegs.data(), 1, s.d_head, std::max<idx>(s.seq, 1), false};
  qkv::Segment dxseg{nullptr, 0, 0};
  qkv::MatMap dxm{&dxseg, 1, qkv::MatMap().seg_cols, std::max<idx>(s.seq, 1), false};
  qkv::MatMap dwm{nullptr, 1, s.d_head, qkv::MatMap().rows_per_batch, false};
  std::vector<float> db;
  if (need_dx) {
    py::array_t<float> a = empty_f32({s.batch, s.seq, s.d_model}, "dx");
    dxseg = {a.mutable_data(), s.seq * s.d_model, s.d_model};
    dx = a;
  }
  if (need_dw) {
    py::array_t<float> a = empty_f32({s.d_model, s.d_q}, "dw_q"), b = empty_f32({s.d_model, s.d_kv}, "dw_k"),
                       c = empty_f32({s.d_model, s.d_kv}, "dw_v");
    Arr av = view_of(a), bv2 = view_of(b), cv = view_of(c);
    add_weight_segments(dwsegs, av, s.d_head);
    add_weight_segments(dwsegs, bv2, s.d_head);
    add_weight_segments(dwsegs, cv, s.d_head);
    dwm.segs = dwsegs.data();
    dwq = a;
    dwk = b;
    dwv = c;
  }
  if (need_db) db.assign(static_cast<size_t>(s.N), 0.0f);
  run_native([&] {
    qkv::project_backward(kt, s.batch * s.seq, s.d_model, s.N, xm, wm, dm, need_dx ? &dxm : nullptr,
                          need_dw ? &dwm : nullptr, need_db ? db.data() : nullptr);
  });
  if (need_db) {
    py::array_t<float> a(s.d_q), b(s.d_kv), c(s.d_kv);
    std::copy(db.begin(), db.begin() + s.d_q, a.mutable_data());
    std::copy(db.begin() + s.d_q, db.begin() + s.d_q + s.d_kv, b.mutable_data());
    std::copy(db.begin() + s.d_q + s.d_kv, db.end(), c.mutable_data());
    dbq = a;
    dbk = b;
    dbv = c;
  }
  return py::make_tuple(dx, dwq, dwk, dwv, dbq, dbk, dbv);
}

// The shared checks of attention forward and backward; fills args (not o, lse).
void attention_args(qkv::AttentionArgs& args, const Arr& q, const Arr& k, const Arr& v, bool causal,
                    const py::object& key_lengths, const py::object& bias, float scale,
                    std::vector<idx>& lengths_store) {
  const idx B = q.shape[0], H = q.shape[1], Sq = q.shape[2], D = q.shape[3];
  const idx Hkv = k.shape[1], Sk = k.shape[2];
  if (k.shape[0] != B || k.shape[3] != D)
    value_error("k must have shape (batch=" + std::to_string(B) + ", num_kv_heads, seq_k, d_head=" + std::to_string(D) +
                "), got " + shape_str(k.shape));
  if (v.shape[0] != B || v.shape[1] != Hkv || v.shape[2] != Sk)
    value_error("v must have shape (batch=" + std::to_string(B) + ", num_kv_heads=" + std::to_string(Hkv) +
                ", seq_k=" + std::to_string(Sk) + ", d_v), got " + shape_str(v.shape));
  if (Hkv == 0 || H % Hkv != 0)
    value_error("the number of kv heads must divide the number of query heads, got num_heads=" + std::to_string(H) +
                ", num_kv_heads=" + std::to_string(Hkv));
  if (Sk >= INT_MAX || Sq >= INT_MAX || D >= INT_MAX || v.shape[3] >= INT_MAX)
    value_error("sequence lengths and head dims must be below 2**31");
  checked_numel({B, H, Sq, std::max<idx>(v.shape[3], 1)}, "attention output");
  if (!std::isfinite(scale)) value_error("scale must be finite");
  args.q = tensor4(q);
  args.k = tensor4(k);
  args.v = tensor4(v);
  args.scale = scale;
  args.causal = causal;
  if (!key_lengths.is_none()) {
    py::array kl = py::reinterpret_borrow<py::array>(key_lengths);
    if (!py::isinstance<py::array>(key_lengths) || !(is_dtype(kl.dtype(), 'i', 8) || is_dtype(kl.dtype(), 'i', 4)))
      type_error("key_lengths must be a numpy array of int32 or int64");
    if (kl.ndim() != 1 || kl.shape(0) != B)
      value_error("key_lengths must have shape (batch=" + std::to_string(B) + ",)");
    lengths_store.resize(static_cast<size_t>(B));
    for (idx b = 0; b < B; ++b) {
      const idx len = read_int(kl, b, is_dtype(kl.dtype(), 'i', 8));
      if (len < 0 || len > Sk)
        value_error("key_lengths[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside [0, seq_k=" +
                    std::to_string(Sk) + "]");
      lengths_store[static_cast<size_t>(b)] = len;
    }
    args.key_lengths = lengths_store.data();
  }
  if (!bias.is_none()) {
    Arr bv;
    // bias is broadcast to (batch, num_heads, seq_q, seq_k) by the Python layer (zero strides)
    if (!py::isinstance<py::array>(bias)) type_error("bias must be a numpy.ndarray of float32");
    py::array ba = py::reinterpret_borrow<py::array>(bias);
    if (!is_dtype(ba.dtype(), 'f', 4)) type_error("bias must have dtype float32, got " + std::string(py::str(ba.dtype())));
    if (ba.ndim() != 4) value_error("bias must be 4-D (batch, num_heads, seq_q, seq_k)");
    std::vector<idx> shape(ba.shape(), ba.shape() + 4);
    expect_shape(Arr{nullptr, shape, {}}, "bias", {B, H, Sq, Sk});
    args.bias = static_cast<const float*>(ba.data());
    if (ba.size() > 0 && reinterpret_cast<std::uintptr_t>(args.bias) % alignof(float) != 0)
      value_error("bias is not aligned to 4 bytes (a view at an odd byte offset); pass a copy");
    idx st[4];
    for (int i = 0; i < 4; ++i) {
      if (ba.strides(i) % 4 != 0) value_error("bias has a stride that is not a multiple of 4 bytes");
      st[i] = ba.strides(i) / 4;
    }
    args.bias_bs = st[0];
    args.bias_hs = st[1];
    args.bias_qs = st[2];
    args.bias_ks = st[3];
  }
}

// A packed-form tensor: (total, heads, dim) with offsets cu (batch+1).
qkv::Tensor4 packed_tensor(const Arr& a, const std::vector<idx>& cu) {
  qkv::Tensor4 t;
  t.ptr = a.ptr;
  t.batch = static_cast<idx>(cu.size()) - 1;
  t.heads = a.shape[1];
  t.seq = a.shape[0];
  t.dim = a.shape[2];
  t.hs = a.strides[1];
  t.ss = a.strides[0];
  t.cu = cu.data();
  return t;
}

// cu_seqlens: int32/int64 (batch+1,), cu[0] = 0, non-decreasing, cu[batch] = total.
std::vector<idx> read_offsets(const py::object& obj, const char* name, idx total) {
  if (!py::isinstance<py::array>(obj)) type_error(std::string(name) + " must be a numpy array of int32 or int64");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  const bool i64 = is_dtype(a.dtype(), 'i', 8), i32 = is_dtype(a.dtype(), 'i', 4);
  if (!i64 && !i32) type_error(std::string(name) + " must have dtype int32 or int64, got " + std::string(py::str(a.dtype())));
  if (a.ndim() != 1 || a.shape(0) < 1) value_error(std::string(name) + " must have shape (batch + 1,)");
  std::vector<idx> cu(static_cast<size_t>(a.shape(0)));
  for (py::ssize_t i = 0; i < a.shape(0); ++i) {
    cu[static_cast<size_t>(i)] = read_int(a, i, i64);
    if ((i == 0 && cu[0] != 0) || (i > 0 && cu[static_cast<size_t>(i)] < cu[static_cast<size_t>(i) - 1]))
      value_error(std::string(name) + " must start at 0 and be non-decreasing");
  }
  if (cu.back() != total)
    value_error(std::string(name) + "[-1] = " + std::to_string(cu.back()) + " must equal the number of rows " +
                std::to_string(total));
  return cu;
}

// The shared checks of the packed-form forward and backward; fills args' q, k, v,
// scale and causal. cu_q, cu_k keep the offsets the tensors point into.
void varlen_args(qkv::AttentionArgs& args, const Arr& q, const Arr& k, const Arr& v, const py::object& cu_q_obj,
                 const py::object& cu_k_obj, bool causal, float scale, std::vector<idx>& cu_q,
                 std::vector<idx>& cu_k) {
  const idx H = q.shape[1], D = q.shape[2], Hkv = k.shape[1];
  if (k.shape[2] != D) value_error("k must have shape (total_k, num_kv_heads, d_head=" + std::to_string(D) + "), got " + shape_str(k.shape));
  if (v.shape[0] != k.shape[0] || v.shape[1] != Hkv)
    value_error("v must have shape (total_k=" + std::to_string(k.shape[0]) + ", num_kv_heads=" + std::to_string(Hkv) +
                ", d_v), got " + shape_str(v.shape));
  if (Hkv == 0 || H % Hkv != 0)
    value_error("the number of kv heads must divide the number of query heads, got num_heads=" + std::to_string(H) +
                ", num_kv_heads=" + std::to_string(Hkv));
  if (q.shape[0] >= INT_MAX || k.shape[0] >= INT_MAX) value_error("total lengths must be below 2**31");
  if (!std::isfinite(scale)) value_error("scale must be finite");
  cu_q = read_offsets(cu_q_obj, "cu_seqlens_q", q.shape[0]);
  cu_k = read_offsets(cu_k_obj, "cu_seqlens_k", k.shape[0]);
  if (cu_q.size() != cu_k.size()) value_error("cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1)");
  args.q = packed_tensor(q, cu_q);
  args.k = packed_tensor(k, cu_k);
  args.v = packed_tensor(v, cu_k);
  args.scale = scale;
  args.causal = causal;
}

py::object attention_varlen(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                            const py::object& cu_q_obj, const py::object& cu_k_obj, bool causal, float scale,
                            bool return_lse, const py::object& out) {
  const auto& kt = active_kernels();
  Arr q = as_f32(q_obj, "q", 3), k = as_f32(k_obj, "k", 3), v = as_f32(v_obj, "v", 3);
  qkv::AttentionArgs args;
  std::vector<idx> cu_q, cu_k;
  varlen_args(args, q, k, v, cu_q_obj, cu_k_obj, causal, scale, cu_q, cu_k);
  const idx H = q.shape[1];
  auto [o, oa] = output(out, "out", {q.shape[0], H, v.shape[2]});
  args.o = packed_tensor(oa, cu_q);
  py::array_t<float> lse;
  if (return_lse) {
    lse = empty_f32({H, q.shape[0]}, "lse");
    args.lse = lse.mutable_data();
  }
  run_native([&] { qkv::attention_forward(kt, args); });
  if (return_lse) return py::make_tuple(o, lse);
  return o;
}

py::tuple attention_varlen_backward(const py::object& do_obj, const py::object& q_obj, const py::object& k_obj,
                                    const py::object& v_obj, const py::object& o_obj, const py::object& lse_obj,
                                    const py::object& cu_q_obj, const py::object& cu_k_obj, bool causal, float scale) {
  const auto& kt = active_kernels();
  Arr q = as_f32(q_obj, "q", 3), k = as_f32(k_obj, "k", 3), v = as_f32(v_obj, "v", 3);
  qkv::AttentionArgs args;
  std::vector<idx> cu_q, cu_k;
  varlen_args(args, q, k, v, cu_q_obj, cu_k_obj, causal, scale, cu_q, cu_k);
  const idx H = q.shape[1];
  Arr o = as_f32(o_obj, "o", 3), d_o = as_f32(do_obj, "do", 3), lse = as_f32(lse_obj, "lse", 2);
  expect_shape(o, "o", {q.shape[0], H, v.shape[2]});
  expect_shape(d_o, "do", {q.shape[0], H, v.shape[2]});
  expect_shape(lse, "lse", {H, q.shape[0]});
  if (lse.size() > 0 && ((q.shape[0] > 1 && lse.strides[1] != 1) || (H > 1 && lse.strides[0] != q.shape[0])))
    value_error("lse must be C-contiguous (the array attention_varlen() returned)");
  args.o = packed_tensor(o, cu_q);
  args.lse = lse.ptr;
  auto [dq, dqa] = output(py::none(), "dq", q.shape);
  auto [dk, dka] = output(py::none(), "dk", k.shape);
  auto [dv, dva] = output(py::none(), "dv", v.shape);
  qkv::Tensor4 tdo = packed_tensor(d_o, cu_q), tdq = packed_tensor(dqa, cu_q), tdk = packed_tensor(dka, cu_k),
               tdv = packed_tensor(dva, cu_k);
  run_native([&] { qkv::attention_backward(kt, args, tdo, tdq, tdk, tdv); });
  return py::make_tuple(dq, dk, dv);
}

py::object attention(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, bool causal,
                     const py::object& key_lengths, const py::object& bias, float scale, bool return_lse,
                     const py::object& out) {
  const auto& kt = active_kernels();
  Arr q = as_f32(q_obj, "q", 4), k = as_f32(k_obj, "k", 4), v = as_f32(v_obj, "v", 4);
  qkv::AttentionArgs args;
  std::vector<idx> lengths;
  attention_args(args, q, k, v, causal, key_lengths, bias, scale, lengths);
  const idx B = q.shape[0], H = q.shape[1], Sq = q.shape[2], Dv = v.shape[3];
  auto [o, oa] = output(out, "out", {B, H, Sq, Dv});
  args.o = tensor4(oa);
  py::array_t<float> lse;
  if (return_lse) {
    lse = empty_f32({B, H, Sq}, "lse");
    args.lse = lse.mutable_data();
  }
  run_native([&] { qkv::attention_forward(kt, args); });
  if (return_lse) return py::make_tuple(o, lse);
  return o;
}

py::tuple attention_backward(const py::object& do_obj, const py::object& q_obj, const py::object& k_obj,
                             const py::object& v_obj, const py::object& o_obj, const py::object& lse_obj, bool causal,
                             const py::object& key_lengths, const py::object& bias, float scale,
                             const py::object& dq_out, const py::object& dk_out, const py::object& dv_out,
                             idx dbias_batch, idx dbias_heads) {
  const auto& kt = active_kernels();
  Arr q = as_f32(q_obj, "q", 4), k = as_f32(k_obj, "k", 4), v = as_f32(v_obj, "v", 4);
  qkv::AttentionArgs args;
  std::vector<idx> lengths;
  attention_args(args, q, k, v, causal, key_lengths, bias, scale, lengths);
  const idx B = q.shape[0], H = q.shape[1], Sq = q.shape[2];
  Arr o = as_f32(o_obj, "o", 4), d_o = as_f32(do_obj, "do", 4), lse = as_f32(lse_obj, "lse", 3);
  expect_shape(o, "o", {B, H, Sq, v.shape[3]});
  expect_shape(d_o, "do", {B, H, Sq, v.shape[3]});
  expect_shape(lse, "lse", {B, H, Sq});
  if (lse.size() > 0 && ((B > 1 && lse.strides[0] != H * Sq) || (H > 1 && lse.strides[1] != Sq) ||
                          (Sq > 1 && lse.strides[2] != 1)))
    value_error("lse must be C-contiguous (the array attention() returned)");
  args.o = tensor4(o);
  args.lse = lse.ptr;
  // outputs may be strided views (e.g. of one token-major buffer); the Python layer checks overlaps
  auto [dq, dqa] = output(dq_out, "out[0]", q.shape);
  auto [dk, dka] = output(dk_out, "out[1]", k.shape);
  auto [dv, dva] = output(dv_out, "out[2]", v.shape);
  // with dbias_batch > 0: also the bias gradient (dbias_batch, dbias_heads, seq_q, seq_k),
  // summed over the batches / heads where those are 1 (Note [bias gradient])
  qkv::BiasGrad g;
  py::array_t<float> dbias;
  if (dbias_batch > 0) {
    if (!args.bias) value_error("the bias gradient needs a bias");
    if (!(dbias_batch == 1 || dbias_batch == B) || !(dbias_heads == 1 || dbias_heads == H))
      value_error("the bias gradient's batch and heads must be 1 or the inputs'");
    dbias = empty_f32({dbias_batch, dbias_heads, Sq, k.shape[2]}, "dbias");
    g = {dbias.mutable_data(), dbias_batch, dbias_heads};
  }
  run_native([&] { qkv::attention_backward(kt, args, tensor4(d_o), tensor4(dqa), tensor4(dka), tensor4(dva), g); });
  if (g.ptr) return py::make_tuple(dq, dk, dv, dbias);
  return py::make_tuple(dq, dk, dv);
}

py::dict cpu_info() {
  const qkv::CpuFeatures& f = qkv::cpu_features();
  py::dict d;
  d["vendor"] = f.vendor;
  d["brand"] = f.brand;
  d["family"] = f.family;
  d["gemv_prefetch"] = qkv::gemv_prefetch();
  d["gemm_kc"] = qkv::kernels().kc;  // the active variant's K block on this CPU
  py::dict feats;
  feats["avx2"] = f.avx2;
  feats["fma"] = f.fma;
  feats["avx512f"] = f.avx512f;
  feats["avx512bw"] = f.avx512bw;
  feats["avx512vl"] = f.avx512vl;
  feats["avx512dq"] = f.avx512dq;
  feats["os_saves_ymm"] = f.os_ymm;
  feats["os_saves_zmm"] = f.os_zmm;
  d["features"] = feats;
  d["supported_isas"] = qkv::supported_isas();
  d["isa"] = std::string(active_kernels().isa);
  d["num_threads"] = effective_threads();
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "qkv_native native core (private; use the qkv_native package)";
#ifdef QKV_HAVE_PTHREAD_ATFORK
  if (pthread_atfork(nullptr, nullptr, &after_fork_in_child) != 0)  // Note [fork]
    throw std::runtime_error("qkv_native: pthread_atfork failed");
#endif
  m.def("pack_weights", [](const std::vector<py::object>& ws, const py::object& trans) {
    return PackedWeight::pack_all(ws, as_flag(trans, "trans"));
  }, py::arg("ws"), py::arg("trans") = false);
  py::class_<PackedWeight>(m, "PackedWeight",
                           "A weight packed once for many products (see qkv_native.pack_weight).")
      .def(py::init([](const py::object& w, const py::object& trans) { return PackedWeight(w, as_flag(trans, "trans")); }),
           py::arg("w"), py::arg("trans") = false)
      .def_property_readonly("shape", [](const PackedWeight& w) { return py::make_tuple(w.checked().K, w.N); })
      .def_property_readonly("nbytes", [](const PackedWeight& w) {
        return static_cast<idx>(sizeof(float)) * qkv::packed_b_size(w.checked().K, w.N);
      })
      .def("to_array", [](const PackedWeight& w) { return w.checked().to_array(); })
      .def("__repr__", [](const PackedWeight& w) {
        return w.live == PackedWeight::kLive ? "PackedWeight(shape=" + shape_str({w.K, w.N}) + ")"
                                             : std::string("PackedWeight(<not initialised>)");
      })
      .def(py::pickle([](const PackedWeight& w) { return py::make_tuple(w.checked().to_array()); },
                      [](const py::tuple& t) {
                        if (t.size() != 1) value_error("PackedWeight: bad pickle state");
                        return PackedWeight(t[0], false);
                      }));
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
        py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f, py::arg("out") = py::none());
  m.def("qkv_project", &qkv_project, py::arg("x"), py::arg("w_q"), py::arg("w_k"), py::arg("w_v"),
        py::arg("b_q") = py::none(), py::arg("b_k") = py::none(), py::arg("b_v") = py::none(), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("q_out") = py::none(), py::arg("k_out") = py::none(),
        py::arg("v_out") = py::none());
  m.def("qkv_project_packed", &qkv_project_packed, py::arg("x"), py::arg("w_qkv"), py::arg("b_qkv") = py::none(),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("q_out") = py::none(), py::arg("k_out") = py::none(),
        py::arg("v_out") = py::none());
  m.def("qkv_project_backward", &qkv_project_backward, py::arg("x"), py::arg("w_q"), py::arg("w_k"), py::arg("w_v"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("need_dx") = true, py::arg("need_dw") = true, py::arg("need_db") = true);
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal") = false,
        py::arg("key_lengths") = py::none(), py::arg("bias") = py::none(), py::arg("scale"),
        py::arg("return_lse") = false, py::arg("out") = py::none());
  m.def("attention_backward", &attention_backward, py::arg("do"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("lse"), py::arg("causal") = false, py::arg("key_lengths") = py::none(),
        py::arg("bias") = py::none(), py::arg("scale"), py::arg("dq_out") = py::none(),
        py::arg("dk_out") = py::none(), py::arg("dv_out") = py::none(), py::arg("dbias_batch") = 0,
        py::arg("dbias_heads") = 0);
  m.def("attention_varlen", &attention_varlen, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("causal") = false, py::arg("scale"), py::arg("return_lse") = false,
        py::arg("out") = py::none());
  m.def("attention_varlen_backward", &attention_varlen_backward, py::arg("do"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("causal") = false, py::arg("scale"));
  m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("activation") = "none",
        py::arg("out") = py::none(), py::arg("beta") = 0.0f);
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("out") = py::none());
  m.def("layer_norm_backward", &layer_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"));
  m.def("gelu", &gelu, py::arg("x"));
  m.def("gelu_backward", &gelu_backward, py::arg("x"), py::arg("dy"));
  m.def("softmax_cross_entropy", &softmax_cross_entropy, py::arg("logits"), py::arg("targets"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("out") = py::none());
  m.def("dropout", &dropout, py::arg("x"), py::arg("seed"), py::arg("threshold"), py::arg("scale"));
  m.def("adam_update", &adam_update, py::arg("w"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("offsets"),
        py::arg("decay"), py::arg("beta1"), py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"),
        py::arg("bias2_sqrt"), py::arg("eps"), py::arg("step_size"), py::arg("decay_mul"), py::arg("l2"));
  m.def("sgd_update", &sgd_update, py::arg("w"), py::arg("g"), py::arg("buf"), py::arg("offsets"), py::arg("decay"),
        py::arg("wd"), py::arg("momentum"), py::arg("one_minus_dampening"), py::arg("lr"), py::arg("first"),
        py::arg("nesterov"));
  m.def("cpu_info", &cpu_info);
  m.def("set_num_threads", [](int n) {
    if (n < 1 || n > kMaxThreads)
      throw py::value_error("set_num_threads: n must lie in [1, " + std::to_string(kMaxThreads) + "], got " +
                            std::to_string(n));
    if (n > 1 && g_forked_single.load())  // Note [fork]
      throw std::runtime_error(
          "set_num_threads: this process was forked after qkv_native ran on several threads; OpenMP cannot "
          "start threads in such a child (they would hang), so ops here run on 1 thread. For workers with "
          "several threads each, use the 'spawn' or 'forkserver' start method (multiprocessing.get_context)");
    g_num_threads.store(n);
    omp_set_num_threads(n);
  });
  m.def("get_num_threads", &effective_threads);
  m.attr("MAX_THREADS") = kMaxThreads;
  m.def("set_cache_limit", [](long long limit) {
    if (limit < 0) throw py::value_error("set_cache_limit: nbytes must be >= 0, got " + std::to_string(limit));
    return static_cast<long long>(qkv::ArrayCache::instance().set_limit(static_cast<std::size_t>(limit)));
  }, py::arg("nbytes"));
  m.def("cache_info", [] {
    const qkv::ArrayCache::Stats s = qkv::ArrayCache::instance().stats();
    py::dict d;
    d["bytes"] = s.bytes;
    d["blocks"] = s.blocks;
    d["limit"] = s.limit;
    d["min_array_bytes"] = qkv::ArrayCache::kMinBytes;
    return d;
  });
  m.def("set_isa", [](const std::string& isa) {
    try {
      qkv::set_active_isa(isa);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });
  m.def("get_isa", [] { return std::string(active_kernels().isa); });
  m.def("supported_isas", &qkv::supported_isas);
  m.def("exp", [](const py::object& x_obj) {
    Arr x = as_f32(x_obj, "x", 1);
    py::array_t<float> y(x.shape[0]);
    if (x.shape[0] > 1 && x.strides[0] != 1) value_error("x must be contiguous");
    const auto& kt = active_kernels();
    float* yp = y.mutable_data();
    run_native([&] { kt.exp(x.ptr, yp, x.shape[0]); });
    return y;
  }, py::arg("x"), "exp of a contiguous float32 vector with the active ISA's polynomial (for tests)");
  m.def("fma_probe", [](double seconds) {
    // FMA throughput of the active ISA on all threads: GFLOP/s over ~seconds.
    const auto& kt = active_kernels();
    double gflops = 0.0;
    run_native([&] {
      const int nt = qkv::team_size(omp_get_max_threads());  // (a team: Note [fork])
      double total = 0.0;
      const double t0 = omp_get_wtime();
      const qkv::idx iters = 1 << 20;
#pragma omp parallel num_threads(nt) reduction(+ : total)
      {
        double flops = 0.0;
        while (omp_get_wtime() - t0 < seconds) flops += kt.fma_probe(iters);
        total += flops;
      }
      gflops = total / (omp_get_wtime() - t0) / 1e9;
    });
    return gflops;
  }, py::arg("seconds") = 0.2);
  m.def("stream_read", [](const py::object& x_obj) {
    // Sum of a contiguous float32 array, each thread summing one contiguous part: the
    // plain streaming read that memory-bound benchmark cases are measured against.
    Arr x = as_f32(x_obj, "x", 1);  // (as_f32 rejects a stride other than 1)
    const auto& kt = active_kernels();
    const idx n = x.shape[0];
    float sum = 0.0f;
    run_native([&] {
      const int nt = qkv::team_size(omp_get_max_threads());  // (a team: Note [fork])
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : sum)
      for (int t = 0; t < nt; ++t) {
        const idx lo = n * t / nt, hi = n * (t + 1) / nt;
        sum += kt.read_probe(x.ptr + lo, hi - lo);
      }
    });
    return sum;
  }, py::arg("x"));
}
