"""The training-curves picture drawn from a run's history.csv."""

import io

import numpy as np
from PIL import Image

from captioner.data.curves import COLOURS, SIZE, draw_curves

TRAIN = "epoch,loss,val_loss,seconds,lr\n1,4.0,3.4,40.1,0.001\n2,3.1,3.1,41.0,0.0009\n3,2.8,3.0,40.5,0.0008\n"
SCST = "epoch,loss,reward,baseline,dev_cider,dev_bleu4,seconds,lr\n0,,,,0.43,0.19,1.5,\n1,-0.08,0.42,0.42,0.45,0.20,300,0.00005\n"


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == SIZE
    return np.asarray(image.convert("RGB"))


def _has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).any())


def test_a_training_history_draws_both_losses_in_the_left_panel():
    pixels = _pixels(draw_curves(TRAIN))
    left, right = pixels[:, : SIZE[0] // 2], pixels[:, SIZE[0] // 2:]
    assert _has_colour(left, COLOURS[0]) and _has_colour(left, COLOURS[1])  # loss, val_loss
    assert not _has_colour(right, COLOURS[0])  # no dev score recorded: nothing drawn there


def test_an_scst_history_with_an_empty_first_loss_draws_its_scores():
    pixels = _pixels(draw_curves(SCST))
    right = pixels[:, SIZE[0] // 2:]
    # reward, dev_cider, dev_bleu4: three lines in the right panel
    assert all(_has_colour(right, COLOURS[i]) for i in range(3))


def test_an_empty_history_draws_nothing():
    assert draw_curves("epoch,loss,val_loss\n") is None


def test_columns_that_are_not_numbers_or_not_curves_are_left_out():
    text = "epoch,loss,note,seconds\n1,2.0,hello,3\n2,1.5,world,3\n"
    pixels = _pixels(draw_curves(text))
    left, right = pixels[:, : SIZE[0] // 2], pixels[:, SIZE[0] // 2:]
    assert _has_colour(left, COLOURS[0]) and not _has_colour(left, COLOURS[1])  # only "loss"
    assert not _has_colour(right, COLOURS[0])

