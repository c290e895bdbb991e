"""Triton compact: one launch scans keep, gathers the kept rows and writes the count.

Each program owns a slice of the row (BLOCK_E elements) and walks the rows in blocks of
BLOCK_R, carrying the running count of kept rows: the scan is `tl.cumsum` over the block plus
that carry, so no second pass and no cross-program communication is needed. Rows are moved
as raw integers (the widest that divides the row), so every dtype and memory layout that
keeps a sample dense (contiguous, channels_last) is one kernel.
"""
import torch
import triton
import triton.language as tl

_INT_VIEWS = (torch.int64, torch.int32, torch.int16, torch.uint8)


@triton.jit
def _compact_kernel(x_ptr, keep_ptr, index_ptr, out_ptr, index_out_ptr, count_ptr,
                    rows, row_elems,
                    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < row_elems
    kept_before = tl.zeros((), dtype=tl.int64)
    for start in range(0, rows, BLOCK_R):
        row = start + tl.arange(0, BLOCK_R)
        row_ok = row < rows
        keep = tl.load(keep_ptr + row, mask=row_ok, other=0).to(tl.int32)
        destination = kept_before + tl.cumsum(keep, axis=0).to(tl.int64) - 1
        take = (keep != 0) & row_ok
        tile_mask = take[:, None] & col_ok[None, :]
        values = tl.load(x_ptr + row.to(tl.int64)[:, None] * row_elems + cols[None, :],
                         mask=tile_mask)
        tl.store(out_ptr + destination[:, None] * row_elems + cols[None, :], values,
                 mask=tile_mask)
        if pid == 0:
            index = tl.load(index_ptr + row, mask=take)
            tl.store(index_out_ptr + destination, index, mask=take)
        kept_before += tl.sum(keep, axis=0).to(tl.int64)
    if pid == 0:
        tl.store(count_ptr, kept_before)


def _row_integer(dense: torch.Tensor) -> torch.dtype:
    """The widest integer that divides a row of a row-dense tensor and its data pointer's
    alignment (a view into a larger buffer may start at any element)."""
    row_bytes = dense[:1].numel() * dense.element_size()
    for dtype in _INT_VIEWS:
        width = torch.empty((), dtype=dtype).element_size()
        if row_bytes % width == 0 and dense.data_ptr() % width == 0:
            return dtype
    return torch.uint8


def _rows_as(dense: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, n) view of the rows of a row-dense tensor as the integer dtype."""
    return dense.reshape(rows, -1).view(torch.uint8).view(dtype)


def compact(x: torch.Tensor, keep: torch.Tensor, index: torch.Tensor):
    """(x[keep], index[keep]) with one launch and one read of the count by the host.

    Inputs are validated by the caller (occam_kernels.ops.compact).
    """
    rows = x.shape[0]
    channels_last = (x.dim() == 4 and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last))
    # NHWC order makes a channels_last batch plain row-major; the output goes back the same way.
    dense = x.permute(0, 2, 3, 1) if channels_last else x.contiguous()
    out_dense = torch.empty_like(dense, memory_format=torch.contiguous_format)
    index_out = torch.empty_like(index)
    if rows > 0 and dense.numel() > 0:
        # One integer for both sides, chosen by the source: the kernel indexes both with the
        # source's row length (the fresh output is always aligned; the input need not be).
        row_integer = _row_integer(dense)
        src, dst = _rows_as(dense, rows, row_integer), _rows_as(out_dense, rows, row_integer)
        count = torch.zeros(1, dtype=torch.int64, device=x.device)
        row_elems = src.shape[1]
        # A tile of at most 4,096 integers (32 per thread at 4 warps): 16 x 1,024 int64 tiles
        # spilled at the stage shapes (bench/CODEGEN.md). Narrower column slices also mean
        # more programs for wide rows.
        block_e = min(256, triton.next_power_of_2(row_elems))
        block_r = min(triton.next_power_of_2(rows), max(16, 4096 // block_e))
        grid = (triton.cdiv(row_elems, block_e),)
        _compact_kernel[grid](src, keep.contiguous(), index.contiguous(), dst, index_out,
                              count, rows, row_elems, BLOCK_R=block_r, BLOCK_E=block_e)
        kept = int(count.item())  # the one device->host sync
    else:
        # Nothing to move (B=0 or empty rows): the count alone is needed.
        kept = int(keep.sum().item()) if rows > 0 else 0
        index_out[:kept] = index[keep]
    out = out_dense[:kept]
    if channels_last:
        out = out.permute(0, 3, 1, 2)
    return out, index_out[:kept]
