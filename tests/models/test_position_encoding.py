"""Sine positional encodings: shapes, closed-form values, padding invariance, DAB ordering."""

import math

import torch

from oddetr.models.position_encoding import PositionEmbeddingSine, sine_embed


def test_shapes_and_dtype():
    pe = PositionEmbeddingSine(num_pos_feats=16)
    out = pe(torch.zeros(2, 5, 7, dtype=torch.bool))
    assert out.shape == (2, 32, 5, 7) and out.dtype == torch.float32
    assert sine_embed(torch.rand(3, 4, 2), 16).shape == (3, 4, 32)
    assert sine_embed(torch.rand(3, 4, 4), 16).shape == (3, 4, 64)
    assert sine_embed(torch.rand(5, 4).double(), 8).dtype == torch.float64


def test_closed_form_values():
    # 4 x 5 unpadded map, normalised with offset -0.5: pixel (i, j) has y = (i + 0.5) / 4 * 2pi,
    # x = (j + 0.5) / 5 * 2pi; feature 2m is sin(c / T^(2m/F)), 2m+1 is cos(c / T^(2m/F))
    f, t = 8, 10000.0
    pe = PositionEmbeddingSine(num_pos_feats=f, temperature=t)
    out = pe(torch.zeros(1, 4, 5, dtype=torch.bool)).double()
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        y = (i + 1 - 0.5) / (4 + eps) * 2 * math.pi
        x = (j + 1 - 0.5) / (5 + eps) * 2 * math.pi
        expected = []
        for c in (y, x):
            for m in range(f // 2):
                freq = t ** (2 * m / f)
                expected += [math.sin(c / freq), math.cos(c / freq)]
        torch.testing.assert_close(
            out[0, :, i, j], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5
        )
    # pixel (0, 0): first pair is (sin(pi/4), cos(pi/4)) for y = 0.5/4*2pi = pi/4
    torch.testing.assert_close(
        out[0, :2, 0, 0],
        torch.tensor([math.sin(math.pi / 4), math.cos(math.pi / 4)], dtype=torch.float64),
        rtol=0,
        atol=1e-5,
    )


def test_unnormalized_counts_pixels():
    pe = PositionEmbeddingSine(num_pos_feats=4, normalize=False)
    out = pe(torch.zeros(1, 3, 3, dtype=torch.bool))
    # y channel 0 at row i is sin(i + 1); x channel 4 + 1 at column j is cos(j + 1)
    torch.testing.assert_close(out[0, 0, :, 0], torch.sin(torch.tensor([1.0, 2.0, 3.0])))
    torch.testing.assert_close(out[0, 5, 0, :], torch.cos(torch.tensor([1.0, 2.0, 3.0])))


def test_padding_invariance():
    pe = PositionEmbeddingSine(num_pos_feats=16)
    small = pe(torch.zeros(1, 6, 9, dtype=torch.bool))
    mask = torch.zeros(2, 10, 13, dtype=torch.bool)
    mask[0, 6:, :] = True  # image 0 is 6x9 padded bottom/right in a 10x13 batch
    mask[0, :, 9:] = True
    mask[1, :, 12:] = True
    big = pe(mask)
    torch.testing.assert_close(big[0, :, :6, :9], small[0])
    torch.testing.assert_close(big[1, :, :, :12], pe(torch.zeros(1, 10, 12, dtype=torch.bool))[0])


def test_sine_embed_order_matches_dab_detr():
    coords = torch.tensor([[0.1, 0.7, 0.3, 0.2]], dtype=torch.float64)
    f = 8

    def one(c):
        return sine_embed(torch.tensor([[c]], dtype=torch.float64), f)[0]

    emb4 = sine_embed(coords, f)[0]
    cx, cy, w, h = coords[0].tolist()
    torch.testing.assert_close(emb4, torch.cat([one(cy), one(cx), one(w), one(h)]))
    emb2 = sine_embed(coords[:, :2], f)[0]
    torch.testing.assert_close(emb2, emb4[: 2 * f])
    # closed form for a single coordinate: c * 2pi / T^(2m/F), sin/cos interleaved
    c = 0.7 * 2 * math.pi
    expected = [fn(c / 10000 ** (2 * m / f)) for m in range(f // 2) for fn in (math.sin, math.cos)]
    torch.testing.assert_close(one(0.7), torch.tensor(expected, dtype=torch.float64))


def test_sine_embed_matches_feature_map_embedding():
    # the map embedding at a pixel centre equals sine_embed of that centre (y first, then x)
    pe = PositionEmbeddingSine(num_pos_feats=8)
    out = pe(torch.zeros(1, 4, 5, dtype=torch.bool))
    centre = torch.tensor([(3 + 0.5) / 5, (2 + 0.5) / 4])  # pixel (i=2, j=3) as (x, y)
    torch.testing.assert_close(out[0, :, 2, 3], sine_embed(centre, 8), rtol=0, atol=1e-5)
