import itertools

import numpy as np
import pytest
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.schedule import (
    SCHEDULE_256,
    SCHEDULE_512,
    SCHEDULE_1024,
    cumulative_tokens,
    parse_schedule,
    phi_index,
    phi_ticks,
    scale_levels,
    scale_slices,
    schedule_from_counts,
    schedule_from_level_buffer,
    schedule_from_levels,
    token_count,
    validate_schedule,
)


def test_official_token_counts():
    assert token_count(SCHEDULE_256) == 680
    assert token_count(SCHEDULE_512) == 2240
    assert token_count(SCHEDULE_1024) == 9451
    assert cumulative_tokens(SCHEDULE_256) == [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
    assert cumulative_tokens(SCHEDULE_512) == [1, 5, 14, 30, 66, 147, 316, 640, 1216, 2240]


def test_scale_slices_tile_the_sequence():
    slices = scale_slices(SCHEDULE_256)
    assert slices[0] == slice(0, 1) and slices[-1] == slice(424, 680)
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))


@pytest.mark.parametrize("K", [10, 14])
def test_phi_table_matches_upstream_float64_computation(K):
    expected = [int(np.argmin(np.abs(phi_ticks(4) - si / (K - 1)))) for si in range(K)]
    assert [phi_index(si, K) for si in range(K)] == expected


def test_phi_table_values_and_ties():
    assert [phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 14) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    # any other K follows the same rule; first and last scale use the first and last conv
    for K in (2, 6, 7, 12):
        idx = [phi_index(si, K) for si in range(K)]
        assert idx[0] == 0 and idx[-1] == 3 and idx == sorted(idx)
    assert [phi_index(si, 6, num_convs=1) for si in range(6)] == [0] * 6


def test_parse_and_validate():
    assert parse_schedule("256") == SCHEDULE_256
    assert parse_schedule(" 1, 2,3,4 ") == (1, 2, 3, 4)
    for bad in ["1,3,2", "2,3,4", "1", "a,b", "1,1,2"]:
        with pytest.raises(NextScaleError):
            parse_schedule(bad)
    with pytest.raises(NextScaleError, match="latent grid is 8x8"):
        validate_schedule((1, 2, 4), latent_side=8)


def test_schedule_recovery():
    levels = scale_levels(SCHEDULE_512)
    assert len(levels) == token_count(SCHEDULE_512) and levels[:6] == (0, 1, 1, 1, 1, 2)
    assert schedule_from_levels(levels) == SCHEDULE_512
    assert schedule_from_counts(680, 10) == SCHEDULE_256
    with pytest.raises(NextScaleError, match="no known schedule"):
        schedule_from_counts(123, 4)
    with pytest.raises(NextScaleError, match="not a square"):
        schedule_from_levels([0, 1, 1])


def test_schedule_from_a_level_buffer_is_checked_against_the_file():
    levels = list(scale_levels((1, 2, 3)))
    assert schedule_from_level_buffer(levels, 3, 14, "'pos_1LC'") == (1, 2, 3)
    assert schedule_from_level_buffer(levels, 3, None, "the mask") == (1, 2, 3)
    # a class token's level in front (Distilled Decoding): one more level and token than the schedule's
    with_class = [0] + [level + 1 for level in levels]
    assert schedule_from_level_buffer(with_class, 4, 15, "'pos_1LC'", lead=1) == (1, 2, 3)
    with pytest.raises(NextScaleError, match=r"describes 3 scales and 14 tokens, but .* 4 scales and 'pos_1LC' 15"):
        schedule_from_level_buffer(levels, 4, 15, "'pos_1LC'")
