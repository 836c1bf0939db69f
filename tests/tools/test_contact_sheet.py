"""The contact sheet: what it marks, and its command line with and without a model."""
import numpy as np
import pytest
import torch
from PIL import Image

from swift_sophia.model.pruning import FramePruner, representative_frame
from swift_sophia.tools import contact_sheet as CS

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def coloured_frames(shots, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    nf = shots[-1][1]
    frames = np.zeros((nf, h, w, 3), np.uint8)
    for i, (a, b) in enumerate(shots):
        for n in range(a, b):
            frames[n] = np.clip(np.array(COLOURS[i % 4]) + rng.normal(0, 25, (h, w, 3)), 0, 255)
    return frames


def centre(img, box):
    x0, y0, x1, y1 = box
    return np.asarray(img.crop((x0 + 10, y0 + 10, x1 - 10, y1 - 10)).convert('RGB'), np.float32).reshape(-1, 3)


def border(img, box):
    x0, y0, x1, y1 = box
    return np.asarray(img.convert('RGB'))[y1 - 2, (x0 + x1) // 2 - 5:(x0 + x1) // 2 + 5].astype(np.float32)


def test_sheet_marks_dropped_shots_and_frames(tmp_path):
    shots = [(0, 4), (4, 5), (5, 10), (10, 14)]
    frames = coloured_frames(shots)
    feats = CS.pixel_features(frames)
    assert feats.shape == (14, 64, 192)
    p = FramePruner(feats.shape[-1]).eval()
    query = feats[representative_frame(shots[2])][:5]  # the query "is" shot 3's representative
    sel = p.select(feats, shots, query, alpha=30, beta=30)
    assert sel.kept_shots.tolist() != [0, 1, 2, 3] and 2 in sel.kept_shots.tolist()
    dropped_shot = sel.dropped_shots.tolist()[0]
    out = tmp_path / 'sheet.png'
    sheet = CS.render_contact_sheet(frames, shots, sel, 'where is the blue car?', str(out))
    img = Image.open(out)
    assert img.format == 'PNG' and img.size == sheet.size and img.size[0] > 600
    boxes = sheet.info['frame_boxes']
    assert sorted(boxes) == list(range(14))
    for n in range(*shots[dropped_shot]):  # greyed out (apart from the red cross)
        px = centre(img, boxes[n])
        assert np.median(np.abs(px - px.mean(1, keepdims=True)).max(1)) < 3
    kept = sel.keep.tolist()
    for n in kept:  # in colour, green frame
        px = centre(img, boxes[n])
        assert np.abs(px - px.mean(1, keepdims=True)).mean() > 20
        assert np.allclose(border(img, boxes[n]), CS.KEEP, atol=1)
    assert sel.intra_dropped.numel() > 0
    for n in sel.intra_dropped.tolist():  # orange frame
        assert np.allclose(border(img, boxes[n]), CS.INTRA_DROP, atol=1)


def test_sheet_edge_cases(tmp_path):
    p = FramePruner(192).eval()
    one = coloured_frames([(0, 1)])
    sel = p.select(CS.pixel_features(one), [(0, 1)], None, alpha=30, beta=30)
    CS.render_contact_sheet(one, [(0, 1)], sel, '', str(tmp_path / 'one.png'))
    many = coloured_frames([(0, 20)])
    sel = p.select(CS.pixel_features(many), [(0, 20)], torch.zeros(0, 192), alpha=30, beta=30)
    sheet = CS.render_contact_sheet(many, [(0, 20)], sel, '', None, columns=6, frame_numbers=list(range(0, 200, 10)))
    assert len(sheet.info['frame_boxes']) == 20  # wraps onto 4 rows
    with pytest.raises(ValueError):
        CS.render_contact_sheet(many[..., 0], [(0, 20)], sel, '', None)


def test_cli_without_model(tmp_path, monkeypatch, capsys):
    from clips import write_clip
    monkeypatch.setenv('SOPHIA_SHOT_CACHE', str(tmp_path / 'cache'))
    video = write_clip(tmp_path / 'v.mp4', [12, 12, 12])
    out = tmp_path / 'sheet.png'
    assert CS.main(['--video', video, '--query', 'the green part', '--out', str(out), '--num-frames', '12']) == 0
    assert Image.open(out).size[0] > 600
    assert 'frames kept' in capsys.readouterr().out  # no query: all 3 shots kept, intra-shot pruning only
    assert list((tmp_path / 'cache').rglob('*.json'))  # the shots were cached on the way


def test_cli_reports_a_missing_video(tmp_path, capsys):
    assert CS.main(['--video', str(tmp_path / 'none.mp4'), '--out', str(tmp_path / 's.png')]) == 2
    assert 'none.mp4' in capsys.readouterr().err
    assert not (tmp_path / 's.png').exists()


def test_cli_with_a_model(tmp_path, monkeypatch, tiny_model_dir):
    from clips import write_clip
    monkeypatch.setenv('SOPHIA_SHOT_CACHE', str(tmp_path / 'cache'))
    video = write_clip(tmp_path / 'v.mp4', [8, 8, 8, 8])
    out = tmp_path / 'sheet.png'
    assert CS.main(['--video', video, '--query', 'What colour is the last shot?', '--out', str(out),
                    '--model', tiny_model_dir, '--num-frames', '16', '--alpha', '50', '--beta', '30']) == 0
    assert Image.open(out).size[0] > 600
