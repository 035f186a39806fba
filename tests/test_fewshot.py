"""Few-shot linear probes: the closed-form ridge solution against numpy, the draws, and the accuracy they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.evaluate.fewshot import Features, draw_shots, extract_features, fewshot_accuracy, fit_ridge


def numpy_ridge_scores(x, y, test, num_classes, l2):
    """The textbook primal solve, written independently: standardised X, W = (X^T X + l2 I)^-1 X^T Y, bias mean(Y)."""
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    standard = (x - mean) / std
    weights = np.linalg.solve(standard.T @ standard + l2 * np.eye(x.shape[1]), standard.T @ targets)
    return (test - mean) / std @ weights + targets.mean(axis=0)


@pytest.mark.parametrize("samples", [12, 300])  # fewer samples than dimensions (dual form) and more (primal)
def test_ridge_probe_matches_a_direct_numpy_solve(samples):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 40)) * rng.uniform(0.1, 5, size=40) + 1
    y = rng.integers(0, 4, size=samples)
    test = rng.normal(size=(50, 40))
    probe = fit_ridge(torch.from_numpy(x).float(), torch.from_numpy(y), 4, l2=1024.0)
    ours = probe.scores(torch.from_numpy(test).float()).numpy()
    expected = numpy_ridge_scores(x.astype(np.float32).astype(np.float64), y, test.astype(np.float32), 4, 1024.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_draws_take_shots_per_class_and_depend_on_the_seed():
    labels = torch.arange(10).repeat(7)  # 7 images of each of 10 classes
    chosen = draw_shots(labels, 5, 10, seed=0)
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [5] * 10
    assert torch.equal(chosen, draw_shots(labels, 5, 10, seed=0))
    assert not torch.equal(chosen, draw_shots(labels, 5, 10, seed=1))
    assert draw_shots(labels, 8, 10, seed=0) is None  # a class with 7 images cannot give 8 shots


def clustered(samples_per_class: int, seed: int, spread: float) -> Features:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.arange(5).repeat(samples_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), 16, generator=generator)
    return Features(features, labels, [f"{seed}-{i:05d}" for i in range(len(labels))])


def test_fewshot_accuracy_separates_clusters_and_skips_impossible_shot_counts():
    train, test = clustered(20, seed=1, spread=0.5), clustered(10, seed=2, spread=0.5)
    results = fewshot_accuracy(train, test, 5, shots=(1, 5, 25), draws=3, l2=1.0)
    assert results[1] > 0.9 and results[5] == 1.0
    assert 25 not in results  # only 20 training images per class
    noise = fewshot_accuracy(clustered(20, 1, spread=50.0), clustered(10, 2, spread=50.0), 5, shots=(5,))
    assert noise[5] < 0.6


def test_features_are_sorted_by_key_and_padding_is_dropped():
    batches = [
        {
            "image": torch.full((2, 3, 4, 4), 7, dtype=torch.uint8),
            "label": torch.tensor([1, 0]),
            "key": ["b", "pad"],
            "valid": torch.tensor([True, False]),
        },
        {
            "image": torch.full((1, 3, 4, 4), 3, dtype=torch.uint8),
            "label": torch.tensor([2]),
            "key": ["a"],
            "valid": torch.tensor([True]),
        },
    ]
    features = extract_features(lambda images: images.float().mean(dim=(2, 3)), batches)
    assert features.keys == ["a", "b"]
    assert features.labels.tolist() == [2, 1]
    assert features.features[:, 0].tolist() == [3.0, 7.0]
