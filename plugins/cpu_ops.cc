// onnxruntime custom-op library: native float32 CPU kernels for the xLSTM cells.
//
//   xlstm.cpu::mLSTMStep(q, k, v, i, f, c0, n0, m0, eps) -> (h, c, n, m)     one decode step (S == 1)
//       q, k [B, NH, 1, DQK]  v [B, NH, 1, DV]  i, f [B, NH, 1]  c0 [B, NH, DQK, DV]  n0 [B, NH, DQK]
//       m0 [B, NH]  eps: one-element tensor;  h [B, NH, 1, DV], c, n, m like c0, n0, m0
//   xlstm.cpu::sLSTMScan(h0, c0, n0, m0, x, r) -> (h, c, n, m, y)            the whole time loop
//       h0, c0, n0, m0 [B, NH, DH]  x [B, NH, S, 4*DH] (W x + bias)  r [NH, DH, 4*DH]
//       h, c, n, m like h0;  y [B, NH, S, DH]
//   xlstm.cpu::PackedMatMul(x, w) -> y    attribute n (int): y = x W for a weight W [K, n]
//       x [..., K]  w [ceil(n / 32), K, 32]: W packed into column panels (cpu_gemm.h)  y [..., n]
//   xlstm.cpu::PackedMatMulAdd(x, w, r) -> y    the same plus r: y = x W + r, r like y or [n]
//   xlstm.cpu::PackedNormMatMul(x, w, g) -> y   float attributes eps, soft_cap too:
//       y = softcap(RMSNorm(x) W), RMSNorm(x) = x / sqrt(mean(x^2 over K) + eps) * g, g [K],
//       softcap(y) = soft_cap * tanh(y / soft_cap), or y where soft_cap <= 0; int attribute
//       round_bf16 = 1: RMSNorm(x) rounded to bfloat16 before the product (a bf16 export's Cast)
//   xlstm.cpu::PackedLnMatMul(x, w, g, beta) -> y  float attribute eps: y = LayerNorm(x) W,
//       LayerNorm(x) = (x - mean) / sqrt(var + eps) * g + beta over K, g, beta [K]
//   xlstm.cpu::PackedGluMatMulAdd(z, w, r) -> y   y = (act(z[..., :K]) * z[..., K:]) W + r, z [..., 2K],
//       act silu (gelu = 0) or the exact GELU (gelu = 1) a * 0.5 * (erf(a / gelu_div) + 1), gelu_div
//       (float) the graph's sqrt 2: float32's, or bfloat16's 1.4140625 in a bf16 export
//   xlstm.cpu::PackedMatMulBf16, PackedMatMulAddBf16, PackedNormMatMulBf16, PackedLnMatMulBf16,
//       PackedGluMatMulAddBf16: the same five with w a bfloat16 tensor in the same layout, each 32-column
//       row interleaved (columns j and 16 + j side by side: ort_native.interleave_bf16_rows); for a weight
//       whose float32 values are all bfloat16 values: the products are the same to the bit, from half the bytes
//   xlstm.cpu::BlockDiagMatMul(x, w) -> y    attribute n (int): each row of n values of x times a
//       block-diagonal matrix of square blocks of BLK = 1, 2, 4, 8 or 16 (cpu_gemm.h block_diag_row)
//       x [...] (n divides its size: M rows)  w [ceil(n / 16), BLK, 16] (packed)  y [M, n / BLK, BLK]
//   xlstm.cpu::mLSTMLayer(q, k, v, g, o, gate_bias, c0, n0, m0, ln_scale, ln_bias, weight) -> (y, c, n, m)
//       attributes eps, norm_eps, soft_cap (float), q_col, k_col, v_col, g_col, o_col, round_bf16 (int): a
//       7B-style mLSTM layer between its two products, any S, step by step (cpu_cells.h mlstm_layer_head);
//       round_bf16 = 1: the normed and weighted h rounded to bfloat16 before the output gate (a bf16 export's Cast)
//       q, k, v, g, o [B, S, *]: NH*DQK (q, k), NH*DV (v, o) or 2*NH (g: i gates, then f gates) columns
//       from column <x>_col on (they may all be one tensor: the fused product of the block's input)
//       gate_bias [2*NH]  c0, n0, m0 as for mLSTMStep  ln_scale, ln_bias [DV]  weight [NH*DV]
//       y [B, S, NH*DV]
//   xlstm.cpu::mLSTMPaperLayer(q, k, v, g, z, gate_bias, c0, n0, m0, ln_scale, ln_bias, weight, skip, xc)
//       -> (y, c, n, m)    a paper mLSTM block's layer between its q / k / v and gate products and its
//       down-projection: as mLSTMLayer with z (z_col) in place of o, but
//       y = ((LN(h) * ln_scale + ln_bias) * weight + skip * xc) * silu(z)   skip [NH*DV]  xc [B, S, NH*DV]
//       (round_bf16 = 1: the first product rounded to bfloat16)
//   xlstm.cpu::sLSTMPaperLayer(xc, x, w_if, w_zo, r, b, h0, c0, n0, m0, ln_scale, ln_bias, weight)
//       -> (y, h, c, n, m)    attributes norm_eps (float), round_bf16 (int): a paper sLSTM block's
//       layer between its convolution and its residual, any S, step by step (cpu_cells.h
//       slstm_layer_head): per head, the gates [xc W_if | x W_zo] + b, the cell, the head's LayerNorm
//       and its weight (y rounded to bfloat16 where round_bf16 = 1)
//       xc, x [B, S, NH*DH]  w_if, w_zo [NH, DH, 2*DH]  r [NH, DH, 4*DH]  b [NH, 4*DH]
//       h0, c0, n0, m0 [B, NH, DH]  ln_scale, ln_bias [DH]  weight [NH*DH];  y like x, h, c, n, m like h0
//   xlstm.cpu::CausalConv(x, past, w, bias) -> (y, present)    attribute silu (int, 0 or 1): a paper
//       block's depthwise causal convolution over time with its state, any S (cpu_cells.h
//       causal_conv_sequence), then silu(y) = y sigmoid(y) where silu is 1; round_bf16 (int) = 1:
//       past's values rounded to bfloat16 as read (a bf16 export's state)
//       x [B, S, D]  past [B, K-1, D]  w [K, D]  bias [D];  y like x, present like past
//
// The signatures (inputs, outputs and attributes by name) are xlstm_export/native_ops.py's table,
// written again in make_ops below and checked equal by tests/test_ort_native.py.
// xlstm_export/ort_native.py puts these nodes inside the exported models' xlstm function bodies and
// registers this library (onnxruntime calls RegisterCustomOps on load); it also swaps the float32
// weight MatMuls of the main graph for PackedMatMul, packing their weights as it does, and each
// 7B-style mLSTM layer (~25 nodes of the main graph around its xlstm::mLSTM node) for one
// mLSTMLayer (each paper one for one mLSTMPaperLayer), each paper sLSTM layer (~15 nodes around
// its xlstm::sLSTM node) for one sLSTMPaperLayer, and each paper block's convolution (~16 nodes:
// Concat, Slices, Muls, Adds, the SiLU) for one CausalConv. Everything is
// float32 (the bodies cast before calling) but the weights of the ...Bf16 products, whose float32
// values were all bfloat16 values. The mLSTM cells split their work over (batch, head), the sLSTM
// ones over (head, a block of up to 8 batch rows), the matrix product over column panels, on
// onnxruntime's intra-op thread pool when there is enough of it to pay for the hand-off.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_cells.h"
#include "cpu_gemm.h"
#include "ort_op.h"

namespace {

// ---------------------------------------------------------------------------------------------
// Tensor access through the C API (every call's status is checked and passed on)
// ---------------------------------------------------------------------------------------------

constexpr int kMaxAttributes = 6;  // of each type
constexpr int kMaxTensors = 16;    // inputs or outputs of one op

// One op's signature: the same table as xlstm_export/native_ops.py (tests/test_ort_native.py
// compares the two through XlstmCpuOpSignatures below). Kernels read inputs, outputs and
// attributes by these names (Ctx), never by position. Every tensor is float32 but the bf16_inputs.
// Name lists are nullptr-terminated.
struct Signature {
  const char* inputs[kMaxTensors + 1];
  const char* outputs[kMaxTensors + 1];
  const char* int_attributes[kMaxAttributes + 1];    // required
  const char* float_attributes[kMaxAttributes + 1];  // required
  const char* bf16_inputs[kMaxTensors + 1];           // inputs of type bfloat16 (the others: float)
};

size_t count(const char* const* names) {
  size_t n = 0;
  while (names[n] != nullptr) ++n;
  return n;
}

// Where `name` stands in `names`, or -1.
long position(const char* const* names, const char* name) {
  for (size_t j = 0; names[j]; ++j)
    if (std::strcmp(names[j], name) == 0) return static_cast<long>(j);
  return -1;
}

// When a kernel splits its work over onnxruntime's intra-op pool. A hand-off is cheap when the
// pool's workers spin between runs (onnxruntime's default) and costs a wake-up of a sleeping thread
// when they do not (session.intra_op.allow_spinning = 0, what the server sets, since the HTTP layer
// needs the cores between decode steps). On the 2-core bench VM that wake-up varies with the host's
// load, from a few microseconds to ~35 us per parallel region: tiny-large's B = 1 decode step then
// took 0.131 ms on two sleeping threads against 0.057 ms on one (bench/RESULTS.md). RegisterCustomOps
// reads the setting and gives the session's kernels the thresholds of its pool.
struct SplitThresholds {
  int64_t cell_work;     // (batch, head) tasks of a cell, and rows of a prologue: their multiply-adds
  int64_t matmul_bytes;  // a product whose weight is this large (streamed from memory or L3) ...
  int64_t matmul_work;   // ... or whose multiply-adds are this many (~40 us on one core at 1 << 21)
};
// Spinning workers: a split pays from a few microseconds of work on. (Weight products of the bench
// models alone, 2 threads: at 1 MiB the 4M-parameter model's took 0.33 / 0.78 ms at B = 1 / 8, at
// 256 KiB 0.26 / 0.56, at 64 KiB 0.27 / 0.59.)
constexpr SplitThresholds kSpinningPool{1 << 16, 256 << 10, 1 << 21};
// Sleeping workers: from ~150 us on, a few wake-ups' worth (measured on the bench models: 160M's
// products all still split, tiny-large's decode products none). A product of small weights splits
// only from ~0.5 ms of work: a server's grouped prefill products (tiny-large, 3-8 prompts of 32) are
// computed under load, when the other cores serve HTTP, and their splits cost more than they saved
// (bench/serve.py at 32 streams: 33.2 -> 32.1 us of CPU per generated token, 9 runs each, alternated).
constexpr SplitThresholds kSleepingPool{1 << 18, 1 << 20, 1 << 26};

struct Ctx {
  const OrtApi* api;
  OrtKernelContext* context;
  const SplitThresholds* split;  // the session's pool's
  const char* op;         // for error messages
  const Signature* sig;   // names of the inputs, outputs and attributes
  const int64_t* ints;    // the int attributes' values, in sig->int_attributes order
  const float* floats;    // the float attributes' values, in sig->float_attributes order

  // The attribute `name` (a programming error if the op has none: 0 and a message on stderr).
  int64_t attr_int(const char* name) const {
    const long j = position(sig->int_attributes, name);
    if (j < 0) std::fprintf(stderr, "xlstm.cpu::%s has no int attribute %s\n", op, name);
    return j < 0 ? 0 : ints[j];
  }
  float attr_float(const char* name) const {
    const long j = position(sig->float_attributes, name);
    if (j < 0) std::fprintf(stderr, "xlstm.cpu::%s has no float attribute %s\n", op, name);
    return j < 0 ? 0.0f : floats[j];
  }

  OrtStatus* error(const char* fmt, long a = 0, long b = 0, long c = 0) const {
    char msg[512];
    int n = std::snprintf(msg, sizeof msg, "xlstm.cpu::%s: ", op);
    std::snprintf(msg + n, sizeof msg - n, fmt, a, b, c);
    return ort::error(api, msg);
  }

  // Input `name`: its data (T: float, or uint16_t for a bfloat16 input's bits) and dims.
  template <class T>
  OrtStatus* input(const char* name, const T** data, std::vector<int64_t>* dims) const {
    using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
    const long index = position(sig->inputs, name);
    if (index < 0) return error(("no input named " + std::string(name) + " (a bug in the kernel)").c_str());
    const OrtValue* value = nullptr;
    if (OrtStatus* s = ort::fn<GetInput>(api, ort::kKernelContextGetInput)(context, index, &value)) return s;
    if (value == nullptr) return error("input %ld is missing", index);
    if (OrtStatus* s = ort::tensor_dims(api, value, dims)) return s;
    void* p = nullptr;
    if (OrtStatus* s = ort::tensor_data(api, value, &p)) return s;
    *data = static_cast<const T*>(p);
    return nullptr;
  }

  // Output `name`, allocated by onnxruntime with `dims`.
  OrtStatus* output(const char* name, const std::vector<int64_t>& dims, float** data) const {
    using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    const long index = position(sig->outputs, name);
    if (index < 0) return error(("no output named " + std::string(name) + " (a bug in the kernel)").c_str());
    OrtValue* value = nullptr;
    if (OrtStatus* s = ort::fn<GetOutput>(api, ort::kKernelContextGetOutput)(context, index, dims.data(),
                                                                              dims.size(), &value))
      return s;
    void* p = nullptr;
    if (OrtStatus* s = ort::tensor_data(api, value, &p)) return s;
    *data = static_cast<float*>(p);
    return nullptr;
  }

  // fn(data, index) for index in [0, total): on the session's intra-op pool when `parallel`, which
  // groups the indices into `batches` contiguous batches (0: as it sees fit).
  OrtStatus* for_each(size_t total, bool parallel, void (*body)(void*, size_t), void* data,
                      size_t batches = 0) const {
    if (!parallel || total < 2) {
      for (size_t t = 0; t < total; ++t) body(data, t);
      return nullptr;
    }
    using ParallelFor = OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
    return ort::fn<ParallelFor>(api, ort::kKernelContextParallelFor)(context, body, total, batches, data);
  }
};

bool same(const std::vector<int64_t>& a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// ---------------------------------------------------------------------------------------------
// mLSTMStep
// ---------------------------------------------------------------------------------------------

struct MlstmStepArgs {
  const float *q, *k, *v, *c0, *n0;
  const float *i_act, *f_act, *floor;  // [B * NH] (xlstm_cpu::mlstm_gates)
  float *h, *c, *n;
  int64_t dqk, dv;
  float eps;
};

void mlstm_step_task(void* data, size_t bh) {
  const auto& a = *static_cast<const MlstmStepArgs*>(data);
  const int64_t mat = a.dqk * a.dv;
  xlstm_cpu::mlstm_update_head(a.q + bh * a.dqk, a.k + bh * a.dqk, a.v + bh * a.dv, a.f_act[bh], a.i_act[bh],
                               a.floor[bh], a.c0 + bh * mat, a.n0 + bh * a.dqk, static_cast<int>(a.dqk),
                               static_cast<int>(a.dv), a.eps, a.h + bh * a.dv, a.c + bh * mat, a.n + bh * a.dqk);
}

OrtStatus* mlstm_step_compute(const Ctx& ctx) {
  MlstmStepArgs a{};
  std::vector<int64_t> q, k, v, i, f, c0, n0, m0, eps;
  const float *eps_data = nullptr, *i_pre = nullptr, *f_pre = nullptr, *m0_data = nullptr;
  for (auto [name, data, dims] : {std::tuple{"q", &a.q, &q}, {"k", &a.k, &k}, {"v", &a.v, &v}, {"i", &i_pre, &i},
                                  {"f", &f_pre, &f}, {"c0", &a.c0, &c0}, {"n0", &a.n0, &n0}, {"m0", &m0_data, &m0},
                                  {"eps", &eps_data, &eps}}) {
    if (OrtStatus* s = ctx.input(name, data, dims)) return s;
  }
  if (q.size() != 4 || q[2] != 1)
    return ctx.error("q must be [B, NH, 1, DQK] (one decode step), got rank %ld with S = %ld",
                     static_cast<long>(q.size()), q.size() == 4 ? static_cast<long>(q[2]) : -1L);
  const int64_t B = q[0], NH = q[1], DQK = q[3];
  if (v.size() != 4) return ctx.error("v must be [B, NH, 1, DV], got rank %ld", static_cast<long>(v.size()));
  const int64_t DV = v[3];
  if (!same(k, {B, NH, 1, DQK}) || !same(v, {B, NH, 1, DV}) || !same(i, {B, NH, 1}) || !same(f, {B, NH, 1}) ||
      !same(c0, {B, NH, DQK, DV}) || !same(n0, {B, NH, DQK}) || !same(m0, {B, NH}))
    return ctx.error("inputs disagree with q [%ld, %ld, 1, DQK] / v [.., DV]: expected k like q, i and f "
                     "[B, NH, 1], c0 [B, NH, DQK, DV], n0 [B, NH, DQK], m0 [B, NH]",
                     static_cast<long>(B), static_cast<long>(NH));
  int64_t eps_count = 1;
  for (int64_t d : eps) eps_count *= d;
  if (eps_count != 1) return ctx.error("eps must hold one value, got %ld", static_cast<long>(eps_count));
  a.eps = eps_data[0];
  a.dqk = DQK;
  a.dv = DV;
  float* m = nullptr;
  for (auto [name, data, dims] : {std::tuple{"h", &a.h, std::vector<int64_t>{B, NH, 1, DV}},
                                  {"c", &a.c, std::vector<int64_t>{B, NH, DQK, DV}},
                                  {"n", &a.n, std::vector<int64_t>{B, NH, DQK}},
                                  {"m", &m, std::vector<int64_t>{B, NH}}}) {
    if (OrtStatus* s = ctx.output(name, dims, data)) return s;
  }
  // the gates of all B * NH heads first, in vectors; then each head's matrix memory
  std::vector<float> gates(3 * B * NH);
  float *i_act = gates.data(), *f_act = i_act + B * NH, *floor = f_act + B * NH;
  std::memcpy(i_act, i_pre, sizeof(float) * B * NH);
  std::memcpy(f_act, f_pre, sizeof(float) * B * NH);
  xlstm_cpu::mlstm_gates(i_act, f_act, floor, m0_data, m, B, 1, NH, 0.0f);
  a.i_act = i_act;
  a.f_act = f_act;
  a.floor = floor;
  return ctx.for_each(static_cast<size_t>(B * NH), B * NH * DQK * DV >= ctx.split->cell_work, mlstm_step_task, &a);
}

// ---------------------------------------------------------------------------------------------
// sLSTMScan
// ---------------------------------------------------------------------------------------------

struct SlstmScanArgs {
  const float *x, *r;
  float *h, *c, *n, *m, *y;
  int64_t batch, nh, s, dh;
};

// The sLSTM kernels' tasks: (head, a block of up to kSlstmRows batch rows), head-major, so that the
// rows of a block share each load of the head's weights and one thread's blocks share a head
// (xlstm-125m's recurrent weights are 576 KiB a head, 1.1 MiB with the paper layer's gate weights).
constexpr int64_t kSlstmRows = 8;

struct SlstmTask {
  int64_t head, b0, rows;
};

SlstmTask slstm_task(size_t j, int64_t batch) {
  const int64_t blocks = (batch + kSlstmRows - 1) / kSlstmRows;
  const int64_t head = static_cast<int64_t>(j) / blocks, b0 = static_cast<int64_t>(j) % blocks * kSlstmRows;
  return {head, b0, std::min(kSlstmRows, batch - b0)};
}

size_t slstm_tasks(int64_t batch, int64_t nh) {
  return static_cast<size_t>(nh * ((batch + kSlstmRows - 1) / kSlstmRows));
}

void slstm_scan_task(void* data, size_t j) {
  const auto& a = *static_cast<const SlstmScanArgs*>(data);
  const SlstmTask task = slstm_task(j, a.batch);
  const int64_t first = task.b0 * a.nh + task.head;  // (b0, head) in [B, NH]
  std::vector<float> pre(static_cast<size_t>(task.rows * 4 * a.dh));
  xlstm_cpu::SlstmRows rows{};
  rows.x = a.x + first * a.s * 4 * a.dh;
  rows.r = a.r + task.head * a.dh * 4 * a.dh;
  rows.x_row = a.nh * a.s * 4 * a.dh;
  rows.x_step = 4 * a.dh;
  rows.h = a.h + first * a.dh;
  rows.c = a.c + first * a.dh;
  rows.n = a.n + first * a.dh;
  rows.m = a.m + first * a.dh;
  rows.state_row = a.nh * a.dh;
  rows.y = a.y + first * a.s * a.dh;
  rows.y_row = a.nh * a.s * a.dh;
  rows.y_step = a.dh;
  rows.pre = pre.data();
  xlstm_cpu::slstm_scan_rows(rows, static_cast<int>(task.rows), static_cast<int>(a.s), static_cast<int>(a.dh));
}

// The sLSTM kernels' state outputs h, c, n, m (shape [B, NH, DH], in that order: each output's
// pointer with its initial state), filled with those; the kernels update them in place step by step.
OrtStatus* slstm_state_outputs(const Ctx& ctx, const std::vector<int64_t>& shape,
                               std::initializer_list<std::pair<float**, const float*>> states) {
  const char* names[4] = {"h", "c", "n", "m"};
  int j = 0;
  for (auto [out, init] : states) {
    if (OrtStatus* s = ctx.output(names[j++], shape, out)) return s;
    std::memcpy(*out, init, sizeof(float) * shape[0] * shape[1] * shape[2]);
  }
  return nullptr;
}

OrtStatus* slstm_scan_compute(const Ctx& ctx) {
  const float *h0_data, *c0_data, *n0_data, *m0_data;
  SlstmScanArgs a{};
  std::vector<int64_t> h0, c0, n0, m0, x, r;
  for (auto [name, data, dims] : {std::tuple{"h0", &h0_data, &h0}, {"c0", &c0_data, &c0}, {"n0", &n0_data, &n0},
                                  {"m0", &m0_data, &m0}, {"x", &a.x, &x}, {"r", &a.r, &r}}) {
    if (OrtStatus* s = ctx.input(name, data, dims)) return s;
  }
  if (x.size() != 4 || x[3] % 4 != 0)
    return ctx.error("x must be [B, NH, S, 4*DH], got rank %ld", static_cast<long>(x.size()));
  const int64_t B = x[0], NH = x[1], S = x[2], DH = x[3] / 4;
  if (!same(r, {NH, DH, 4 * DH}) || !same(h0, {B, NH, DH}) || !same(c0, {B, NH, DH}) ||
      !same(n0, {B, NH, DH}) || !same(m0, {B, NH, DH}))
    return ctx.error("inputs disagree with x [%ld, %ld, S, 4*%ld]: expected r [NH, DH, 4*DH] and "
                     "h0, c0, n0, m0 [B, NH, DH]", static_cast<long>(B), static_cast<long>(NH),
                     static_cast<long>(DH));
  a.batch = B;
  a.nh = NH;
  a.s = S;
  a.dh = DH;
  if (OrtStatus* s = slstm_state_outputs(ctx, {B, NH, DH},
                                         {{&a.h, h0_data}, {&a.c, c0_data}, {&a.n, n0_data}, {&a.m, m0_data}}))
    return s;
  if (OrtStatus* s = ctx.output("y", {B, NH, S, DH}, &a.y)) return s;
  return ctx.for_each(slstm_tasks(B, NH), B * NH * S * DH * 4 * DH >= ctx.split->cell_work, slstm_scan_task, &a);
}

// ---------------------------------------------------------------------------------------------
// sLSTMPaperLayer
// ---------------------------------------------------------------------------------------------

struct SlstmLayerArgs {
  const float *xc, *x, *w_if, *w_zo, *r, *b, *ln_scale, *ln_bias, *weight;
  float *y, *h, *c, *n, *m;
  int64_t batch, nh, s, dh;
  float norm_eps;
  bool bf16;  // round_bf16
};

void slstm_layer_task(void* data, size_t j) {
  const auto& a = *static_cast<const SlstmLayerArgs*>(data);
  const SlstmTask task = slstm_task(j, a.batch);
  const int64_t e = a.nh * a.dh;  // the block's width
  std::vector<float> scratch(static_cast<size_t>(task.rows * (a.s * 5 + 4) * a.dh));
  xlstm_cpu::SlstmLayerHead l{};
  l.xc = a.xc + task.b0 * a.s * e + task.head * a.dh;
  l.x = a.x + task.b0 * a.s * e + task.head * a.dh;
  l.x_stride = e;
  l.w_if = a.w_if + task.head * a.dh * 2 * a.dh;
  l.w_zo = a.w_zo + task.head * a.dh * 2 * a.dh;
  l.bias = a.b + task.head * 4 * a.dh;
  l.r = a.r + task.head * a.dh * 4 * a.dh;
  l.ln_scale = a.ln_scale;
  l.ln_bias = a.ln_bias;
  l.weight = a.weight + task.head * a.dh;
  l.norm_eps = a.norm_eps;
  l.bf16 = a.bf16;
  const int64_t first = task.b0 * a.nh + task.head;  // (b0, head) in [B, NH]
  l.h = a.h + first * a.dh;
  l.c = a.c + first * a.dh;
  l.n = a.n + first * a.dh;
  l.m = a.m + first * a.dh;
  l.state_row = e;
  l.y = a.y + task.b0 * a.s * e + task.head * a.dh;
  l.y_stride = e;
  l.scratch = scratch.data();
  xlstm_cpu::slstm_layer_head(l, static_cast<int>(task.rows), static_cast<int>(a.s), static_cast<int>(a.dh));
}

OrtStatus* slstm_paper_layer_compute(const Ctx& ctx) {
  SlstmLayerArgs a{};
  const float *h0_data, *c0_data, *n0_data, *m0_data;
  std::vector<int64_t> xc, x, w_if, w_zo, r, b, h0, c0, n0, m0, ls, lb, w;
  for (auto [name, data, dims] : {std::tuple{"xc", &a.xc, &xc}, {"x", &a.x, &x}, {"w_if", &a.w_if, &w_if},
                                  {"w_zo", &a.w_zo, &w_zo}, {"r", &a.r, &r}, {"b", &a.b, &b},
                                  {"h0", &h0_data, &h0}, {"c0", &c0_data, &c0}, {"n0", &n0_data, &n0},
                                  {"m0", &m0_data, &m0}, {"ln_scale", &a.ln_scale, &ls},
                                  {"ln_bias", &a.ln_bias, &lb}, {"weight", &a.weight, &w}}) {
    if (OrtStatus* s = ctx.input(name, data, dims)) return s;
  }
  if (r.size() != 3 || x.size() != 3)
    return ctx.error("r must be [NH, DH, 4*DH] and x [B, S, NH*DH], got ranks %ld and %ld",
                     static_cast<long>(r.size()), static_cast<long>(x.size()));
  const int64_t NH = r[0], DH = r[1], B = x[0], S = x[1];
  if (!same(r, {NH, DH, 4 * DH}) || !same(x, {B, S, NH * DH}) || !same(xc, {B, S, NH * DH}) ||
      !same(w_if, {NH, DH, 2 * DH}) || !same(w_zo, {NH, DH, 2 * DH}) || !same(b, {NH, 4 * DH}) ||
      !same(h0, {B, NH, DH}) || !same(c0, {B, NH, DH}) || !same(n0, {B, NH, DH}) || !same(m0, {B, NH, DH}) ||
      !same(ls, {DH}) || !same(lb, {DH}) || !same(w, {NH * DH}))
    return ctx.error("inputs disagree with r [NH=%ld, DH=%ld, 4*DH] and x [B=%ld, S, NH*DH]: expected xc "
                     "like x, w_if, w_zo [NH, DH, 2*DH], b [NH, 4*DH], h0, c0, n0, m0 [B, NH, DH], ln_scale, "
                     "ln_bias [DH], weight [NH*DH]", static_cast<long>(NH), static_cast<long>(DH),
                     static_cast<long>(B));
  a.batch = B;
  a.nh = NH;
  a.s = S;
  a.dh = DH;
  a.norm_eps = ctx.attr_float("norm_eps");
  a.bf16 = ctx.attr_int("round_bf16") != 0;
  if (OrtStatus* s = ctx.output("y", {B, S, NH * DH}, &a.y)) return s;
  if (OrtStatus* s = slstm_state_outputs(ctx, {B, NH, DH},
                                         {{&a.h, h0_data}, {&a.c, c0_data}, {&a.n, n0_data}, {&a.m, m0_data}}))
    return s;
  return ctx.for_each(slstm_tasks(B, NH), B * NH * S * DH * 8 * DH >= ctx.split->cell_work, slstm_layer_task, &a);
}

// ---------------------------------------------------------------------------------------------
// mLSTMLayer
// ---------------------------------------------------------------------------------------------

struct MlstmLayerArgs {
  const float* in[5];  // q, k, v, g, o (the paper layer: z): rows of [B, S, width[j]], read from column col[j]
  int64_t width[5], col[5];
  const float *gate_bias, *c0, *n0, *m0, *ln_scale, *ln_bias, *weight;
  const float *skip, *xc;  // the paper layer's [NH*DV] and [B, S, NH*DV], or nullptr
  const float *i_act, *f_act, *floor;  // [B, S, NH] (xlstm_cpu::mlstm_gates)
  float *y, *c, *n, *m;
  int64_t nh, s, dqk, dv;
  int64_t heads_per_task;  // NH or 1 (mlstm_small_heads): a task is one batch row's heads [j g, (j + 1) g)
  float eps, norm_eps, cap;
  bool bf16;  // round_bf16
};

// Small heads (a matrix memory of at most 64 x 64): a step of one is a short chain of dependent
// operations on a state that stays in L1, and the core overlaps those of several heads run side by
// side (xlstm_cpu::mlstm_layer_heads), so a task that runs on one thread takes all of a batch row's
// small heads; tasks split over threads take one head each (as many tasks as there can be).
// The smallest heads (at most 32 x 32, ~50 ns a step) are split over threads only from 8x the
// work of other cells: below it one thread finishes sooner than a sleeping worker wakes and takes
// its share (tiny-large, 16 x 32: its prefill chunks of 4 / 8 prompts of 32 tokens took 0.90-0.97 /
// 1.68-1.73 ms split over two sleeping workers, 0.77 / 1.49-1.54 ms on one thread; in the server at
// 32 streams 7.1-7.3 -> 6.7-7.0 us per prompt token). Heads of 64 x 64 (the paper preset's) keep
// the usual threshold: its B = 32 decode step took 580-590 us split, 610-650 on one thread.
bool mlstm_small_heads(int64_t dqk, int64_t dv) { return dqk * dv <= 64 * 64; }
int64_t mlstm_split_factor(int64_t dqk, int64_t dv) { return dqk * dv <= 32 * 32 ? 8 : 1; }

void mlstm_layer_task(void* data, size_t task) {
  const auto& a = *static_cast<const MlstmLayerArgs*>(data);
  const int64_t groups = a.nh / a.heads_per_task;
  const int64_t b = static_cast<int64_t>(task) / groups;
  const int64_t first = static_cast<int64_t>(task) % groups * a.heads_per_task;
  const int64_t g = a.heads_per_task;
  const int64_t mat = a.dqk * a.dv;
  // scratch h [dv] per head: on the stack up to 2048 floats (four 7B heads, or 32 heads of 64)
  float h_stack[2048];
  std::vector<float> h_heap(g * a.dv > 2048 ? static_cast<size_t>(g * a.dv) : 0);
  float* h_all = g * a.dv > 2048 ? h_heap.data() : h_stack;
  xlstm_cpu::MlstmLayerHead heads[16] = {};
  std::vector<xlstm_cpu::MlstmLayerHead> heads_heap(g > 16 ? static_cast<size_t>(g) : 0);
  xlstm_cpu::MlstmLayerHead* ls = g > 16 ? heads_heap.data() : heads;
  for (int64_t j = 0; j < g; ++j) {
    const int64_t head = first + j, bh = b * a.nh + head;
    // input i at (b, t = 0), at this head's first column (heads are contiguous column ranges; g, the
    // gate pre-activations, went through mlstm_gates)
    const int64_t head_cols[5] = {head * a.dqk, head * a.dqk, head * a.dv, head, head * a.dv};
    const float* at[5];
    for (int i = 0; i < 5; ++i) at[i] = a.in[i] + b * a.s * a.width[i] + a.col[i] + head_cols[i];
    const int64_t act = b * a.s * a.nh + head;  // (b, t = 0, head) in the gates' [B, S, NH]
    xlstm_cpu::MlstmLayerHead& l = ls[j];
    l = xlstm_cpu::MlstmLayerHead{};
    l.q = at[0];
    l.k = at[1];
    l.v = at[2];
    l.o = at[4];
    l.i_act = a.i_act + act;
    l.f_act = a.f_act + act;
    l.floor = a.floor + act;
    l.q_stride = a.width[0];
    l.k_stride = a.width[1];
    l.v_stride = a.width[2];
    l.o_stride = a.width[4];
    l.act_stride = a.nh;
    l.y_stride = a.nh * a.dv;
    l.eps = a.eps;
    l.norm_eps = a.norm_eps;
    l.ln_scale = a.ln_scale;
    l.ln_bias = a.ln_bias;
    l.weight = a.weight + head * a.dv;
    if (a.skip != nullptr) {
      l.skip = a.skip + head * a.dv;
      l.xc = a.xc + b * a.s * a.nh * a.dv + head * a.dv;
      l.xc_stride = a.nh * a.dv;
    }
    l.c0 = a.c0 + bh * mat;
    l.n0 = a.n0 + bh * a.dqk;
    l.c = a.c + bh * mat;
    l.n = a.n + bh * a.dqk;
    l.y = a.y + b * a.s * a.nh * a.dv + head * a.dv;
    l.h = h_all + j * a.dv;
    l.bf16 = a.bf16;
  }
  xlstm_cpu::mlstm_layer_heads(ls, static_cast<int>(g), static_cast<int>(a.s), static_cast<int>(a.dqk),
                               static_cast<int>(a.dv));
}

// mLSTMLayer, or mLSTMPaperLayer where `paper`.
OrtStatus* mlstm_layer(const Ctx& ctx, bool paper) {
  MlstmLayerArgs a{};
  std::vector<int64_t> dims[5], gb, c0, n0, m0, ls, lb, w, skip, xc;
  const char* in_names[5] = {"q", "k", "v", "g", paper ? "z" : "o"};  // MlstmLayerArgs::in order
  const char* col_names[5] = {"q_col", "k_col", "v_col", "g_col", paper ? "z_col" : "o_col"};
  for (int j = 0; j < 5; ++j) {
    if (OrtStatus* s = ctx.input(in_names[j], &a.in[j], &dims[j])) return s;
  }
  for (auto [name, data, shape] : {std::tuple{"gate_bias", &a.gate_bias, &gb}, {"c0", &a.c0, &c0},
                                   {"n0", &a.n0, &n0}, {"m0", &a.m0, &m0}, {"ln_scale", &a.ln_scale, &ls},
                                   {"ln_bias", &a.ln_bias, &lb}, {"weight", &a.weight, &w}}) {
    if (OrtStatus* s = ctx.input(name, data, shape)) return s;
  }
  if (c0.size() != 4 || dims[0].size() != 3)
    return ctx.error("c0 must be [B, NH, DQK, DV] and q [B, S, *], got ranks %ld and %ld",
                     static_cast<long>(c0.size()), static_cast<long>(dims[0].size()));
  const int64_t B = c0[0], NH = c0[1], DQK = c0[2], DV = c0[3], S = dims[0][1];
  const int64_t need[5] = {NH * DQK, NH * DQK, NH * DV, 2 * NH, NH * DV};  // columns each input provides
  bool ok = same(gb, {2 * NH}) && same(n0, {B, NH, DQK}) && same(m0, {B, NH}) && same(ls, {DV}) &&
            same(lb, {DV}) && same(w, {NH * DV});
  for (int j = 0; j < 5; ++j) {
    a.col[j] = ctx.attr_int(col_names[j]);
    ok = ok && dims[j].size() == 3 && dims[j][0] == B && dims[j][1] == S && a.col[j] >= 0 &&
         a.col[j] + need[j] <= dims[j][2];
    a.width[j] = dims[j].size() == 3 ? dims[j][2] : 0;
  }
  if (!ok)
    return ctx.error("inputs disagree with c0 [B=%ld, NH=%ld, DQK, DV] (B=%ld rows in q): expected q, k "
                     "[B, S, *] with NH*DQK columns from q_col / k_col, v, o NH*DV columns, g 2*NH, "
                     "gate_bias [2*NH], n0 [B, NH, DQK], m0 [B, NH], ln_scale, ln_bias [DV], weight [NH*DV]",
                     static_cast<long>(B), static_cast<long>(NH), static_cast<long>(dims[0][0]));
  if (paper) {
    if (OrtStatus* s = ctx.input("skip", &a.skip, &skip)) return s;
    if (OrtStatus* s = ctx.input("xc", &a.xc, &xc)) return s;
    if (!same(skip, {NH * DV}) || !same(xc, {B, S, NH * DV}))
      return ctx.error("skip must be [NH*DV] = [%ld] and xc [B, S, NH*DV] = [%ld, %ld, NH*DV]",
                       static_cast<long>(NH * DV), static_cast<long>(B), static_cast<long>(S));
  }
  a.nh = NH;
  a.s = S;
  a.dqk = DQK;
  a.dv = DV;
  a.eps = ctx.attr_float("eps");
  a.norm_eps = ctx.attr_float("norm_eps");
  a.cap = ctx.attr_float("soft_cap");
  a.bf16 = ctx.attr_int("round_bf16") != 0;
  for (auto [name, data, shape] : {std::tuple{"y", &a.y, std::vector<int64_t>{B, S, NH * DV}},
                                   {"c", &a.c, std::vector<int64_t>{B, NH, DQK, DV}},
                                   {"n", &a.n, std::vector<int64_t>{B, NH, DQK}},
                                   {"m", &a.m, std::vector<int64_t>{B, NH}}}) {
    if (OrtStatus* s = ctx.output(name, shape, data)) return s;
  }
  if (S == 0) {  // no step: the state passes through
    std::memcpy(a.c, a.c0, sizeof(float) * B * NH * DQK * DV);
    std::memcpy(a.n, a.n0, sizeof(float) * B * NH * DQK);
    std::memcpy(a.m, a.m0, sizeof(float) * B * NH);
    return nullptr;
  }
  // the gates of every (row, step, head) first, in vectors: g holds each row's NH i gates, then its
  // NH f gates, from column g_col; then each head's matrix memory, step by step
  std::vector<float> gates(3 * B * S * NH);
  float *i_act = gates.data(), *f_act = i_act + B * S * NH, *floor = f_act + B * S * NH;
  for (int64_t row = 0; row < B * S; ++row) {
    const float* g = a.in[3] + row * a.width[3] + a.col[3];
    for (int64_t h = 0; h < NH; ++h) {
      i_act[row * NH + h] = g[h] + a.gate_bias[h];
      f_act[row * NH + h] = g[NH + h] + a.gate_bias[NH + h];
    }
  }
  xlstm_cpu::mlstm_gates(i_act, f_act, floor, a.m0, a.m, B, S, NH, a.cap);
  a.i_act = i_act;
  a.f_act = f_act;
  a.floor = floor;
  const bool parallel = B * NH * S * DQK * DV >= mlstm_split_factor(DQK, DV) * ctx.split->cell_work;
  a.heads_per_task = mlstm_small_heads(DQK, DV) && !parallel ? NH : 1;
  return ctx.for_each(static_cast<size_t>(B * NH / a.heads_per_task), parallel, mlstm_layer_task, &a);
}

OrtStatus* mlstm_layer_compute(const Ctx& ctx) { return mlstm_layer(ctx, false); }
OrtStatus* mlstm_paper_layer_compute(const Ctx& ctx) { return mlstm_layer(ctx, true); }

// ---------------------------------------------------------------------------------------------
// PackedMatMul
// ---------------------------------------------------------------------------------------------

struct PackedMatMulArgs {
  const float* x;
  const float* w;          // the float32 weight, or
  const uint16_t* w_bf16;  // the bfloat16 one (the ...Bf16 ops)
  float* y;
  const float* r;  // added to the product (the ...Add ops), or nullptr
  float cap;       // > 0: the soft cap cap * tanh(y / cap) on the result (PackedNormMatMul's soft_cap)
  int64_t m, k, n, ldr, panels, panels_per_batch;
};

constexpr int64_t kRowBlockBytes = 512 << 10;

// One thread's contiguous range of panels: the weight bytes it streams are one block of memory.
void packed_matmul_batch(void* data, size_t batch) {
  const auto& a = *static_cast<const PackedMatMulArgs*>(data);
  const int64_t first = static_cast<int64_t>(batch) * a.panels_per_batch;
  const int64_t last = std::min(a.panels, first + a.panels_per_batch);
  // Rows in blocks whose x fits in L2 (~512 KiB), each block against all of this thread's panels:
  // at prefill a panel otherwise re-reads all of x from L3 (2048 x 256 x 50304: 183 -> 190 GFLOP/s,
  // 2048 x 256 x 1024: 175 -> 194; one block at decode).
  const int64_t block = std::max<int64_t>(24, (kRowBlockBytes / (4 * a.k)) / 24 * 24);  // whole row blocks
  for (int64_t m0 = 0; m0 < a.m; m0 += block) {
    const int64_t rows = std::min(block, a.m - m0);
    for (int64_t p = first; p < last; p += 2) {  // two panels at a time, as packed_matmul_range does
      const int64_t until = std::min(last, p + 2);
      float* y = a.y + m0 * a.n;
      const float* r = a.r ? a.r + m0 * a.ldr : nullptr;
      if (a.w_bf16 != nullptr) {
        xlstm_cpu::packed_matmul_range(a.x + m0 * a.k, rows, a.k, a.w_bf16, p, until, a.n, y, r, a.ldr);
      } else {
        xlstm_cpu::packed_matmul_range(a.x + m0 * a.k, rows, a.k, a.w, p, until, a.n, y, r, a.ldr);
      }
      if (a.cap > 0.0f) {  // while the panels' outputs are in L1
        const int cols = static_cast<int>(std::min<int64_t>((until - p) * xlstm_cpu::kPanel, a.n - p * xlstm_cpu::kPanel));
        for (int64_t row = 0; row < rows; ++row) xlstm_cpu::soft_cap_row(y + row * a.n + p * xlstm_cpu::kPanel, cols, a.cap);
      }
    }
  }
}

// What a packed product does to its input rows first, and whether it adds a third input after.
enum class Prologue { kNone, kNorm, kLayerNorm, kGlu };

struct PrologueArgs {
  Prologue kind;
  const float *x, *g, *beta;  // x [m, K] (the norms) or [m, 2K] (kGlu); g, beta [K]: the norm's scale, bias
  float eps;
  bool bf16;  // kNorm: the normed rows rounded to bfloat16 (PackedNormMatMul's round_bf16)
  bool gelu;  // kGlu: the GELU in place of silu
  float gelu_div;  // kGlu: the GELU's sqrt 2 as the graph holds it
  int64_t k;
  float* out;  // [m, K]
};

void prologue_row(void* data, size_t row) {
  const auto& a = *static_cast<const PrologueArgs*>(data);
  if (a.kind == Prologue::kNorm)
    xlstm_cpu::rms_norm_row(a.x + row * a.k, a.g, a.k, a.eps, a.bf16, a.out + row * a.k);
  else if (a.kind == Prologue::kLayerNorm)
    xlstm_cpu::layer_norm_row(a.x + row * a.k, a.g, a.beta, a.k, a.eps, a.out + row * a.k);
  else
    xlstm_cpu::glu_row(a.x + row * 2 * a.k, a.k, a.gelu, a.gelu_div, a.out + row * a.k);
}

// The packed products, by op:
//   PackedMatMul          (x, w)     y = x W
//   PackedMatMulAdd       (x, w, r)  y = x W + r, r the same shape as y (a residual) or [n] (a bias)
//   PackedNormMatMul      (x, w, g)  y = softcap(RMSNorm(x) W): x / sqrt(mean(x^2) + eps) * g row by
//                                    row, g [K]; float attributes eps and soft_cap (<= 0: none)
//   PackedLnMatMul        (x, w, g, beta)  y = LayerNorm(x) W: (x - mean) / sqrt(var + eps) * g + beta
//                                    row by row, g, beta [K]; float attribute eps
//   PackedGluMatMulAdd    (z, w, r)  y = (act(z[..., :K]) * z[..., K:]) W + r: the SwiGLU (int attribute
//                                    gelu = 0) or the GeGLU (gelu = 1), z [..., 2K]
//   ...Bf16                               the same with w bfloat16
OrtStatus* packed_matmul(const Ctx& ctx, Prologue prologue, bool add, bool bf16 = false) {
  PackedMatMulArgs a{};
  std::vector<int64_t> x, w;
  if (OrtStatus* s = ctx.input(prologue == Prologue::kGlu ? "z" : "x", &a.x, &x)) return s;
  if (OrtStatus* s = bf16 ? ctx.input("w", &a.w_bf16, &w) : ctx.input("w", &a.w, &w)) return s;
  a.n = ctx.attr_int("n");
  if (w.size() != 3 || w[2] != xlstm_cpu::kPanel || a.n <= 0 || (a.n + xlstm_cpu::kPanel - 1) / xlstm_cpu::kPanel != w[0])
    return ctx.error("w must be [ceil(n / 32), K, 32] for the attribute n = %ld, got rank %ld with %ld panels",
                     static_cast<long>(a.n), static_cast<long>(w.size()), w.empty() ? -1L : static_cast<long>(w[0]));
  a.k = w[1];
  const int64_t x_cols = prologue == Prologue::kGlu ? 2 * a.k : a.k;  // the GLU halves its input
  if (x.empty() || x.back() != x_cols)
    return ctx.error("x must be [..., K] with K = %ld (w's second dim, twice that for the GLU), got last dim %ld",
                     static_cast<long>(x_cols), x.empty() ? -1L : static_cast<long>(x.back()));
  a.panels = w[0];
  a.m = 1;
  for (size_t d = 0; d + 1 < x.size(); ++d) a.m *= x[d];
  std::vector<int64_t> y(x);
  y.back() = a.n;
  std::vector<float> rows;  // the prologue's rows of x, [m, K]
  PrologueArgs pro{prologue, a.x, nullptr, nullptr, 0.0f, false, false, 0.0f, a.k, nullptr};
  if (prologue == Prologue::kGlu) {
    pro.gelu = ctx.attr_int("gelu") != 0;
    pro.gelu_div = ctx.attr_float("gelu_div");
  }
  if (prologue == Prologue::kNorm) {
    std::vector<int64_t> g;
    pro.eps = ctx.attr_float("eps");
    if (OrtStatus* s = ctx.input("g", &pro.g, &g)) return s;
    if (!same(g, {a.k})) return ctx.error("g must be [K = %ld], got rank %ld", static_cast<long>(a.k),
                                          static_cast<long>(g.size()));
    a.cap = ctx.attr_float("soft_cap");
    pro.bf16 = ctx.attr_int("round_bf16") != 0;
  }
  if (prologue == Prologue::kLayerNorm) {
    std::vector<int64_t> g, beta;
    pro.eps = ctx.attr_float("eps");
    if (OrtStatus* s = ctx.input("g", &pro.g, &g)) return s;
    if (OrtStatus* s = ctx.input("beta", &pro.beta, &beta)) return s;
    if (!same(g, {a.k}) || !same(beta, {a.k}))
      return ctx.error("g and beta must be [K = %ld], got ranks %ld and %ld", static_cast<long>(a.k),
                       static_cast<long>(g.size()), static_cast<long>(beta.size()));
  }
  if (prologue != Prologue::kNone) {  // rows split over the pool at prefill sizes
    rows.resize(static_cast<size_t>(a.m * a.k));
    pro.out = rows.data();
    if (OrtStatus* s = ctx.for_each(static_cast<size_t>(a.m), a.m * a.k >= ctx.split->cell_work, prologue_row, &pro))
      return s;
    a.x = rows.data();
  }
  if (add) {
    std::vector<int64_t> r;
    if (OrtStatus* s = ctx.input("r", &a.r, &r)) return s;
    if (r != y && !same(r, {a.n}))
      return ctx.error("r must have the product's shape [..., n = %ld] (rank %ld) or be [n], got rank %ld",
                       static_cast<long>(a.n), static_cast<long>(y.size()), static_cast<long>(r.size()));
    a.ldr = r == y ? a.n : 0;
  }
  if (OrtStatus* s = ctx.output("y", y, &a.y)) return s;
  if (a.m == 0) return nullptr;
  // One contiguous range of panels per thread (the pool runs `batches` batches of one index each).
  const int64_t weight = a.k * a.panels * xlstm_cpu::kPanel;
  const bool parallel = weight * (bf16 ? 2 : 4) >= ctx.split->matmul_bytes ||
                        a.m * weight >= ctx.split->matmul_work;
  // hardware_concurrency() reads /sys on every call: once per process
  static const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t batches = parallel ? std::min(a.panels, threads) : 1;
  a.panels_per_batch = (a.panels + batches - 1) / batches;
  const auto tasks = static_cast<size_t>((a.panels + a.panels_per_batch - 1) / a.panels_per_batch);
  return ctx.for_each(tasks, true, packed_matmul_batch, &a, tasks);
}

OrtStatus* packed_matmul_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNone, false); }
OrtStatus* packed_matmul_add_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNone, true); }
OrtStatus* packed_norm_matmul_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNorm, false); }
OrtStatus* packed_ln_matmul_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kLayerNorm, false); }
OrtStatus* packed_glu_matmul_add_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kGlu, true); }
OrtStatus* packed_matmul_bf16_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNone, false, true); }
OrtStatus* packed_matmul_add_bf16_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNone, true, true); }
OrtStatus* packed_norm_matmul_bf16_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kNorm, false, true); }
OrtStatus* packed_ln_matmul_bf16_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kLayerNorm, false, true); }
OrtStatus* packed_glu_matmul_add_bf16_compute(const Ctx& ctx) { return packed_matmul(ctx, Prologue::kGlu, true, true); }

// ---------------------------------------------------------------------------------------------
// BlockDiagMatMul
// ---------------------------------------------------------------------------------------------

struct BlockDiagArgs {
  const float *x, *w;
  float* y;
  int64_t n;
  void (*row)(const float*, const float*, int64_t, float*);  // block_diag_row<BLK>
};

void block_diag_task(void* data, size_t row) {
  const auto& a = *static_cast<const BlockDiagArgs*>(data);
  a.row(a.x + row * a.n, a.w, a.n, a.y + row * a.n);
}

OrtStatus* block_diag_matmul_compute(const Ctx& ctx) {
  BlockDiagArgs a{};
  std::vector<int64_t> x, w;
  if (OrtStatus* s = ctx.input("x", &a.x, &x)) return s;
  if (OrtStatus* s = ctx.input("w", &a.w, &w)) return s;
  a.n = ctx.attr_int("n");
  const int64_t blk = w.size() == 3 ? w[1] : 0;
  switch (blk) {
    case 1: a.row = xlstm_cpu::block_diag_row<1>; break;
    case 2: a.row = xlstm_cpu::block_diag_row<2>; break;
    case 4: a.row = xlstm_cpu::block_diag_row<4>; break;
    case 8: a.row = xlstm_cpu::block_diag_row<8>; break;
    case 16: a.row = xlstm_cpu::block_diag_row<16>; break;
    default: break;
  }
  if (a.row == nullptr || w[2] != 16 || a.n <= 0 || a.n % blk != 0 || (a.n + 15) / 16 != w[0])
    return ctx.error("w must be [ceil(n / 16), BLK, 16] with BLK 1, 2, 4, 8 or 16 dividing the attribute n = %ld, "
                     "got rank %ld with BLK %ld", static_cast<long>(a.n), static_cast<long>(w.size()),
                     static_cast<long>(blk));
  int64_t size = 1;
  for (int64_t d : x) size *= d;
  if (size % a.n != 0)
    return ctx.error("x must hold whole rows of n = %ld values, got %ld values", static_cast<long>(a.n),
                     static_cast<long>(size));
  const int64_t m = size / a.n;
  if (OrtStatus* s = ctx.output("y", {m, a.n / blk, blk}, &a.y)) return s;
  return ctx.for_each(static_cast<size_t>(m), m * a.n * blk >= ctx.split->cell_work, block_diag_task, &a);
}

// ---------------------------------------------------------------------------------------------
// CausalConv
// ---------------------------------------------------------------------------------------------

struct CausalConvArgs {
  const float *x, *past, *w, *bias;
  float *y, *present;
  int64_t s, d;
  int k;
  bool silu, bf16;
};

void causal_conv_task(void* data, size_t b) {
  const auto& a = *static_cast<const CausalConvArgs*>(data);
  const int64_t state = (a.k - 1) * a.d;
  xlstm_cpu::causal_conv_sequence(a.x + b * a.s * a.d, a.past + b * state, a.w, a.bias, a.k, static_cast<int>(a.s),
                                  a.d, a.silu, a.bf16, a.y + b * a.s * a.d, a.present + b * state);
}

OrtStatus* causal_conv_compute(const Ctx& ctx) {
  CausalConvArgs a{};
  std::vector<int64_t> x, past, w, bias;
  if (OrtStatus* s = ctx.input("x", &a.x, &x)) return s;
  if (OrtStatus* s = ctx.input("past", &a.past, &past)) return s;
  if (OrtStatus* s = ctx.input("w", &a.w, &w)) return s;
  if (OrtStatus* s = ctx.input("bias", &a.bias, &bias)) return s;
  if (w.size() != 2 || w[0] < 1 || x.size() != 3 || x[2] != w[1])
    return ctx.error("w must be [K, D] with x [B, S, D], got w of rank %ld and x of rank %ld",
                     static_cast<long>(w.size()), static_cast<long>(x.size()));
  const int64_t batch = x[0], k = w[0];
  a.s = x[1];
  a.d = w[1];
  a.k = static_cast<int>(k);
  a.silu = ctx.attr_int("silu") != 0;
  a.bf16 = ctx.attr_int("round_bf16") != 0;
  if (!same(past, {batch, k - 1, a.d}) || !same(bias, {a.d}))
    return ctx.error("past must be [B, K-1, D] = [%ld, %ld, D] and bias [D], with D = %ld from w",
                     static_cast<long>(batch), static_cast<long>(k - 1), static_cast<long>(a.d));
  if (OrtStatus* s = ctx.output("y", x, &a.y)) return s;
  if (OrtStatus* s = ctx.output("present", past, &a.present)) return s;
  return ctx.for_each(static_cast<size_t>(batch), batch * a.s * a.d * k >= ctx.split->cell_work, causal_conv_task,
                      &a);
}

// ---------------------------------------------------------------------------------------------
// The OrtCustomOp tables
// ---------------------------------------------------------------------------------------------

struct Kernel {
  const OrtApi* api;
  const SplitThresholds* split;
  const char* name;
  const Signature* sig;
  OrtStatus* (*compute)(const Ctx&);
  int64_t ints[kMaxAttributes];
  float floats[kMaxAttributes];
};

struct OpDef {
  OrtCustomOpLayout table;  // first member: onnxruntime passes &table back to the callbacks
  const char* name;
  OrtStatus* (*compute)(const Ctx&);
  Signature sig;
  const SplitThresholds* split;  // of the pool of the sessions this table is registered with
};

const OpDef* def(const OrtCustomOpLayout* op) { return reinterpret_cast<const OpDef*>(op); }

OrtStatus* create_kernel(const OrtCustomOpLayout* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  const Signature& sig = def(op)->sig;
  Kernel kernel{api, def(op)->split, def(op)->name, &sig, def(op)->compute, {}, {}};
  using GetInt = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
  using GetFloat = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
  for (size_t j = 0; sig.int_attributes[j]; ++j) {
    if (OrtStatus* s = ort::fn<GetInt>(api, ort::kKernelInfoGetAttributeInt64)(info, sig.int_attributes[j],
                                                                              &kernel.ints[j]))
      return s;
  }
  for (size_t j = 0; sig.float_attributes[j]; ++j) {
    if (OrtStatus* s = ort::fn<GetFloat>(api, ort::kKernelInfoGetAttributeFloat)(info, sig.float_attributes[j],
                                                                                  &kernel.floats[j]))
      return s;
  }
  *out = new Kernel(kernel);
  return nullptr;
}

OrtStatus* compute_kernel(void* kernel, OrtKernelContext* context) {
  const auto* k = static_cast<const Kernel*>(kernel);
  return k->compute(Ctx{k->api, context, k->split, k->name, k->sig, k->ints, k->floats});
}

OpDef make_op(const char* name, OrtStatus* (*compute)(const Ctx&), const Signature& sig,
             const SplitThresholds* split) {
  OpDef d{};
  OrtCustomOpLayout& t = d.table;
  ort::fill_common(t, create_kernel, compute_kernel);
  t.GetName = [](const OrtCustomOpLayout* op) { return def(op)->name; };
  t.GetInputType = [](const OrtCustomOpLayout* op, size_t index) -> int {
    const Signature& sig = def(op)->sig;
    return index < count(sig.inputs) && position(sig.bf16_inputs, sig.inputs[index]) >= 0 ? kOrtBFloat16 : kOrtFloat;
  };
  t.GetOutputType = [](const OrtCustomOpLayout*, size_t) -> int { return kOrtFloat; };
  t.GetInputTypeCount = [](const OrtCustomOpLayout* op) { return count(def(op)->sig.inputs); };
  t.GetOutputTypeCount = [](const OrtCustomOpLayout* op) { return count(def(op)->sig.outputs); };
  t.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  d.name = name;
  d.compute = compute;
  d.sig = sig;
  d.split = split;
  return d;
}

// The ops, with the split thresholds of one kind of pool.
std::vector<OpDef> make_ops(const SplitThresholds* split) {
  return {
    make_op("mLSTMStep", mlstm_step_compute,
            {{"q", "k", "v", "i", "f", "c0", "n0", "m0", "eps"}, {"h", "c", "n", "m"}, {}, {}, {}}, split),
    make_op("sLSTMScan", slstm_scan_compute,
            {{"h0", "c0", "n0", "m0", "x", "r"}, {"h", "c", "n", "m", "y"}, {}, {}, {}}, split),
    make_op("PackedMatMul", packed_matmul_compute, {{"x", "w"}, {"y"}, {"n"}, {}, {}}, split),
    make_op("PackedMatMulAdd", packed_matmul_add_compute, {{"x", "w", "r"}, {"y"}, {"n"}, {}, {}}, split),
    make_op("PackedNormMatMul", packed_norm_matmul_compute,
            {{"x", "w", "g"}, {"y"}, {"n", "round_bf16"}, {"eps", "soft_cap"}, {}}, split),
    make_op("PackedLnMatMul", packed_ln_matmul_compute, {{"x", "w", "g", "beta"}, {"y"}, {"n"}, {"eps"}, {}}, split),
    make_op("PackedGluMatMulAdd", packed_glu_matmul_add_compute, {{"z", "w", "r"}, {"y"}, {"n", "gelu"}, {"gelu_div"}, {}},
            split),
    make_op("PackedMatMulBf16", packed_matmul_bf16_compute, {{"x", "w"}, {"y"}, {"n"}, {}, {"w"}}, split),
    make_op("PackedMatMulAddBf16", packed_matmul_add_bf16_compute, {{"x", "w", "r"}, {"y"}, {"n"}, {}, {"w"}},
            split),
    make_op("PackedNormMatMulBf16", packed_norm_matmul_bf16_compute,
            {{"x", "w", "g"}, {"y"}, {"n", "round_bf16"}, {"eps", "soft_cap"}, {"w"}}, split),
    make_op("PackedLnMatMulBf16", packed_ln_matmul_bf16_compute,
            {{"x", "w", "g", "beta"}, {"y"}, {"n"}, {"eps"}, {"w"}}, split),
    make_op("PackedGluMatMulAddBf16", packed_glu_matmul_add_bf16_compute,
            {{"z", "w", "r"}, {"y"}, {"n", "gelu"}, {"gelu_div"}, {"w"}},
            split),
    make_op("BlockDiagMatMul", block_diag_matmul_compute, {{"x", "w"}, {"y"}, {"n"}, {}, {}}, split),
    make_op("mLSTMLayer", mlstm_layer_compute,
            {{"q", "k", "v", "g", "o", "gate_bias", "c0", "n0", "m0", "ln_scale", "ln_bias", "weight"},
             {"y", "c", "n", "m"},
             {"q_col", "k_col", "v_col", "g_col", "o_col", "round_bf16"},
             {"eps", "norm_eps", "soft_cap"}, {}},
            split),
    make_op("mLSTMPaperLayer", mlstm_paper_layer_compute,
            {{"q", "k", "v", "g", "z", "gate_bias", "c0", "n0", "m0", "ln_scale", "ln_bias", "weight", "skip", "xc"},
             {"y", "c", "n", "m"},
             {"q_col", "k_col", "v_col", "g_col", "z_col", "round_bf16"},
             {"eps", "norm_eps", "soft_cap"}, {}},
            split),
    make_op("sLSTMPaperLayer", slstm_paper_layer_compute,
            {{"xc", "x", "w_if", "w_zo", "r", "b", "h0", "c0", "n0", "m0", "ln_scale", "ln_bias", "weight"},
             {"y", "h", "c", "n", "m"}, {"round_bf16"}, {"norm_eps"}, {}},
            split),
    make_op("CausalConv", causal_conv_compute,
            {{"x", "past", "w", "bias"}, {"y", "present"}, {"silu", "round_bf16"}, {}, {}}, split),
  };
}

// onnxruntime keeps pointers to these for as long as any session uses them: one table per kind of
// pool, built on first use and never freed (a session a C++ host destroys after this library's
// static destructors have run still calls its kernels' KernelDestroy through them).
const std::vector<OpDef>& ops_for(bool sleeping) {
  static const auto* spinning = new std::vector<OpDef>(make_ops(&kSpinningPool));
  static const auto* sleeping_pool = new std::vector<OpDef>(make_ops(&kSleepingPool));
  return sleeping ? *sleeping_pool : *spinning;
}

// The kind of pool the last RegisterCustomOps registered for: 0 none yet, 1 spinning, 2 sleeping
// (read by the test that the library follows the session's setting).
std::atomic<int> last_registered{0};

void append_names(std::string& out, const char* const* names) {
  for (size_t j = 0; names[j]; ++j) out += (j ? "," : "") + std::string(names[j]);
}

// "name(in,...)->(out,...) ints(...) floats(...)[ bf16(...)]" per op, one a line (NativeOp.signature's
// format).
std::string signatures() {
  std::string out;
  for (const OpDef& op : ops_for(false)) {
    out += op.name;
    out += "(";
    append_names(out, op.sig.inputs);
    out += ")->(";
    append_names(out, op.sig.outputs);
    out += ") ints(";
    append_names(out, op.sig.int_attributes);
    out += ") floats(";
    append_names(out, op.sig.float_attributes);
    out += ")";
    if (op.sig.bf16_inputs[0] != nullptr) {
      out += " bf16(";
      append_names(out, op.sig.bf16_inputs);
      out += ")";
    }
    out += "\n";
  }
  return out;
}

}  // namespace

// The ops' signatures, for the test that checks them against xlstm_export/native_ops.py.
extern "C" __attribute__((visibility("default"))) const char* XlstmCpuOpSignatures() {
  static const std::string text = signatures();
  return text.c_str();
}

// "spinning" or "sleeping": the kind of intra-op pool the last registration's kernels split work
// for ("" before any), for the test that the library reads the session's setting.
extern "C" __attribute__((visibility("default"))) const char* XlstmCpuLastRegisteredPool() {
  static const char* const names[] = {"", "spinning", "sleeping"};
  return names[last_registered.load()];
}

// y[j] = f(x[j]) for j < n, f one of the kernels' vector functions by name (exp, expm1, tanh,
// log1p_unit, log_sigmoid, sigmoid; hsum: the sum of x[16k .. 16k + 15] in y[k]), for the test of
// their accuracy against float64. Returns 0, or -1 for an unknown name.
extern "C" __attribute__((visibility("default"))) int XlstmCpuVectorMath(const char* name, const float* x, float* y,
                                                                         int64_t n) {
  using xlstm_cpu::vec16;
  const std::string f = name;
  vec16 (*fn)(vec16) = nullptr;
  if (f == "exp") fn = xlstm_cpu::exp16;
  if (f == "expm1") fn = xlstm_cpu::expm1_16;
  if (f == "tanh") fn = xlstm_cpu::tanh16;
  if (f == "log1p_unit") fn = xlstm_cpu::log1p_unit16;
  if (f == "log_sigmoid") fn = xlstm_cpu::log_sigmoid16;
  if (f == "sigmoid") fn = xlstm_cpu::sigmoid16;
  if (fn == nullptr && f != "hsum") return -1;
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t len = std::min<int64_t>(16, n - j);
    const vec16 v = xlstm_cpu::load16_part(x + j, len);
    if (fn != nullptr) {
      xlstm_cpu::store16_part(y + j, fn(v), len);
    } else {
      y[j / 16] = xlstm_cpu::hsum16(v);
    }
  }
  return 0;
}

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* base) {
  // onnxruntime's workers spin only when session.intra_op.allow_spinning is "1", its default when
  // unset (kOrtSessionOptionsConfigAllowIntraOpSpinning); they sleep for any other value. The
  // setting must be made before the library is registered: it is read here, once.
  const OrtApi* api = base->GetApi(ort::kApiVersion);
  bool has = false;
  std::string value;
  if (api != nullptr)
    if (OrtStatus* s = ort::session_config_entry(api, options, "session.intra_op.allow_spinning", &has, &value))
      return s;
  const bool sleeping = has && value != "1";
  std::vector<const OrtCustomOpLayout*> ops;
  for (const OpDef& op : ops_for(sleeping)) ops.push_back(&op.table);
  OrtStatus* status = ort::register_ops(options, base, "xlstm.cpu", ops.data(), ops.size());
  if (status == nullptr) last_registered = sleeping ? 2 : 1;
  return status;
}
