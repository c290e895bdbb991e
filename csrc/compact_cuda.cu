// compact on CUDA: one launch computes the scan of keep, gathers the kept rows and writes the
// count to device memory; the host reads the count once (the only device->host sync).
//
// Grid: blockIdx.x owns a run of `rows_per_block` consecutive rows, blockIdx.y a slice of
// each row's bytes. A block finds where its rows go by counting the kept rows before its
// run (cheap: keep is B bytes, read from L2) and scanning its own run; no second launch and
// no inter-block waiting.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "compact.h"

namespace occam {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRowsPerBlock = 64;
constexpr int64_t kMaxRowBlocks = 1024;

// keep is read as bytes, any nonzero one kept (as x[keep]): a mask viewed as bool may hold
// bytes other than 0 and 1, which read as bool are undefined.
template <typename Vec>
__global__ void compact_rows_kernel(const uint8_t* __restrict__ keep, int64_t rows,
                                    int rows_per_block, const Vec* __restrict__ x,
                                    Vec* __restrict__ out, int64_t row_vecs,
                                    int64_t vecs_per_slice, const int64_t* __restrict__ index,
                                    int64_t* __restrict__ index_out,
                                    int64_t* __restrict__ count) {
  __shared__ int64_t destination[kMaxRowsPerBlock];
  __shared__ int64_t block_kept;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last_row = min(first_row + rows_per_block, rows);

  // Kept rows before this block's run: __syncthreads_count sums a predicate over the block.
  int64_t before = 0;
  for (int64_t start = 0; start < first_row; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    before += __syncthreads_count(i < first_row && keep[i] != 0);
  }
  if (threadIdx.x == 0) {
    int64_t next = before;
    for (int64_t i = first_row; i < last_row; ++i) {
      destination[i - first_row] = keep[i] != 0 ? next++ : -1;
    }
    block_kept = next - before;
  }
  __syncthreads();

  if (blockIdx.y == 0) {
    for (int64_t i = first_row + threadIdx.x; i < last_row; i += kThreads) {
      const int64_t d = destination[i - first_row];
      if (d >= 0) index_out[d] = index[i];
    }
    if (threadIdx.x == 0 && last_row == rows) *count = before + block_kept;
  }

  const int64_t slice_begin = static_cast<int64_t>(blockIdx.y) * vecs_per_slice;
  const int64_t slice_end = min(slice_begin + vecs_per_slice, row_vecs);
  for (int64_t i = first_row; i < last_row; ++i) {
    const int64_t d = destination[i - first_row];
    if (d < 0) continue;
    const Vec* src = x + i * row_vecs;
    Vec* dst = out + d * row_vecs;
    for (int64_t v = slice_begin + threadIdx.x; v < slice_end; v += kThreads) dst[v] = src[v];
  }
}

template <typename Vec>
void launch(const at::Tensor& keep, int64_t rows, const void* x, void* out, int64_t row_bytes,
            const at::Tensor& index, at::Tensor& index_out, at::Tensor& count) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  // Enough row blocks to spread the rows, few enough that the prefix counts stay cheap.
  const int64_t row_blocks_wanted = std::min<int64_t>(rows, kMaxRowBlocks);
  int rows_per_block = static_cast<int>(
      std::min<int64_t>(kMaxRowsPerBlock, (rows + row_blocks_wanted - 1) / row_blocks_wanted));
  const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;
  // Each block copies at least ~4 vectors per thread of a row; at most 65535 slices.
  const int64_t min_slice = static_cast<int64_t>(kThreads) * 4;
  const int64_t slices =
      std::max<int64_t>(1, std::min<int64_t>(65535, (row_vecs + min_slice - 1) / min_slice));
  const int64_t vecs_per_slice = std::max<int64_t>(1, (row_vecs + slices - 1) / slices);
  TORCH_CHECK(row_blocks <= 2147483647LL, "compact: too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(slices));
  compact_rows_kernel<Vec><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>()), rows, rows_per_block,
      static_cast<const Vec*>(x),
      static_cast<Vec*>(out), row_vecs, vecs_per_slice, index.data_ptr<int64_t>(),
      index_out.data_ptr<int64_t>(), count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned(const void* p, int64_t bytes, int64_t vec) {
  return reinterpret_cast<uintptr_t>(p) % vec == 0 && bytes % vec == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compact_cuda(const at::Tensor& x, const at::Tensor& keep,
                                                const at::Tensor& index) {
  check_compact_inputs(x, keep, index);
  const c10::cuda::CUDAGuard guard(x.device());
  const RowLayout layout = row_layout(x);
  if (layout.rows == 0) return {empty_rows(layout, 0), at::empty({0}, index.options())};
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor index_c = index.contiguous();
  // The count is unknown before the launch: gather into B rows, then narrow to the count.
  at::Tensor out = empty_rows(layout, layout.rows);
  at::Tensor index_out = at::empty({layout.rows}, index.options());
  at::Tensor count = at::empty({1}, index.options());
  const void* src = layout.x.data_ptr();
  void* dst = out.data_ptr();
  const int64_t bytes = layout.row_bytes;
  if (aligned(src, bytes, 16) && aligned(dst, bytes, 16)) {
    launch<int4>(keep_c, layout.rows, src, dst, bytes, index_c, index_out, count);
  } else if (aligned(src, bytes, 8) && aligned(dst, bytes, 8)) {
    launch<int2>(keep_c, layout.rows, src, dst, bytes, index_c, index_out, count);
  } else if (aligned(src, bytes, 4) && aligned(dst, bytes, 4)) {
    launch<int>(keep_c, layout.rows, src, dst, bytes, index_c, index_out, count);
  } else if (aligned(src, bytes, 2) && aligned(dst, bytes, 2)) {
    launch<int16_t>(keep_c, layout.rows, src, dst, bytes, index_c, index_out, count);
  } else {
    launch<int8_t>(keep_c, layout.rows, src, dst, bytes, index_c, index_out, count);
  }
  const int64_t kept = count.item<int64_t>();  // the one device->host sync
  return {out.narrow(0, 0, kept), index_out.narrow(0, 0, kept)};
}

TORCH_LIBRARY_IMPL(occam, CUDA, m) { m.impl("compact", &compact_cuda); }

}  // namespace occam
