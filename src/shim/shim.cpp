// vidtune's few additions to what tch exposes of libtorch: TorchScript export, bf16 autocast,
// CUDA memory figures, and the fused optimizer kernels with gradients set to none.
//
// Tracing a classifier into a TorchScript module whose weights are module attributes:
// tch's tracer bakes captured tensors into the graph as constants, which libtorch can save but
// not load again. Here every parameter and buffer is registered on the module first and mapped
// to a `prim::GetAttr` of `self` before tracing, as `torch.jit.trace` does for nn.Modules.
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/script.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/passes/fixup_trace_scope_blocks.h>
#include <torch/csrc/jit/passes/normalize_ops.h>

#include <cstring>
#include <string>
#include <vector>

namespace {
char *copy_message(const std::exception &e) {
  const char *msg = e.what();
  char *out = static_cast<char *>(std::malloc(std::strlen(msg) + 1));
  if (out != nullptr) std::strcpy(out, msg);
  return out;
}
}  // namespace

extern "C" {

// Start tracing. `params` are the classifier's tensors, `names` their attribute names (no dots);
// `input` is the example clip. Returns the module being built, or null with `*err` set.
void *vidtune_trace_begin(const char *module_name, torch::Tensor **params, const char **names,
                          int nparams, torch::Tensor *input, char **err) {
  *err = nullptr;
  try {
    if (torch::jit::tracer::isTracing()) throw std::runtime_error("cannot nest tracing calls");
    auto *module = new torch::jit::Module(module_name);
    for (int i = 0; i < nparams; ++i) {
      module->register_buffer(names[i], params[i]->detach());
    }
    auto state = std::make_shared<torch::jit::tracer::TracingState>();
    torch::jit::tracer::setTracingState(state);
    auto *self = state->graph->insertInput(0, "self")->setType(module->_ivalue()->type());
    for (int i = 0; i < nparams; ++i) {
      auto *value = state->graph->insertGetAttr(self, names[i]);
      state->setValue(*params[i], value);
    }
    auto *x = state->graph->addInput("x");
    x->setType(torch::jit::TensorType::get());
    state->setValue(*input, x);
    return module;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    *err = copy_message(e);
    return nullptr;
  }
}

// Finish tracing with `output` as the result of `forward` and save the module to `path`.
// Frees the module. Returns 0, or -1 with `*err` set.
int vidtune_trace_end_and_save(void *module_ptr, torch::Tensor *output, const char *path,
                               char **err) {
  *err = nullptr;
  auto *module = static_cast<torch::jit::Module *>(module_ptr);
  try {
    auto state = torch::jit::tracer::getTracingState();
    if (state == nullptr) throw std::runtime_error("not tracing");
    state->graph->registerOutput(state->getOutput(*output, 0));
    torch::jit::FixupTraceScopeBlocks(state->graph, module);
    torch::jit::NormalizeOps(state->graph);
    torch::jit::tracer::setTracingState(nullptr);
    auto fn = module->_ivalue()->compilation_unit()->create_function("forward", state->graph);
    module->type()->addMethod(fn);
    module->eval();
    module->save(path);
    delete module;
    return 0;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    delete module;
    *err = copy_message(e);
    return -1;
  }
}

void vidtune_free_message(char *msg) { std::free(msg); }

// bf16 automatic mixed precision on the CPU (AMX/AVX-512) or CUDA; tch's own autocast only
// covers CUDA fp16. Enter/exit nest like torch.autocast.
void vidtune_autocast_enter(int cuda) {
  const auto device = cuda ? at::kCUDA : at::kCPU;
  at::autocast::set_autocast_dtype(device, at::kBFloat16);
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::increment_nesting();
}

void vidtune_autocast_exit(int cuda, int was_enabled) {
  const auto device = cuda ? at::kCUDA : at::kCPU;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device, was_enabled != 0);
}

// GPU memory on CUDA device `device`: bytes allocated and reserved by this process's caching
// allocator, and the device's free and total memory. Returns 0, or -1 without CUDA.
int vidtune_cuda_memory(int device, int64_t *allocated, int64_t *reserved, int64_t *free_bytes,
                        int64_t *total_bytes) {
  try {
    auto *allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *allocated = stats.allocated_bytes[0].current;  // StatType::AGGREGATE
    *reserved = stats.reserved_bytes[0].current;
    const auto info = allocator->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = static_cast<int64_t>(info.first);
    *total_bytes = static_cast<int64_t>(info.second);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Turn autocast on or off for the device without touching its nesting; returns the previous
// setting (the caller restores it).
int vidtune_autocast_set(int cuda, int enabled) {
  const auto device = cuda ? at::kCUDA : at::kCPU;
  const int was = at::autocast::is_autocast_enabled(device) ? 1 : 0;
  at::autocast::set_autocast_enabled(device, enabled != 0);
  return was;
}

int vidtune_autocast_enabled(int cuda) {
  return at::autocast::is_autocast_enabled(cuda ? at::kCUDA : at::kCPU) ? 1 : 0;
}

// c10::InferenceMode for the calling thread until the matching exit: no autograd recording,
// no version counters or view tracking (what torch.inference_mode() gives evaluation).
void *vidtune_inference_mode_enter() { return new c10::InferenceMode(true); }

void vidtune_inference_mode_exit(void *guard) { delete static_cast<c10::InferenceMode *>(guard); }

namespace {
std::vector<at::Tensor> tensor_list(torch::Tensor **ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace

// Drop the gradients of `n` tensors (`zero_grad(set_to_none=True)`): the next backward writes
// fresh gradients instead of reading, adding to and writing zeroed ones.
void vidtune_clear_grads(torch::Tensor **ts, int n) {
  for (int i = 0; i < n; ++i) ts[i]->mutable_grad().reset();
}

// One SGD step over `n` parameters in libtorch's fused kernel (one pass over parameter, gradient
// and momentum buffer each; torch.optim.SGD(fused=True)). `bufs` is null without momentum; with
// `first_step` the buffers are set to the (weight-decayed) gradient, as SGD does on its first step.
// Returns 0, or -1 with `*err` set.
int vidtune_fused_sgd(torch::Tensor **params, torch::Tensor **grads, torch::Tensor **bufs, int n,
                      double lr, double momentum, double weight_decay, int first_step,
                      char **err) {
  *err = nullptr;
  try {
    const auto p = tensor_list(params, n);
    const auto g = tensor_list(grads, n);
    const auto b = bufs != nullptr ? tensor_list(bufs, n) : std::vector<at::Tensor>{};
    at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, /*dampening=*/0.0, /*nesterov=*/false,
                    /*maximize=*/false, first_step != 0);
    return 0;
  } catch (const std::exception &e) {
    *err = copy_message(e);
    return -1;
  }
}

// One Adam (or, with `decoupled`, AdamW) step over `n` parameters in libtorch's fused kernel;
// `step` is a one-element float tensor holding the step number (already counted).
int vidtune_fused_adam(torch::Tensor **params, torch::Tensor **grads, torch::Tensor **exp_avgs,
                       torch::Tensor **exp_avg_sqs, torch::Tensor *step, int n, double lr,
                       double beta1, double beta2, double eps, double weight_decay, int decoupled,
                       char **err) {
  *err = nullptr;
  try {
    const auto p = tensor_list(params, n);
    const auto g = tensor_list(grads, n);
    const auto m = tensor_list(exp_avgs, n);
    const auto v = tensor_list(exp_avg_sqs, n);
    const std::vector<at::Tensor> steps(n, *step);
    if (decoupled != 0) {
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false);
    } else {
      at::_fused_adam_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                       /*amsgrad=*/false, /*maximize=*/false);
    }
    return 0;
  } catch (const std::exception &e) {
    *err = copy_message(e);
    return -1;
  }
}

}  // extern "C"
