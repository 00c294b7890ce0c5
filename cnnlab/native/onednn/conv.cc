// oneDNN's 2-D float32 and bfloat16 convolutions as XLA FFI handlers (cnnlab/functional/
// onednn.py builds and registers them): the forward, the input gradient (backward-data) and the
// kernel gradient (backward-weights), in cnnlab's layouts: NHWC activations and HWIO kernels
// (buffers of any rank and element type are bound; the handlers check both). A call's
// operands and result share one element type; bfloat16 accumulates in float32 inside oneDNN
// (on AMX or AVX-512 BF16 where the CPU has them) and rounds the result to bfloat16.
//
// Activations stay NHWC (oneDNN's AVX-512 kernels take it directly, so no activation is
// reordered); the kernel is reordered per call from HWIO into the format oneDNN chose for the
// primitive ("any"), or from it into HWIO for the kernel gradient. Creating primitive
// descriptors costs far more than a small convolution, so each geometry's primitive, reorder
// and buffer sizes are built once and kept in a mutex-guarded map. Scratchpads are the
// caller's (oneDNN's "user" mode): a per-thread buffer, so calls on XLA's threads run
// concurrently without sharing one.
//
// Threads: oneDNN's own OpenMP team of all cores runs a call well alone, but XLA runs
// independent ops of a program side by side on its intra-op threads, and a team member that
// shares its core with such an op stalls the whole team at each barrier. So the forward and
// the input gradient split the batch into chunks that XLA's own intra-op threads and the
// calling thread take as they come free, each chunk a single-threaded oneDNN call: a busy
// thread delays nobody. The kernel gradient (a sum over the batch) keeps the OpenMP team.
// CNNLAB_ONEDNN_SPLIT=0 turns the split off (every call on the OpenMP team, as before).
//
// Attributes (int64 arrays of two, height then width): strides, padding_lo, padding_hi,
// dilation (XLA's: 1 = undilated; oneDNN counts the gaps, XLA's - 1).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

using Buffer = ffi::AnyBuffer;
using Result = ffi::Result<ffi::AnyBuffer>;
using Ints = ffi::Span<const int64_t>;

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// One convolution's geometry, in oneDNN's terms.
struct Geometry {
  int64_t n, ih, iw, ic, oh, ow, oc, kh, kw;
  int64_t sh, sw, plh, plw, prh, prw, dh, dw;  // dh, dw: oneDNN's dilation (XLA's - 1)
  memory::data_type type;                       // of every operand and the result

  std::string Key(Kind kind) const {
    const int64_t values[] = {kind, n,  ih,  iw,  ic,  oh,  ow, oc, kh, kw,
                              sh,   sw, plh, plw, prh, prw, dh, dw, static_cast<int64_t>(type)};
    return std::string(reinterpret_cast<const char*>(values), sizeof(values));
  }
  memory::desc Src() const { return memory::desc({n, ic, ih, iw}, type, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, oc, oh, ow}, type, Tag::nhwc); }
  memory::desc Weights(Tag tag) const { return memory::desc({oc, ic, kh, kw}, type, tag); }
  bool Empty() const { return n == 0 || ic == 0 || oc == 0 || oh == 0 || ow == 0; }
};

// A geometry's primitive, with the reorder between the user's HWIO kernel and the kernel
// format the primitive chose (when they differ).
struct Plan {
  dnnl::primitive primitive;
  memory::desc src, dst, user_weights, weights, scratch;
  bool reorder_weights = false;
  dnnl::reorder reorder;
  memory::desc reorder_scratch;
};

dnnl::engine& Engine() {
  static auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);  // never destroyed
  return *engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// A growing, 64-byte aligned per-thread buffer (scratchpads and reordered kernels).
struct Scratch {
  void* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 63) / 64 * 64;
      data = std::aligned_alloc(64, size);
      if (data == nullptr) {
        size = 0;
        throw std::bad_alloc();
      }
    }
    return data;
  }
};

Scratch& ThreadScratch(int i) {
  thread_local Scratch buffers[3];
  return buffers[i];
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// oneDNN 3 builds primitive descriptors directly; oneDNN 2 from an operation descriptor.
dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Src(), g.Weights(Tag::any), g.Dst(), {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw},
      {g.prh, g.prw}, UserScratchpad());
#else
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.Weights(Tag::any), g.Dst(), {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw},
      {g.prh, g.prw});
  return dnnl::convolution_forward::primitive_desc(desc, UserScratchpad(), Engine());
#endif
}

// OpenMP's thread-count controls, weak: present wherever oneDNN runs on OpenMP (libgomp comes
// with it); absent (null) under another oneDNN runtime, and then nothing is split.
extern "C" int omp_get_max_threads(void) __attribute__((weak));
extern "C" void omp_set_num_threads(int) __attribute__((weak));

bool SplitEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("CNNLAB_ONEDNN_SPLIT");
    return (v == nullptr || std::string(v) != "0") && omp_get_max_threads != nullptr &&
           omp_set_num_threads != nullptr;
  }();
  return enabled;
}

// While alive, oneDNN calls on this thread run on it alone (OpenMP's per-thread setting).
struct SingleThreaded {
  int previous;
  SingleThreaded() : previous(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(previous); }
};

std::shared_ptr<const Plan> MakePlan(const Geometry& g, Kind kind) {
  auto plan = std::make_shared<Plan>();
  plan->src = g.Src();
  plan->dst = g.Dst();
  plan->user_weights = g.Weights(Tag::hwio);
  dnnl::convolution_forward::primitive_desc fwd = ForwardPd(g);
  if (kind == kForward) {
    plan->weights = fwd.weights_desc();
    plan->scratch = fwd.scratchpad_desc();
    plan->primitive = dnnl::convolution_forward(fwd);
  } else if (kind == kInputGrad) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(Tag::any), g.Dst(),
        {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw}, {g.prh, g.prw}, fwd, UserScratchpad());
#else
    dnnl::convolution_backward_data::desc desc(
        dnnl::algorithm::convolution_direct, g.Src(), g.Weights(Tag::any), g.Dst(),
        {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw}, {g.prh, g.prw});
    dnnl::convolution_backward_data::primitive_desc pd(desc, UserScratchpad(), Engine(), fwd);
#endif
    plan->weights = pd.weights_desc();
    plan->scratch = pd.scratchpad_desc();
    plan->primitive = dnnl::convolution_backward_data(pd);
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(Tag::any), g.Dst(),
        {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw}, {g.prh, g.prw}, fwd, UserScratchpad());
#else
    dnnl::convolution_backward_weights::desc desc(
        dnnl::algorithm::convolution_direct, g.Src(), g.Weights(Tag::any), g.Dst(),
        {g.sh, g.sw}, {g.dh, g.dw}, {g.plh, g.plw}, {g.prh, g.prw});
    dnnl::convolution_backward_weights::primitive_desc pd(desc, UserScratchpad(), Engine(),
                                                          fwd);
#endif
    plan->weights = pd.diff_weights_desc();
    plan->scratch = pd.scratchpad_desc();
    plan->primitive = dnnl::convolution_backward_weights(pd);
  }
  plan->reorder_weights = plan->weights != plan->user_weights;
  if (plan->reorder_weights) {
    const bool to_user = kind == kKernelGrad;
    dnnl::reorder::primitive_desc pd(
        Engine(), to_user ? plan->weights : plan->user_weights, Engine(),
        to_user ? plan->user_weights : plan->weights, UserScratchpad());
    plan->reorder_scratch = pd.scratchpad_desc();
    plan->reorder = dnnl::reorder(pd);
  }
  return plan;
}

// A geometry's plan; `single`: for one thread (oneDNN fixes a primitive's thread count when
// it creates it, so a chunk's primitive is created on one thread).
std::shared_ptr<const Plan> GetPlan(const Geometry& g, Kind kind, bool single = false) {
  static auto* mu = new std::mutex;
  static auto* plans = new std::unordered_map<std::string, std::shared_ptr<const Plan>>;
  const std::string key = g.Key(kind) + (single ? "1" : "0");
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = plans->find(key);
    if (it != plans->end()) return it->second;
  }
  // Built outside the lock (it can take milliseconds); a concurrent builder's plan wins.
  std::shared_ptr<const Plan> plan;
  if (single) {
    SingleThreaded one;
    plan = MakePlan(g, kind);
  } else {
    plan = MakePlan(g, kind);
  }
  std::lock_guard<std::mutex> lock(*mu);
  return plans->emplace(key, std::move(plan)).first->second;
}

ffi::Error CheckAttrs(Ints strides, Ints lo, Ints hi, Ints dilation) {
  if (strides.size() != 2 || lo.size() != 2 || hi.size() != 2 || dilation.size() != 2) {
    return ffi::Error::InvalidArgument(
        "cnnlab oneDNN convolution: strides, padding_lo, padding_hi and dilation must each "
        "have two values");
  }
  for (int i = 0; i < 2; ++i) {
    if (strides[i] < 1 || dilation[i] < 1 || lo[i] < 0 || hi[i] < 0) {
      return ffi::Error::InvalidArgument(
          "cnnlab oneDNN convolution: strides and dilation must be positive, padding "
          "non-negative");
    }
  }
  return ffi::Error::Success();
}

// x: [N, H, W, C_in]; kernel: [KH, KW, C_in, C_out]; y: [N, Ho, Wo, C_out].
Geometry MakeGeometry(Buffer::Dimensions x, Buffer::Dimensions kernel,
                      Buffer::Dimensions y, Ints strides, Ints lo, Ints hi, Ints dilation,
                      memory::data_type type) {
  return Geometry{x[0],       x[1],       x[2],  x[3],  y[1],  y[2],
                  y[3],       kernel[0],  kernel[1],
                  strides[0], strides[1], lo[0], lo[1], hi[0], hi[1],
                  dilation[0] - 1, dilation[1] - 1, type};
}

// The oneDNN type of three buffers of one element type (float32 or bfloat16), else an error.
ffi::Error ElementType(ffi::DataType a, ffi::DataType b, ffi::DataType c,
                       memory::data_type* type) {
  if (a != b || a != c || (a != ffi::DataType::F32 && a != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument(
        "cnnlab oneDNN convolution: operands and result must all be float32 or all bfloat16");
  }
  *type = a == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  return ffi::Error::Success();
}

bool Rank4(Buffer::Dimensions a, Buffer::Dimensions b, Buffer::Dimensions c) {
  return a.size() == 4 && b.size() == 4 && c.size() == 4;
}

ffi::Error CheckShapes(const Geometry& g, Buffer::Dimensions kernel, Buffer::Dimensions y) {
  auto out = [](int64_t n, int64_t lo, int64_t hi, int64_t k, int64_t d, int64_t s) {
    return (n + lo + hi - (k - 1) * (d + 1) - 1) / s + 1;
  };
  if (kernel[2] != g.ic || kernel[3] != g.oc || y[0] != g.n ||
      (!g.Empty() && (out(g.ih, g.plh, g.prh, g.kh, g.dh, g.sh) != g.oh ||
                      out(g.iw, g.plw, g.prw, g.kw, g.dw, g.sw) != g.ow))) {
    return ffi::Error::InvalidArgument("cnnlab oneDNN convolution: inconsistent shapes");
  }
  return ffi::Error::Success();
}


// Chunks of a split call, claimed by whichever thread comes free; the caller waits only for
// chunks that another thread has claimed (and so is running). Shared by the tasks handed to
// XLA's pool, which may start after the call returned: then every chunk is claimed already
// and they touch nothing.
struct Chunks {
  explicit Chunks(int64_t count) : count(count) {}
  const int64_t count;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;               // guarded by mu
  std::string error;              // the first failure's message, guarded by mu
  std::function<void(int64_t)> body;

  // Runs chunks until none is left; returns when this thread has no more to claim.
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      std::string failure;
      try {
        SingleThreaded one;
        body(i);
      } catch (const std::exception& e) {
        failure = e.what();
      }
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.empty() && error.empty()) error = failure;
      if (++done == count) cv.notify_all();
    }
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done == count; });
  }
};

// Executes `plan`'s primitive on this thread's stream with `weights` in the primitive's own
// format (forward, input gradient) or as the buffer it writes (kernel gradient).
void Execute(const Plan& plan, Kind kind, void* src, const memory& weights, void* dst) {
  dnnl::engine& engine = Engine();
  dnnl::stream& stream = Stream();
  memory src_mem(plan.src, engine, src);
  memory dst_mem(plan.dst, engine, dst);
  memory scratch(plan.scratch, engine, ThreadScratch(0).Get(plan.scratch.get_size()));
  if (kind == kForward) {
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, src_mem},
                                    {DNNL_ARG_WEIGHTS, weights},
                                    {DNNL_ARG_DST, dst_mem},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == kInputGrad) {
    plan.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src_mem},
                                    {DNNL_ARG_WEIGHTS, weights},
                                    {DNNL_ARG_DIFF_DST, dst_mem},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, src_mem},
                                    {DNNL_ARG_DIFF_WEIGHTS, weights},
                                    {DNNL_ARG_DIFF_DST, dst_mem},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

// `plan`'s kernel reorder (HWIO into the primitive's format, or back for the kernel
// gradient), on this thread's stream.
void ReorderWeights(const Plan& plan, const memory& from, const memory& to) {
  memory scratch(plan.reorder_scratch, Engine(),
                 ThreadScratch(2).Get(plan.reorder_scratch.get_size()));
  dnnl::stream& stream = Stream();
  plan.reorder.execute(stream, {{DNNL_ARG_FROM, from},
                                {DNNL_ARG_TO, to},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
  stream.wait();
}

// The user's HWIO kernel as `plan`'s primitive takes it: reordered into this thread's buffer
// when the formats differ (for the kernel gradient, the buffer the primitive writes).
memory PrimitiveWeights(const Plan& plan, Kind kind, void* weights) {
  memory user_weights(plan.user_weights, Engine(), weights);
  if (!plan.reorder_weights) return user_weights;
  memory prim_weights(plan.weights, Engine(), ThreadScratch(1).Get(plan.weights.get_size()));
  if (kind != kKernelGrad) ReorderWeights(plan, user_weights, prim_weights);
  return prim_weights;
}

std::atomic<int64_t>& SplitCalls() {
  static std::atomic<int64_t> calls{0};
  return calls;
}

// How many equal batch chunks a forward or input gradient of batch `n` is split into for
// `threads` intra-op threads: two per thread where the batch divides so, else fewer; 1 (no
// split) for the kernel gradient, a batch of one, or no pool.
int64_t ChunkCount(Kind kind, int64_t n, int64_t threads) {
  if (kind == kKernelGrad || threads < 2 || !SplitEnabled()) return 1;
  for (int64_t c = std::min<int64_t>(2 * threads, n); c >= 2; --c) {
    if (n % c == 0) return c;
  }
  return 1;
}

// Runs `kind` on (src, weights, dst) given as user pointers (HWIO weights); the forward and
// the input gradient in batch chunks on XLA's intra-op threads where that applies.
void Run(const Geometry& g, Kind kind, void* src, void* weights, void* dst,
         ffi::ThreadPool& pool) {
  const int64_t threads = pool.num_threads();
  const int64_t chunks = ChunkCount(kind, g.n, threads);
  if (chunks == 1) {
    std::shared_ptr<const Plan> plan = GetPlan(g, kind);
    memory prim_weights = PrimitiveWeights(*plan, kind, weights);
    Execute(*plan, kind, src, prim_weights, dst);
    if (kind == kKernelGrad && plan->reorder_weights) {
      ReorderWeights(*plan, prim_weights, memory(plan->user_weights, Engine(), weights));
    }
    return;
  }
  SplitCalls().fetch_add(1, std::memory_order_relaxed);
  Geometry part = g;
  part.n = g.n / chunks;
  std::shared_ptr<const Plan> plan = GetPlan(part, kind, /*single=*/true);
  memory prim_weights = PrimitiveWeights(*plan, kind, weights);  // once, shared by the chunks
  const size_t bytes = memory::data_type_size(g.type);
  const size_t src_step = static_cast<size_t>(part.n * g.ih * g.iw * g.ic) * bytes;
  const size_t dst_step = static_cast<size_t>(part.n * g.oh * g.ow * g.oc) * bytes;
  auto work = std::make_shared<Chunks>(chunks);
  char* src_bytes = static_cast<char*>(src);
  char* dst_bytes = static_cast<char*>(dst);
  work->body = [&plan, kind, src_bytes, dst_bytes, src_step, dst_step, &prim_weights](int64_t i) {
    Execute(*plan, kind, src_bytes + i * src_step, prim_weights, dst_bytes + i * dst_step);
  };
  const int64_t helpers = std::min<int64_t>(threads, chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Work(); });
  }
  work->Work();
  work->Wait();
  if (!work->error.empty()) throw std::runtime_error(work->error);
}

// The three handlers' common part: checks, the empty case (zeros), then Run. `x`, `kernel`
// and `y` are the forward's shapes (for a gradient, one of them is the result's).
ffi::Error Convolve(Kind kind, ffi::DataType type_a, ffi::DataType type_b,
                    ffi::DataType type_out, Buffer::Dimensions x, Buffer::Dimensions kernel,
                    Buffer::Dimensions y, Ints strides, Ints lo, Ints hi, Ints dilation,
                    void* src, void* weights, void* dst, void* out, size_t out_bytes,
                    ffi::ThreadPool& pool) {
  if (ffi::Error error = CheckAttrs(strides, lo, hi, dilation); error.failure()) return error;
  memory::data_type type;
  if (ffi::Error error = ElementType(type_a, type_b, type_out, &type); error.failure()) {
    return error;
  }
  if (!Rank4(x, kernel, y)) {
    return ffi::Error::InvalidArgument("cnnlab oneDNN convolution: operands must be 4-D");
  }
  const Geometry g = MakeGeometry(x, kernel, y, strides, lo, hi, dilation, type);
  if (ffi::Error error = CheckShapes(g, kernel, y); error.failure()) return error;
  if (g.Empty() || g.kh == 0 || g.kw == 0) {
    std::memset(out, 0, out_bytes);
    return ffi::Error::Success();
  }
  try {
    Run(g, kind, src, weights, dst, pool);
  } catch (const std::exception& e) {  // dnnl::error is one
    return ffi::Error::Internal(std::string("cnnlab oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Buffer x, Buffer kernel, Result y, Ints strides,
                   Ints lo, Ints hi, Ints dilation) {
  return Convolve(kForward, x.element_type(), kernel.element_type(), y->element_type(),
                  x.dimensions(), kernel.dimensions(), y->dimensions(), strides, lo,
                  hi, dilation, x.untyped_data(), kernel.untyped_data(), y->untyped_data(),
                  y->untyped_data(), y->size_bytes(), pool);
}

ffi::Error InputGrad(ffi::ThreadPool pool, Buffer dy, Buffer kernel, Result dx, Ints strides,
                     Ints lo, Ints hi, Ints dilation) {
  return Convolve(kInputGrad, dy.element_type(), kernel.element_type(), dx->element_type(),
                  dx->dimensions(), kernel.dimensions(), dy.dimensions(), strides,
                  lo, hi, dilation, dx->untyped_data(), kernel.untyped_data(),
                  dy.untyped_data(), dx->untyped_data(), dx->size_bytes(), pool);
}

ffi::Error KernelGrad(ffi::ThreadPool pool, Buffer x, Buffer dy, Result dkernel, Ints strides,
                      Ints lo, Ints hi, Ints dilation) {
  return Convolve(kKernelGrad, x.element_type(), dy.element_type(), dkernel->element_type(),
                  x.dimensions(), dkernel->dimensions(), dy.dimensions(), strides,
                  lo, hi, dilation, x.untyped_data(), dkernel->untyped_data(),
                  dy.untyped_data(), dkernel->untyped_data(), dkernel->size_bytes(), pool);
}

}  // namespace

#define CNNLAB_CONV_ATTRS                        \
  .Attr<Ints>("strides")                         \
      .Attr<Ints>("padding_lo")                  \
      .Attr<Ints>("padding_hi")                  \
      .Attr<Ints>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnlab_onednn_conv_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // x [N, H, W, C_in]
                                  .Arg<Buffer>()  // kernel [KH, KW, C_in, C_out]
                                  .Ret<Buffer>()  // y [N, Ho, Wo, C_out]
                                  CNNLAB_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnlab_onednn_conv_input_grad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // dy [N, Ho, Wo, C_out]
                                  .Arg<Buffer>()  // kernel [KH, KW, C_in, C_out]
                                  .Ret<Buffer>()  // dx [N, H, W, C_in]
                                  CNNLAB_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnlab_onednn_conv_kernel_grad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()  // x [N, H, W, C_in]
                                  .Arg<Buffer>()  // dy [N, Ho, Wo, C_out]
                                  .Ret<Buffer>()  // dkernel [KH, KW, C_in, C_out]
                                  CNNLAB_CONV_ATTRS);

// 1 when oneDNN can create all three convolution primitives for `type` (0: float32, 1:
// bfloat16) on this CPU, under ONEDNN_MAX_CPU_ISA; 0 when any is refused (bfloat16 needs
// AVX-512 or AVX2 VNNI-2 in oneDNN 3.2: an AVX2-only CPU has none), -1 on another error.
extern "C" int cnnlab_onednn_supports_type(int bf16) {
  const memory::data_type type = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  // A small 3x3 convolution, strided and unstrided.
  for (int64_t s : {1, 2}) {
    const Geometry g{2, 8, 8, 16, 8 / s, 8 / s, 16, 3, 3, s, s, 1, 1, 1 - (s - 1), 1 - (s - 1),
                     0, 0, type};
    try {
      for (Kind kind : {kForward, kInputGrad, kKernelGrad}) MakePlan(g, kind);
    } catch (const dnnl::error&) {
      return 0;
    } catch (const std::exception&) {
      return -1;
    }
  }
  return 1;
}

// The oneDNN version the library runs with ("major.minor.patch"), for cnnlab's cache keys.
extern "C" const char* cnnlab_onednn_version() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}

// How many calls this process has run split in batch chunks (for tests and benchmarks).
extern "C" int64_t cnnlab_onednn_split_calls() { return SplitCalls().load(); }
