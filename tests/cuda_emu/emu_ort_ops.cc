// An onnxruntime custom-op library whose xlstm::mLSTM / xlstm::sLSTM kernels are the CUDA plugin
// kernels under the CPU emulation (emu_kernels.cc): the exported models' own `xlstm` nodes (a
// registered custom op takes precedence over the model-local function body) run the plugins'
// kernel source, with the plugins' launch geometry, on every call. A CPU rehearsal of what the
// TensorRT engine does with the plugins: prefill (chunk path) and decode (step path) inside the
// real models, fed by onnxruntime. Built and used by tests/test_plugins_emu.py.
//
// The geometry is computed from the kernels' own header (plugins/layout.cuh, its tile sizes -D flags
// from plugins/launch.py), as launch.py computes it; emu_*_geometry export it so the test can hold
// both to each other. XLSTM_EMU_SMEM_LIMIT (-D, from the test) is the per-block limit the sLSTM
// launches plan with.
#include <cstdint>
#include <cstring>
#include <iterator>
#include <vector>

#include "layout.cuh"
#include "ort_op.h"

extern "C" int emu_mlstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out);
extern "C" int emu_slstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out);

namespace {

constexpr int kSmemLimit = XLSTM_EMU_SMEM_LIMIT;  // launch.SMEM_OPTIN_BYTES of the emulated GPU
constexpr int kOrtFloat16 = 10, kOrtBfloat16 = 16;

int float_bits(float x) {
  int bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

}  // namespace

// mLSTM: launch = grid xyz, block xyz, smem bytes;  args = B, NH, S, DQK, DV, chunk, eps bits.
extern "C" void emu_mlstm_geometry(int B, int NH, int S, int DQK, int DV, int chunk_size, float eps,
                                   unsigned* launch, int* args) {
  using namespace xlstm::mlstm;
  const unsigned geometry[7] = {static_cast<unsigned>((DV + kStepV - 1) / kStepV), static_cast<unsigned>(NH),
                                static_cast<unsigned>(B), kThreads, 1, 1,
                                static_cast<unsigned>(4 * smem_floats(DQK))};
  std::memcpy(launch, geometry, sizeof geometry);
  const int a[7] = {B, NH, S, DQK, DV, chunk_size < kChunk ? chunk_size : kChunk, float_bits(eps)};
  std::memcpy(args, a, sizeof a);
}

// sLSTM: args = B, NH, S, DH, r_rows (as many rows of r[head] as fit under the limit).
extern "C" void emu_slstm_geometry(int B, int NH, int S, int DH, int itemsize, int smem_limit,
                                   unsigned* launch, int* args) {
  using namespace xlstm::slstm;
  int r_rows = (smem_limit - smem_bytes(DH, 0, itemsize)) / (4 * DH * itemsize);
  r_rows = r_rows < 0 ? 0 : (r_rows > DH ? DH : r_rows);
  const unsigned geometry[7] = {static_cast<unsigned>(NH), static_cast<unsigned>(B), 1,
                                static_cast<unsigned>(threads_for(DH)), 1, 1,
                                static_cast<unsigned>(smem_bytes(DH, r_rows, itemsize))};
  std::memcpy(launch, geometry, sizeof geometry);
  const int a[5] = {B, NH, S, DH, r_rows};
  std::memcpy(args, a, sizeof a);
}

namespace {

struct Kernel {
  const OrtApi* api;
  bool is_mlstm;
  int dtype;  // 0 f32, 1 f16, 2 bf16
  int64_t chunk_size = 64;
  float eps = 1e-6f;
};

OrtStatus* tensor(const OrtApi* api, const OrtValue* v, std::vector<int64_t>* dims, void** data) {
  if (OrtStatus* s = ort::tensor_dims(api, v, dims)) return s;
  return ort::tensor_data(api, v, data);
}

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const auto& k = *static_cast<const Kernel*>(kernel);
  using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  const size_t n_in = k.is_mlstm ? 8 : 7, n_out = k.is_mlstm ? 4 : 5;
  std::vector<void*> in(n_in), out(n_out);
  std::vector<std::vector<int64_t>> dims(n_in);
  for (size_t i = 0; i < n_in; ++i) {
    const OrtValue* v = nullptr;
    if (OrtStatus* s = ort::fn<GetInput>(k.api, ort::kKernelContextGetInput)(ctx, i, &v)) return s;
    if (OrtStatus* s = tensor(k.api, v, &dims[i], &in[i])) return s;
  }
  unsigned launch[7];
  int args[7];
  std::vector<std::vector<int64_t>> out_dims;
  if (k.is_mlstm) {  // q [B, NH, S, DQK], v [B, NH, S, DV]
    const auto &q = dims[0], &v = dims[2];
    if (q.size() != 4 || v.size() != 4) return ort::error(k.api, "emulated xlstm::mLSTM: q and v must be rank 4");
    const int B = q[0], NH = q[1], S = q[2], DQK = q[3], DV = v[3];
    emu_mlstm_geometry(B, NH, S, DQK, DV, static_cast<int>(k.chunk_size), k.eps, launch, args);
    out_dims = {{B, NH, S, DV}, {B, NH, DQK, DV}, {B, NH, DQK}, {B, NH}};
  } else {  // x [B, NH, S, 4*DH]
    const auto& x = dims[0];
    if (x.size() != 4) return ort::error(k.api, "emulated xlstm::sLSTM: x must be rank 4");
    const int B = x[0], NH = x[1], S = x[2], DH = x[3] / 4;
    emu_slstm_geometry(B, NH, S, DH, k.dtype == 0 ? 4 : 2, kSmemLimit, launch, args);
    out_dims = {{B, NH, S, DH}, {B, NH, DH}, {B, NH, DH}, {B, NH, DH}, {B, NH, DH}};
  }
  for (size_t o = 0; o < n_out; ++o) {
    OrtValue* v = nullptr;
    if (OrtStatus* s = ort::fn<GetOutput>(k.api, ort::kKernelContextGetOutput)(ctx, o, out_dims[o].data(),
                                                                                out_dims[o].size(), &v))
      return s;
    std::vector<int64_t> unused;
    if (OrtStatus* s = tensor(k.api, v, &unused, &out[o])) return s;
  }
  const int rc = (k.is_mlstm ? emu_mlstm_fwd : emu_slstm_fwd)(k.dtype, launch, in.data(), args, out.data());
  return rc == 0 ? nullptr : ort::error(k.api, "emulated kernel: the launch needs more shared memory than emulated");
}

struct OpDef {
  OrtCustomOpLayout table;  // first member: onnxruntime hands &table back to the callbacks
  const char* name;
  bool is_mlstm;
  int dtype;     // 0 f32, 1 f16, 2 bf16
  int t_type;    // ONNX element type of the T tensors
  size_t n_t_inputs, n_in, n_out;  // the first n_t_inputs inputs are T; output 0 is T
};

const OpDef* def(const OrtCustomOpLayout* op) { return reinterpret_cast<const OpDef*>(op); }

OrtStatus* create_kernel(const OrtCustomOpLayout* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel{api, def(op)->is_mlstm, def(op)->dtype};
  if (k->is_mlstm) {  // attributes the exported nodes carry; the contract's defaults otherwise
    using GetInt = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
    using GetFloat = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
    using ReleaseStatus = void (*)(OrtStatus*);
    const auto release = ort::fn<ReleaseStatus>(api, ort::kReleaseStatus);
    if (OrtStatus* s = ort::fn<GetInt>(api, ort::kKernelInfoGetAttributeInt64)(info, "chunk_size", &k->chunk_size))
      release(s);
    if (OrtStatus* s = ort::fn<GetFloat>(api, ort::kKernelInfoGetAttributeFloat)(info, "eps", &k->eps)) release(s);
  }
  *out = k;
  return nullptr;
}

OpDef make(const char* name, bool is_mlstm, int dtype, int t_type) {
  OpDef d{};
  auto& t = d.table;
  ort::fill_common(t, create_kernel, compute);
  t.GetName = [](const OrtCustomOpLayout* op) { return def(op)->name; };
  t.GetInputType = [](const OrtCustomOpLayout* op, size_t i) -> int {
    return i < def(op)->n_t_inputs ? def(op)->t_type : kOrtFloat;
  };
  t.GetInputTypeCount = [](const OrtCustomOpLayout* op) { return def(op)->n_in; };
  t.GetOutputType = [](const OrtCustomOpLayout* op, size_t i) -> int { return i == 0 ? def(op)->t_type : kOrtFloat; };
  t.GetOutputTypeCount = [](const OrtCustomOpLayout* op) { return def(op)->n_out; };
  t.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  d.name = name;
  d.is_mlstm = is_mlstm;
  d.dtype = dtype;
  d.t_type = t_type;
  d.n_t_inputs = is_mlstm ? 5 : 3;  // mLSTM: q k v i f;  sLSTM: x r b
  d.n_in = is_mlstm ? 8 : 7;
  d.n_out = is_mlstm ? 4 : 5;
  return d;
}

// One definition per (op, dtype); onnxruntime merges same-name ops into one schema.
const OpDef kOps[] = {
    make("mLSTM", true, 0, kOrtFloat), make("mLSTM", true, 1, kOrtFloat16), make("mLSTM", true, 2, kOrtBfloat16),
    make("sLSTM", false, 0, kOrtFloat), make("sLSTM", false, 1, kOrtFloat16), make("sLSTM", false, 2, kOrtBfloat16),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* base) {
  const OrtCustomOpLayout* ops[std::size(kOps)];
  for (size_t i = 0; i < std::size(kOps); ++i) ops[i] = &kOps[i].table;
  return ort::register_ops(options, base, "xlstm", ops, std::size(kOps));
}
