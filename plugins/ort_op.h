// Helpers shared by the onnxruntime custom-op libraries of this project (plugins/cpu_ops.cc, and the
// emulated CUDA kernels of tests/cuda_emu/emu_ort_ops.cc), on top of the ABI declared in ort_abi.h.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "ort_abi.h"

namespace ort {

using CreateStatusFn = OrtStatus* (*)(int, const char*);

inline OrtStatus* error(const OrtApi* api, const char* msg) {
  return fn<CreateStatusFn>(api, kCreateStatus)(kOrtInvalidArgument, msg);
}

// The dims of a tensor value.
inline OrtStatus* tensor_dims(const OrtApi* api, const OrtValue* value, std::vector<int64_t>* dims) {
  using GetShape = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using Count = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using Dims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using Release = void (*)(OrtTensorTypeAndShapeInfo*);
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = fn<GetShape>(api, kGetTensorTypeAndShape)(value, &info)) return s;
  size_t rank = 0;
  OrtStatus* s = fn<Count>(api, kGetDimensionsCount)(info, &rank);
  if (!s) {
    dims->assign(rank, 0);
    s = fn<Dims>(api, kGetDimensions)(info, dims->data(), rank);
  }
  fn<Release>(api, kReleaseTensorTypeAndShapeInfo)(info);
  return s;
}

// A tensor value's data (the C API's accessor takes a non-const value; inputs are only read).
inline OrtStatus* tensor_data(const OrtApi* api, const OrtValue* value, void** data) {
  using Data = OrtStatus* (*)(OrtValue*, void**);
  return fn<Data>(api, kGetTensorMutableData)(const_cast<OrtValue*>(value), data);
}

// The session config entry `key` of `options`: *has = whether it is set, *value = its value if so.
inline OrtStatus* session_config_entry(const OrtApi* api, const OrtSessionOptions* options, const char* key,
                                       bool* has, std::string* value) {
  using Has = OrtStatus* (*)(const OrtSessionOptions*, const char*, int*);
  using Get = OrtStatus* (*)(const OrtSessionOptions*, const char*, char*, size_t*);
  int set = 0;
  if (OrtStatus* s = fn<Has>(api, kHasSessionConfigEntry)(options, key, &set)) return s;
  *has = set != 0;
  value->clear();
  if (!set) return nullptr;
  size_t size = 0;  // with no buffer: the value's size, its terminating NUL included
  if (OrtStatus* s = fn<Get>(api, kGetSessionConfigEntry)(options, key, nullptr, &size)) return s;
  std::vector<char> text(size);
  if (OrtStatus* s = fn<Get>(api, kGetSessionConfigEntry)(options, key, text.data(), &size)) return s;
  value->assign(text.data());
  return nullptr;
}

// The OrtCustomOp members every op here fills alike: the API version, the CPU provider, required
// inputs and outputs in CPU memory, no variadic arguments, and the status-returning V2 callbacks.
// The caller fills GetName, the type callbacks and KernelDestroy.
inline void fill_common(OrtCustomOpLayout& t,
                        OrtStatus* (*create)(const OrtCustomOpLayout*, const OrtApi*, const OrtKernelInfo*, void**),
                        OrtStatus* (*compute)(void*, OrtKernelContext*)) {
  t.version = kApiVersion;
  t.GetExecutionProviderType = [](const OrtCustomOpLayout*) -> const char* { return nullptr; };
  t.GetInputCharacteristic = [](const OrtCustomOpLayout*, size_t) -> int { return kOrtIoRequired; };
  t.GetOutputCharacteristic = [](const OrtCustomOpLayout*, size_t) -> int { return kOrtIoRequired; };
  t.GetInputMemoryType = [](const OrtCustomOpLayout*, size_t) -> int { return kOrtMemTypeDefault; };
  t.GetVariadicInputMinArity = [](const OrtCustomOpLayout*) { return 1; };
  t.GetVariadicInputHomogeneity = [](const OrtCustomOpLayout*) { return 1; };
  t.GetVariadicOutputMinArity = [](const OrtCustomOpLayout*) { return 1; };
  t.GetVariadicOutputHomogeneity = [](const OrtCustomOpLayout*) { return 1; };
  t.CreateKernelV2 = create;
  t.KernelComputeV2 = compute;
}

// Body of RegisterCustomOps: one custom-op domain `name` holding `ops`, added to `options`. The
// ops must outlive every session (static storage); the domain object is never released (a few
// hundred bytes per registration).
inline OrtStatus* register_ops(OrtSessionOptions* options, const OrtApiBase* base, const char* name,
                               const OrtCustomOpLayout* const* ops, size_t count) {
  const OrtApi* api = base->GetApi(kApiVersion);
  if (api == nullptr) {  // older than 1.17: report it through the version-1 API, which always exists
    char msg[256];
    std::snprintf(msg, sizeof msg, "the %s custom ops need onnxruntime >= 1.17 (C API %u), this is "
                  "onnxruntime %s", name, kApiVersion, base->GetVersionString());
    return fn<CreateStatusFn>(base->GetApi(1), kCreateStatus)(kOrtFail, msg);
  }
  using CreateDomain = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
  using DomainAdd = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOpLayout*);
  using AddDomain = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = fn<CreateDomain>(api, kCreateCustomOpDomain)(name, &domain)) return s;
  for (size_t i = 0; i < count; ++i)
    if (OrtStatus* s = fn<DomainAdd>(api, kCustomOpDomainAdd)(domain, ops[i])) return s;
  return fn<AddDomain>(api, kAddCustomOpDomain)(options, domain);
}

}  // namespace ort
