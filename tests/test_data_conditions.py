"""Condition sets on disk (round trip, optional fields, errors) and the training index sampler."""

import json

import pytest
import torch
from safetensors.torch import save_file

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import (
    ConditionSampler,
    ConditionSet,
    ConditionSetWriter,
    write_condition_set,
)
from phased_dmd_mp.sampling import guided


def _i2v_items(n: int, seed: int = 0) -> dict:
    """Every field: padded text with its mask, first-frame latents, CLIP tokens, labels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=generator)
    return {
        "text": torch.randn(n, 6, 8, generator=generator).to(torch.bfloat16),
        "text_mask": (torch.arange(6) < lengths[:, None]).long(),
        "image_latents": torch.randn(n, 3, 1, 2, 2, generator=generator),
        "image_embeds": torch.randn(n, 4, 5, generator=generator),
        "labels": torch.arange(n) * 10,
    }


I2V_UNCOND = {"text": torch.ones(6, 8, dtype=torch.bfloat16), "text_mask": torch.ones(6).long()}


def test_round_trip_with_every_field_across_shards(tmp_path):
    items = _i2v_items(23)
    item_bytes = 6 * 8 * 2 + 6 * 8 + 3 * 4 * 4 + 4 * 5 * 4 + 8
    # Streamed in uneven chunks, shards of 5 items: the last one holds 3.
    with ConditionSetWriter(tmp_path / "set", I2V_UNCOND, shard_bytes=5 * item_bytes) as writer:
        for lo, hi in [(0, 7), (7, 8), (8, 23)]:
            writer.add(**{name: tensor[lo:hi] for name, tensor in items.items()})
    manifest = json.loads((tmp_path / "set" / "conditions.json").read_text())
    assert [shard["count"] for shard in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["tensors"]["text"] == {"shape": [6, 8], "dtype": "bfloat16"}
    assert not [p for p in tmp_path.iterdir() if p.name != "set"]  # no staging left behind

    conditions = ConditionSet(tmp_path / "set")
    assert len(conditions) == 23
    assert conditions.fields == ("text", "text_mask", "image_latents", "image_embeds")
    torch.testing.assert_close(conditions.labels, items["labels"])
    indices = [22, 0, 7, 7, 13]  # unordered, repeated, across shards
    batch = conditions.batch(torch.tensor(indices))
    for name in batch.__dataclass_fields__:
        torch.testing.assert_close(getattr(batch, name), items[name][indices], rtol=0, atol=0)

    uncond = conditions.uncond(5, like=batch)
    assert uncond.text.shape == (5, 6, 8) and (uncond.text == 1).all()
    assert uncond.text_mask.shape == (5, 6)
    assert uncond.image_latents is batch.image_latents  # the negative branch keeps the image
    # Usable as the CFG pair: both halves concatenate into one batch.
    velocity = guided(lambda x, t, c: x + c.text.float().mean((1, 2)), batch, uncond, 3.0)
    assert velocity(torch.zeros(5), torch.ones(5)).shape == (5,)
    with pytest.raises(ValueError, match="like="):
        conditions.uncond(5)


def test_text_only_set_and_its_uncond(tmp_path):
    text = torch.randn(4, 1, 3)
    conditions = write_condition_set(tmp_path / "set", {"text": text}, {"text": torch.zeros(1, 3)})
    assert conditions.labels is None and conditions.fields == ("text",)
    uncond = conditions.uncond(7)
    assert uncond.text.shape == (7, 1, 3) and uncond.text_mask is None and not uncond.text.any()
    torch.testing.assert_close(conditions.batch([3, 1]).text, text[[3, 1]])
    with pytest.raises(IndexError):
        conditions.batch([4])


def test_writer_refuses_inconsistent_input(tmp_path):
    uncond = {"text": torch.zeros(2, 3)}
    with pytest.raises(ConfigError, match="already exists"):
        ConditionSetWriter(tmp_path, uncond)
    cases = [
        ({"labels": torch.arange(2)}, uncond, "needs a 'text'"),
        ({"text": torch.zeros(2, 2, 3), "prompt": torch.zeros(2)}, uncond, "unknown tensors"),
        ({"text": torch.zeros(2, 2, 3)}, {"text": torch.zeros(3, 3)}, "uncond must hold"),
        ({"text": torch.zeros(2, 2, 3), "labels": torch.zeros(3).long()}, uncond, "leading dim"),
        ({"text": torch.zeros(2, 2, 3), "labels": torch.zeros(2)}, uncond, "labels must be"),
    ]
    for index, (items, null, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            write_condition_set(tmp_path / f"set{index}", items, null)
    writer = ConditionSetWriter(tmp_path / "mixed", uncond)
    with pytest.raises(ConfigError, match="do not match"), writer:
        writer.add(text=torch.zeros(2, 2, 3))
        writer.add(text=torch.zeros(2, 4, 3))
    # A failed write leaves nothing behind.
    assert not list(tmp_path.iterdir())


@pytest.fixture
def small_set(tmp_path):
    write_condition_set(
        tmp_path / "set",
        {"text": torch.randn(6, 2, 3), "labels": torch.arange(6)},
        {"text": torch.zeros(2, 3)},
        shard_bytes=4 * (2 * 3 * 4 + 8),
    )
    return tmp_path / "set"


def _manifest(path):
    return json.loads((path / "conditions.json").read_text())


def test_reader_errors_name_the_problem(small_set, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ConditionSet(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="has no conditions.json"):
        ConditionSet(tmp_path)

    manifest = _manifest(small_set)
    broken = {
        "not valid JSON": "{",
        "version": json.dumps({**manifest, "version": 99}),
        "shards hold 6 items, count says 7": json.dumps({**manifest, "count": 7}),
        "malformed": json.dumps({k: v for k, v in manifest.items() if k != "shards"}),
    }
    for message, text in broken.items():
        (small_set / "conditions.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            ConditionSet(small_set)
    (small_set / "conditions.json").write_text(json.dumps(manifest))
    ConditionSet(small_set)

    # A shard whose contents disagree with the manifest, a truncated one, a missing one.
    shard = small_set / manifest["shards"][1]["file"]
    data = shard.read_bytes()
    save_file({"text": torch.zeros(2, 2, 4), "labels": torch.arange(2)}, shard)
    with pytest.raises(ConfigError, match=r"manifest says F32 \[2, 2, 3\]"):
        ConditionSet(small_set)
    shard.write_bytes(data[:-5])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        ConditionSet(small_set)
    shard.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        ConditionSet(small_set)


def test_sampler_is_deterministic_and_covers_each_epoch():
    draws = [next(ConditionSampler(10, 4, seed=3)) for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.equal(draws[0], next(ConditionSampler(10, 4, seed=4)))
    sampler = ConditionSampler(10, 4, seed=3)
    stream = torch.cat([next(sampler) for _ in range(5)])  # two epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # reshuffled per epoch
    # Batches larger than the set span several epochs, still balanced.
    big = next(ConditionSampler(3, 30, seed=0))
    assert torch.bincount(big).tolist() == [10, 10, 10]


def test_data_parallel_ranks_take_disjoint_slices_of_one_stream():
    single = ConditionSampler(12, 6, seed=1)
    ranks = [ConditionSampler(12, 2, seed=1, rank=r, world=3) for r in range(3)]
    for _ in range(4):
        per_rank = [next(sampler) for sampler in ranks]
        torch.testing.assert_close(torch.cat(per_rank), next(single))
        assert len(set(torch.cat(per_rank).tolist())) == 6
    with pytest.raises(ConfigError, match="rank must be"):
        ConditionSampler(12, 2, seed=1, rank=3, world=3)


def test_resumed_sampler_draws_the_same_batches():
    sampler = ConditionSampler(7, 3, seed=5, rank=1, world=2)
    for _ in range(4):
        next(sampler)
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint stores it
    expected = [next(sampler) for _ in range(5)]
    resumed = ConditionSampler(7, 3, seed=5, rank=1, world=2)
    resumed.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(next(resumed), batch)
    with pytest.raises(ConfigError, match="seed = 5"):
        ConditionSampler(7, 3, seed=6).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_items = 7"):
        ConditionSampler(8, 3, seed=5).load_state_dict(state)
