// The portable build of the GGUF kernels (any x86-64 or other CPU).
#include "gguf_blocks.h"
namespace gguf_generic {
#define GGUF_VNNI 0
#include "gguf_gemv_impl.h"
#include "gguf_f32_impl.h"
#undef GGUF_VNNI
}  // namespace gguf_generic
