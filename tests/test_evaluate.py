"""Point matching equals a brute-force optimal assignment; annotation files parse."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from lightsheet.errors import AnnotationError
from lightsheet.evaluate import match_points, read_points


def brute_force(found, truth, r):
    dist = np.linalg.norm(found[:, None] - truth[None], axis=2)
    big = 1e6
    cost = np.where(dist <= r, dist - big, 0.0)
    a, b = linear_sum_assignment(cost)
    ok = cost[a, b] < 0
    return int(ok.sum()), float((cost[a, b][ok] + big).sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_matching_equals_dense_assignment(n_found, n_truth, seed):
    rng = np.random.default_rng(seed)
    found = rng.uniform(0, 30, (n_found, 3))
    truth = rng.uniform(0, 30, (n_truth, 3))
    s = match_points(found, truth, max_distance_um=6.0)
    if n_found and n_truth:
        tp, total = brute_force(found, truth, 6.0)
        assert s.tp == tp
        assert s.distances_um.sum() == pytest.approx(total)
    assert s.tp + s.fp == n_found and s.tp + s.fn == n_truth
    assert len(set(s.pairs[:, 0])) == s.tp == len(set(s.pairs[:, 1]))
    assert np.all(s.distances_um <= 6.0)


def test_more_matches_beat_shorter_distances():
    # greedy nearest matching would pair f0-t0 (distance 1) and leave t1 unmatched
    found = np.array([[0, 0, 0.0], [0, 0, 5.5]])
    truth = np.array([[0, 0, 1.0], [0, 0, -4.5]])
    s = match_points(found, truth, max_distance_um=5.0)
    assert s.tp == 2 and s.f1 == 1.0


def test_per_annotation_radius():
    s = match_points([[0, 0, 0.0]], [[0, 0, 3.0]], max_distance_um=np.array([2.0]))
    assert s.tp == 0 and s.fp == 1 and s.fn == 1


def test_read_points_csv_and_cellcounter(tmp_path):
    (tmp_path / "p.csv").write_text("z,y,x,n_voxels\n1.5,2,3,10\n4,5,6,7\n")
    assert read_points(tmp_path / "p.csv").tolist() == [[1.5, 2, 3], [4, 5, 6]]
    xml = """<?xml version="1.0"?><CellCounter_Marker_File><Marker_Data>
      <Marker_Type><Type>1</Type><Marker><MarkerX>9</MarkerX><MarkerY>8</MarkerY>
      <MarkerZ>7</MarkerZ></Marker></Marker_Type>
      <Marker_Type><Type>2</Type><Marker><MarkerX>3</MarkerX><MarkerY>2</MarkerY>
      <MarkerZ>1</MarkerZ></Marker></Marker_Type></Marker_Data></CellCounter_Marker_File>"""
    (tmp_path / "c.xml").write_text(xml)
    assert read_points(tmp_path / "c.xml").tolist() == [[7, 8, 9], [1, 2, 3]]
    assert read_points(tmp_path / "c.xml", cell_type=2).tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.csv", "a,b\n1,2\n", r"no column\(s\) \['z', 'y', 'x'\]"),
        ("b.xml", "<x><y/>", "not a readable XML"),
        ("c.xml", "<Other/>", "expected a Fiji CellCounter"),
    ],
)
def test_bad_annotation_files_are_named(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=match):
        read_points(tmp_path / name)
    with pytest.raises(AnnotationError, match="not found"):
        read_points(tmp_path / "missing.csv")
