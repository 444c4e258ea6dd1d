"""The shapes dataset, its evaluator and the caption tokenizer (no training here)."""

import numpy as np
import pytest
from graphsd_train.evaluate import read_shape, score_image
from graphsd_train.shapes import ALL_COMBOS, HELD_OUT, TRAIN_COMBOS, ShapesDataset, caption, parse_caption
from graphsd_train.tokenizer import train_tokenizer
from PIL import Image, ImageFilter
from transformers import CLIPTokenizer


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = ShapesDataset(seed=5, count=20), ShapesDataset(seed=5, count=20), ShapesDataset(seed=6, count=20)
    for i in range(20):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(not np.array_equal(a[i][0], c[i][0]) for i in range(20))
    img, text = a[3]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and parse_caption(text) in ALL_COMBOS


def test_held_out_combinations_never_appear_in_training_sets():
    assert len(ALL_COMBOS) == 54 and len(HELD_OUT) == 6 and len(TRAIN_COMBOS) == 48
    train = ShapesDataset(seed=1, count=480, held_out=True)
    seen = {train.sample(i).combo for i in range(len(train))}
    assert seen == set(TRAIN_COMBOS) and not seen & HELD_OUT
    full = ShapesDataset(seed=1, count=540, held_out=False)
    assert {full.sample(i).combo for i in range(len(full))} == set(ALL_COMBOS)


def test_shapes_vary_in_size_and_position_and_stay_inside():
    ds = ShapesDataset(seed=2, count=200)
    samples = [ds.sample(i) for i in range(200)]
    sizes, xs = [s.size for s in samples], [s.cx for s in samples]
    assert max(sizes) - min(sizes) > 30 and max(xs) - min(xs) > 50
    assert all(s.cx - s.size / 2 >= 0 and s.cx + s.size / 2 <= 128 for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_evaluator_reads_ground_truth_images(blur):
    ds = ShapesDataset(seed=11, count=540, held_out=False)
    correct = 0
    for i in range(len(ds)):
        img, text = ds[i]
        if blur:
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)))
        correct += score_image(img, text).correct
    assert correct / len(ds) >= 0.99


def test_evaluator_reports_what_is_wrong():
    img, _ = ShapesDataset(seed=0, count=1, held_out=False)[0]
    color, shape, bg = ShapesDataset(seed=0, count=1, held_out=False).sample(0).combo
    other_shape = next(s for s in ("circle", "square", "triangle") if s != shape)
    score = score_image(img, caption((color, other_shape, bg)))
    assert not score.correct and score.checks == {"color": True, "shape": False, "background": True}
    assert abs(score.score - 2 / 3) < 1e-9 and "shape: WRONG" in score.report()
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert read_shape(blank).shape == "none" and read_shape(blank).background == "gray"
    with pytest.raises(ValueError):
        score_image(img, "a dog")


def test_tokenizer_loads_with_clip_tokenizer_and_has_one_token_per_caption_word(tmp_path):
    captions = [caption(c) for c in TRAIN_COMBOS]
    tok = train_tokenizer(captions, tmp_path)
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == len(again) < 700
    ids = again("a purple triangle on a gray background").input_ids
    assert len(ids) == 2 + 7 and ids[0] == again.bos_token_id and ids[-1] == again.eos_token_id
    assert again.decode(ids, skip_special_tokens=True) == "a purple triangle on a gray background"
    unseen = again("a magenta hexagon").input_ids
    assert again.decode(unseen, skip_special_tokens=True) == "a magenta hexagon"
