"""Structure detection (sparsekit.structure) on masks built directly: N:M along the input channels,
RxC blocks of the 2-D view, constant fan-in with ablation; the declared-granularity check; a one-entry
change breaks each pattern; torch and float inputs read as their nonzeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from structured_masks import block_mask, fanin_mask, nm_mask, weights_for

from sparsekit import structure as st


def loop_is_nm(mask: np.ndarray, n: int, m: int) -> bool:
    """The contract's geometry, one group at a time: M consecutive input channels at one (o, *kernel)."""
    if mask.shape[1] % m:
        return False
    for o in range(mask.shape[0]):
        for k in np.ndindex(*mask.shape[2:]):
            for g in range(0, mask.shape[1], m):
                if sum(bool(mask[(o, i, *k)]) for i in range(g, g + m)) != n:
                    return False
    return True


@pytest.mark.parametrize("shape,n,m", [((8, 16), 2, 4), ((6, 8), 1, 4), ((4, 16), 4, 8),
                                       ((4, 8, 3, 3), 2, 4), ((3, 16, 1, 2), 1, 2)])
def test_nm_masks_are_detected_with_the_contract_geometry(shape, n, m):
    mask = nm_mask(shape, n, m, seed=3)
    assert loop_is_nm(mask, n, m)
    assert st.is_nm(mask, n, m)
    assert st.detect_nm(mask) == st.NM(n, m)  # these random masks are not also n/2:m/2
    groups = st.nm_groups(mask, m)
    assert groups.shape == (mask.size // m, m) and np.all(groups.sum(1) == n)
    # group order visits every entry once, and each group's entries are m consecutive input channels
    order = st.nm_order(shape)
    assert sorted(order.tolist()) == list(range(mask.size))
    assert np.array_equal(mask.reshape(-1)[order].reshape(-1, m), groups)


def test_conv_nm_groups_run_along_input_channels_not_kernel_taps():
    mask = np.zeros((1, 4, 1, 2), bool)
    mask[0, :2, 0, 0] = True   # tap 0: channels 0,1 of 4 -> 2:4
    mask[0, 2:, 0, 1] = True   # tap 1: channels 2,3 of 4 -> 2:4
    assert st.is_nm(mask, 2, 4) and loop_is_nm(mask, 2, 4)
    flat_rows = mask.reshape(1, -1)  # (i, kh, kw) flattened: [1,0,1,0,0,1,0,1] is 2:4 too, but 1:2 is not
    assert not st.is_nm(mask, 1, 2) and st.is_nm(flat_rows, 1, 2)


def test_one_moved_entry_breaks_nm_and_the_smallest_m_wins():
    mask = nm_mask((8, 16), 2, 4)
    assert st.detect_nm(mask) == st.NM(2, 4)
    broken = mask.copy()
    row, col = 5, int(np.flatnonzero(~mask[5, :4])[0])
    broken[row, col] = True  # 3 of 4 in one group
    assert not st.is_nm(broken, 2, 4) and st.detect_nm(broken) is None
    assert st.detect_nm(np.ones((4, 8), bool)) is None and st.detect_nm(np.zeros((4, 8), bool)) is None
    assert st.detect_nm(nm_mask((4, 8), 4, 8, seed=1)) in (st.NM(4, 8), st.NM(2, 4), st.NM(1, 2))
    assert st.nm_groups(np.ones((4, 6), bool), 4) is None  # 6 inputs do not split into groups of 4


@pytest.mark.parametrize("shape,r,c", [((32, 12), 4, 1), ((32, 16), 16, 1), ((8, 12), 1, 4), ((8, 8), 2, 2),
                                       ((8, 4, 3, 3), 4, 1), ((16, 16), 4, 4)])
def test_blocks_are_detected_and_their_grid_is_exact(shape, r, c):
    mask = block_mask(shape, r, c, 0.3, seed=2)
    grid = st.block_grid(mask, r, c)
    m2 = mask.reshape(shape[0], -1)
    assert grid.shape == (shape[0] // r, m2.shape[1] // c)
    for i, j in np.ndindex(*grid.shape):
        assert grid[i, j] == m2[i * r, j * c] and np.all(m2[i * r:(i + 1) * r, j * c:(j + 1) * c] == grid[i, j])
    found = st.detect_block(mask)
    assert found is not None and found.r * found.c >= r * c and st.is_block(mask, found.r, found.c)


def test_block_detection_picks_the_largest_candidate_and_refuses_a_partial_block():
    mask = block_mask((32, 8), 16, 1, 0.4, seed=5)
    assert st.detect_block(mask) == st.Block(16, 1)        # also 8x1, 4x1, 2x1: the largest wins
    mask4 = block_mask((32, 8), 4, 1, 0.4, seed=6)
    mask4[:16] = mask4[16:] = False
    mask4[0:4, 0] = mask4[4:8, 1] = True                   # 4x1 blocks that do not pair into 8x1
    assert st.detect_block(mask4) == st.Block(4, 1)
    partial = mask4.copy()
    partial[3, 0] = False
    assert st.block_grid(partial, 4, 1) is None and st.detect_block(partial) is None  # rows 0..2 on, 3 off
    assert st.detect_block(np.eye(8, dtype=bool)) is None
    assert st.block_grid(np.ones((6, 8), bool), 4, 1) is None  # 6 rows do not tile by 4


def test_fanin_reports_k_ablated_rows_and_refuses_uneven_rows():
    f = st.fanin(fanin_mask((10, 20), 3))
    assert f == st.FanIn(3, (), 0) and f.constant
    f = st.fanin(fanin_mask((10, 20), 3, ablated=(2, 7), long_rows=(0, 4, 5)))
    assert f == st.FanIn(3, (2, 7), 3) and not f.constant
    assert st.fanin(fanin_mask((10, 20), 3, long_rows=(1,))) is None       # K+1 with nothing ablated
    uneven = fanin_mask((10, 20), 3, ablated=(2,))
    uneven[4, np.flatnonzero(~uneven[4])[:2]] = True                       # one row with K+2
    assert st.fanin(uneven) is None
    assert st.fanin(np.zeros((4, 4), bool)) is None
    conv = fanin_mask((6, 2, 3, 3), 5)
    assert st.fanin(conv) == st.FanIn(5, (), 0)                            # rows of the (out, i·kh·kw) view


@pytest.mark.parametrize("spec,mask,ok", [
    ("unstructured", np.eye(4, dtype=bool), True),
    ("2:4", nm_mask((4, 8), 2, 4), True),
    ("2:4", nm_mask((4, 8), 1, 4), False),
    ("4x1", block_mask((8, 8), 4, 1), True),
    ("1x4", block_mask((8, 8), 4, 1), False),
    ("fanin", fanin_mask((8, 8), 2), True),
    ("fanin", fanin_mask((8, 8), 2, ablated=(1,), long_rows=(2, 3)), False),
    ("fanin+ablate", fanin_mask((8, 8), 2, ablated=(1,), long_rows=(2, 3)), True),
    ("fanin+ablate=0.3", fanin_mask((8, 8), 2, ablated=(1,)), True),
])
def test_conforms_to_a_declared_granularity(spec, mask, ok):
    assert st.conforms(mask, spec) is ok


def test_bad_specs_are_refused_and_parsing_is_canonical():
    assert st.parse_spec("2:4") == st.NM(2, 4) and st.parse_spec("4x1") == st.Block(4, 1)
    assert st.parse_spec("FanIn+ablate=0.5") == "fanin+ablate" and st.parse_spec("unstructured") == "unstructured"
    for bad in ("4:2", "0:4", "2:2", "0x4", "fan-in", "", "2:4:8"):
        with pytest.raises(ValueError, match="granularity"):
            st.parse_spec(bad)


def test_float_and_torch_inputs_count_their_nonzeros():
    mask = nm_mask((8, 16), 2, 4)
    w = weights_for(mask)
    assert st.is_nm(w, 2, 4) and st.is_nm(torch.from_numpy(w), 2, 4) and st.is_nm(torch.from_numpy(mask), 2, 4)
    assert st.describe(w) == {"nm": "2:4", "block": None, "fanin": {"k": 8, "ablated": [], "long_rows": 0}}
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        st.matrix(np.ones(4))


def test_detection_is_vectorised_on_a_large_layer():
    import time

    mask = nm_mask((2048, 2048), 2, 4)
    start = time.perf_counter()
    st.describe(mask)
    assert time.perf_counter() - start < 5.0  # a python loop over 1M groups would take far longer
