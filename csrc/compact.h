// Shared declarations of the compact op: input validation and the row layout both
// implementations (CPU and CUDA) agree on.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace occam {

// Rows are copied as raw bytes, so every dtype works; a tensor that is contiguous or
// channels_last keeps its memory format (each sample is one dense block either way).
struct RowLayout {
  at::Tensor x;                 // x, or a contiguous copy when its rows are not dense blocks
  at::MemoryFormat format;
  int64_t rows;
  int64_t row_bytes;
};

// The messages are assembled here as one std::string, which TORCH_CHECK passes through
// without an ostream. Why: on the GPU host (H200, torch 2.11, the extension built there,
// 2026-11-27) the two checks whose messages streamed an int64 and a shape crashed the process
// with SIGSEGV instead of raising, while the ones streaming only text and a dtype raised.
// Formatting the shape alone did not help there; this form has not run there yet.
inline std::string shape_text(const at::Tensor& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) text += ", ";
    text += std::to_string(t.size(d));
  }
  return text + "]";
}

inline std::string batch_shape_message(const char* name, const at::Tensor& x,
                                       const at::Tensor& t) {
  return std::string("compact: ") + name + " must have shape (" + std::to_string(x.size(0)) +
         ",) to match x's batch size, got " + shape_text(t);
}

inline void check_compact_inputs(const at::Tensor& x, const at::Tensor& keep,
                                 const at::Tensor& index) {
  TORCH_CHECK(x.dim() >= 1, "compact: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(keep.scalar_type() == at::kBool,
              std::string("compact: keep must be a bool tensor, got ") +
                  c10::toString(keep.scalar_type()));
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == x.size(0),
              batch_shape_message("keep", x, keep));
  TORCH_CHECK(index.scalar_type() == at::kLong,
              std::string("compact: index must be an int64 tensor, got ") +
                  c10::toString(index.scalar_type()));
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0),
              batch_shape_message("index", x, index));
  TORCH_CHECK(keep.device() == x.device() && index.device() == x.device(),
              "compact: x, keep and index must be on one device, got x on " + x.device().str() +
                  ", keep on " + keep.device().str() + ", index on " + index.device().str());
}

inline RowLayout row_layout(const at::Tensor& x) {
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  at::Tensor dense = x;
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    format = at::MemoryFormat::ChannelsLast;
  } else if (!x.is_contiguous()) {
    dense = x.contiguous();
  }
  const int64_t rows = x.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : x.numel() / rows * x.element_size();
  return {dense, format, rows, row_bytes};
}

inline at::Tensor empty_rows(const RowLayout& layout, int64_t rows) {
  auto sizes = layout.x.sizes().vec();
  sizes[0] = rows;
  return at::empty(sizes, layout.x.options().memory_format(layout.format));
}

}  // namespace occam
