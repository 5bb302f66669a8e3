"""The embedded default's data: digits latents and the class-embedding condition set."""

import torch

from phased_dmd_mp.data.digits import (
    LATENT_SHAPE,
    class_embeddings,
    load_digits_latents,
    write_digits_condition_set,
)


def test_digits_latents_shape_range_and_labels():
    latents, labels = load_digits_latents()
    assert latents.shape == (1797, *LATENT_SHAPE) and latents.dtype == torch.float32
    assert latents.min() == -1 and latents.max() == 1  # ink 0..16 -> [-1, 1], both ends used
    assert labels.dtype == torch.int64 and torch.bincount(labels).min() > 170  # ~180 per class
    # Background is ink 0 (-1): the border columns of digits are mostly empty.
    assert (latents[..., 0] == -1).float().mean() > 0.9


def test_class_embeddings_are_fixed_by_the_seed():
    table = class_embeddings(32, seed=0)
    assert table.shape == (10, 1, 32)
    torch.testing.assert_close(table, class_embeddings(32, seed=0), rtol=0, atol=0)
    assert not torch.equal(table, class_embeddings(32, seed=1))
    # Distinct classes: no two embeddings nearly parallel.
    unit = torch.nn.functional.normalize(table[:, 0], dim=1)
    similarity = unit @ unit.T - torch.eye(10)
    assert similarity.abs().max() < 0.7


def test_digits_condition_set(tmp_path):
    conditions = write_digits_condition_set(tmp_path / "digits", text_dim=8, seed=0)
    assert len(conditions) == 10 and conditions.labels.tolist() == list(range(10))
    batch = conditions.batch(torch.tensor([3, 3, 9]))
    torch.testing.assert_close(batch.text, class_embeddings(8, seed=0)[[3, 3, 9]])
    null = conditions.uncond(3)
    assert null.text.shape == (3, 1, 8) and not null.text.any()
