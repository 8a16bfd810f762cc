// The parts of onnxruntime's C ABI that cpu_ops.cc uses, declared here so the library builds with
// nothing but a C++ compiler (the onnxruntime wheel ships no headers).
//
// onnxruntime hands a custom-op library an `OrtApiBase`; `GetApi(version)` returns the `OrtApi`
// table: a struct of function pointers that only ever grows at the end, so a function's slot index
// is fixed forever (the C API's ABI promise). We read the handful of slots we need by index instead
// of declaring the whole struct. Slot indices, signatures and the `OrtCustomOp` layout follow
// onnxruntime's public C API (include/onnxruntime/core/session/onnxruntime_c_api.h); every slot used
// here exists since API version 17 (onnxruntime 1.17), which is what the library asks for.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {
// Opaque handles.
struct OrtApi;
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
};

// ONNXTensorElementDataType (values 0..23 equal ONNX's TensorProto.DataType)
enum OrtElemType : int { kOrtUndefined = 0, kOrtFloat = 1, kOrtBFloat16 = 16 };

// OrtErrorCode
enum OrtErrCode : int { kOrtFail = 1, kOrtInvalidArgument = 2 };

// OrtCustomOpInputOutputCharacteristic and OrtMemType
enum OrtIoCharacteristic : int { kOrtIoRequired = 0 };
enum OrtMemTypeValue : int { kOrtMemTypeDefault = 0 };

// struct OrtCustomOp, member for member. `version` tells onnxruntime which members it may read:
// >= 16 enables CreateKernelV2 / KernelComputeV2 (errors come back as an OrtStatus), 17 the
// start/end versions and shape inference (left NULL here: schema version 1, shapes at run time).
struct OrtCustomOpLayout {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOpLayout* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOpLayout* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOpLayout* op);  // NULL: the CPU provider
  int (*GetInputType)(const OrtCustomOpLayout* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOpLayout* op);
  int (*GetOutputType)(const OrtCustomOpLayout* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOpLayout* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOpLayout* op, size_t index);
  int (*GetOutputCharacteristic)(const OrtCustomOpLayout* op, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOpLayout* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOpLayout* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOpLayout* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOpLayout* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOpLayout* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOpLayout* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOpLayout* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const OrtCustomOpLayout* op);
  int (*GetEndVersion)(const OrtCustomOpLayout* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};
static_assert(sizeof(void*) != 8 || sizeof(OrtCustomOpLayout) == 208, "OrtCustomOp layout");
}  // extern "C"

namespace ort {

constexpr uint32_t kApiVersion = 17;  // the API version requested and declared by the custom ops

// Slot indices in the OrtApi table, and the signature of each.
enum Slot : size_t {
  kCreateStatus = 0,                   // OrtStatus* (int code, const char* msg)
  kCreateCustomOpDomain = 26,          // OrtStatus* (const char* domain, OrtCustomOpDomain** out)
  kCustomOpDomainAdd = 27,             // OrtStatus* (OrtCustomOpDomain*, const OrtCustomOp*)
  kAddCustomOpDomain = 28,             // OrtStatus* (OrtSessionOptions*, OrtCustomOpDomain*)
  kGetTensorMutableData = 51,          // OrtStatus* (OrtValue*, void** out)
  kGetDimensionsCount = 61,            // OrtStatus* (const OrtTensorTypeAndShapeInfo*, size_t* out)
  kGetDimensions = 62,                 // OrtStatus* (const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)
  kGetTensorTypeAndShape = 65,         // OrtStatus* (const OrtValue*, OrtTensorTypeAndShapeInfo** out)
  kKernelInfoGetAttributeFloat = 85,   // OrtStatus* (const OrtKernelInfo*, const char* name, float* out)
  kKernelInfoGetAttributeInt64 = 86,   // OrtStatus* (const OrtKernelInfo*, const char* name, int64_t* out)
  kKernelContextGetInput = 90,         // OrtStatus* (const OrtKernelContext*, size_t, const OrtValue** out)
  kKernelContextGetOutput = 91,        // OrtStatus* (OrtKernelContext*, size_t, const int64_t* dims, size_t n, OrtValue** out)
  kReleaseStatus = 93,                 // void (OrtStatus*)
  kReleaseTensorTypeAndShapeInfo = 99, // void (OrtTensorTypeAndShapeInfo*)
  kHasSessionConfigEntry = 237,        // OrtStatus* (const OrtSessionOptions*, const char* key, int* out)
  kGetSessionConfigEntry = 238,        // OrtStatus* (const OrtSessionOptions*, const char* key, char* value, size_t* size)
  kKernelContextParallelFor = 274,     // OrtStatus* (const OrtKernelContext*, void (*)(void*, size_t), size_t total, size_t num_batch, void* data)
};

template <typename Fn>
inline Fn fn(const OrtApi* api, Slot slot) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[slot]);
}

}  // namespace ort
