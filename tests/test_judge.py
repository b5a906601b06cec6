from cdm.params import Params
from cdm.world.judge import FEATURE_DIM, Judge
from cdm.world.prompts import ATTRIBUTES
from cdm.world.render import random_batch
from cdm.world.train import judge_accuracy


def test_committed_judge_reads_every_attribute_of_fresh_renders(root):
    judge = Judge.from_pretrained(root / Params().judge.path)
    # Seed 4242 is not a training seed (training draws from seed 0's stream).
    accuracy = judge_accuracy(judge, 2048, seed=4242)
    assert set(accuracy) == set(ATTRIBUTES) == {"shape", "colour", "position", "background"}
    for kind, value in accuracy.items():
        assert value >= 0.99, (kind, value)


def test_judge_features_have_fixed_size(root):
    import torch

    judge = Judge.from_pretrained(root / Params().judge.path)
    images, _ = random_batch(8, torch.Generator().manual_seed(1))
    pred, feats = judge.predict(images)
    assert pred.shape == (8, len(ATTRIBUTES)) and feats.shape == (8, FEATURE_DIM)
