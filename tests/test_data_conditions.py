"""Condition sets on disk (round trip, optional fields, errors, the real-token layout and its
padding, version 1 sets) and the training index sampler."""

import json

import pytest
import torch
from safetensors.torch import save_file

from phased_dmd_mp.conditioning import Conditions
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.atomic import save_safetensors
from phased_dmd_mp.data.condition_writer import (
    ConditionSetWriter,
    publish,
    real_text_tensors,
    staging_dir,
    write_condition_set,
)
from phased_dmd_mp.data.conditions import ConditionSampler, ConditionSet, shard_name
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
    assert manifest["shards"][-1]["file"] == "items-000000020-000000023.safetensors"
    assert manifest["version"] == 2 and manifest["text_tokens"] == "padded"
    assert manifest["tensors"]["text"] == {"shape": [6, 8], "dtype": "bfloat16"}
    assert not [p for p in tmp_path.iterdir() if p.name != "set"]  # no staging left behind

    conditions = ConditionSet(tmp_path / "set")
    assert len(conditions) == 23
    assert conditions.fields == ("text", "text_mask", "image_latents", "image_embeds")
    torch.testing.assert_close(conditions.labels, items["labels"])
    indices = [22, 0, 7, 7, 13]  # unordered, repeated, across shards
    batch = conditions.batch(torch.tensor(indices))
    assert batch.first_frame_latents is None  # a field the set does not hold
    for name in [name for name in items if name != "labels"]:  # labels: conditions.labels
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

    # Opening reads no shard: a shard whose contents disagree with the manifest fails when a
    # batch first reads it (validate_run stats them all up front: tests/test_validate.py).
    shard = small_set / manifest["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'"labels"', b'"lebals"'))
    conditions = ConditionSet(small_set)
    conditions.batch([0, 1])  # the first shard is fine
    with pytest.raises(ConfigError, match=r"holds tensors \['lebals', 'text'\]"):
        conditions.batch([5])
    shard.write_bytes(data[:-5])
    with pytest.raises(ConfigError, match=f"is {len(data) - 5} bytes, .* says {len(data)}"):
        ConditionSet(small_set).batch([5])
    save_file({"text": torch.zeros(2, 2, 4), "labels": torch.arange(2)}, shard)
    (small_set / "conditions.json").write_text(
        json.dumps({**manifest, "shards": [{**s, "bytes": shard.stat().st_size} if s["file"] ==
                                           shard.name else s for s in manifest["shards"]]})
    )
    with pytest.raises(ConfigError, match=r"manifest says F32 \[2, 2, 3\]"):
        ConditionSet(small_set).batch([5])
    shard.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        ConditionSet(small_set).batch([5])
    (small_set / "uncond.safetensors").unlink()
    with pytest.raises(ConfigError, match="uncond.safetensors is missing"):
        ConditionSet(small_set)


def write_version_1_set(path, items, uncond, per_shard):
    """A condition set exactly as version 1 (before real-token sets) wrote it: every item
    padded, shards items-00000.safetensors..., no text layout or sizes in the manifest."""
    path.mkdir()
    count = len(items["text"])
    shards = []
    for index, start in enumerate(range(0, count, per_shard)):
        name = f"items-{index:05d}.safetensors"
        save_file({k: v[start : start + per_shard].contiguous() for k, v in items.items()},
                  path / name)  # fmt: skip
        shards.append({"file": name, "count": len(items["text"][start : start + per_shard])})
    save_file({k: v[None].contiguous() for k, v in uncond.items()}, path / "uncond.safetensors")
    tensors = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
               for k, v in items.items()}  # fmt: skip
    manifest = {"format": "phased_dmd_mp.conditions", "version": 1, "count": count,
                "tensors": tensors, "shards": shards, "uncond": "uncond.safetensors"}  # fmt: skip
    (path / "conditions.json").write_text(json.dumps(manifest))


def test_version_1_sets_still_load(tmp_path):
    items = _i2v_items(9)
    write_version_1_set(tmp_path / "v1", items, I2V_UNCOND, per_shard=4)
    conditions = ConditionSet(tmp_path / "v1")
    assert len(conditions) == 9 and conditions.text_tokens == "padded"
    batch = conditions.batch([8, 0, 4])
    assert batch.first_frame_latents is None
    for name in [name for name in items if name != "labels"]:  # labels: conditions.labels
        torch.testing.assert_close(getattr(batch, name), items[name][[8, 0, 4]], rtol=0, atol=0)
    torch.testing.assert_close(conditions.labels, items["labels"])
    assert torch.equal(conditions.uncond(3, like=batch).text[2], I2V_UNCOND["text"])


def write_real_set(path, texts, uncond_text, masked, tokens, per_shard, **fixed):
    """A real-token set as prepare writes one: shards by prompt range, then publish."""
    staging = staging_dir(path)
    shards = []
    for start in range(0, len(texts), per_shard):
        stop = min(start + per_shard, len(texts))
        name = shard_name(start, stop)
        tensors = {**real_text_tensors(texts[start:stop]),
                   **{k: v[start:stop] for k, v in fixed.items()}}  # fmt: skip
        save_safetensors(tensors, staging / name)
        shards.append((name, stop - start))
    width, dtype = texts[0].shape[1], str(texts[0].dtype).removeprefix("torch.")
    specs = {"text": ((tokens, width), dtype)}
    if masked:
        specs["text_mask"] = ((tokens,), "int64")
    for name, tensor in fixed.items():
        specs[name] = (tuple(tensor.shape[1:]), str(tensor.dtype).removeprefix("torch."))
    return publish(staging, specs, shards, real_text_tensors([uncond_text]), path, "real")


def _texts(lengths, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=generator).to(torch.bfloat16) for n in lengths]


def test_real_token_sets_pad_as_the_pipeline_does(tmp_path):
    """Unmasked (Wan): zeros to the set's tokens; masked (Qwen-Image): to the batch's longest
    with the mask; the bytes stored are the real tokens'."""
    lengths = [3, 7, 1, 5, 2, 6, 4]
    texts, null = _texts(lengths), _texts([2], seed=1)[0]
    wan = write_real_set(tmp_path / "wan", texts, null, masked=False, tokens=12, per_shard=3)
    batch = wan.batch([6, 1, 3])
    assert batch.text.shape == (3, 12, 4) and batch.text_mask is None
    for row, index in enumerate([6, 1, 3]):
        n = lengths[index]
        assert torch.equal(batch.text[row, :n], texts[index])
        assert not batch.text[row, n:].any()
    assert wan.uncond(2).text.shape == (2, 12, 4) and torch.equal(wan.uncond(2).text[1, :2], null)
    shards = sum(f.stat().st_size for f in (tmp_path / "wan").glob("items-*"))
    payload = sum(lengths) * 4 * 2 + (len(lengths) + 3) * 8  # bf16 tokens + int64 offsets
    assert payload <= shards < payload + 3 * 200  # + one small header per shard

    qwen = write_real_set(tmp_path / "qwen", texts, null, masked=True, tokens=7, per_shard=3)
    assert qwen.fields == ("text", "text_mask") and qwen.shape("text") == (7, 4)
    batch = qwen.batch([4, 0, 4])  # lengths 2, 3, 2: padded to 3
    assert batch.text.shape == (3, 3, 4)
    assert batch.text_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert torch.equal(batch.text[1], texts[0]) and not batch.text[0, 2:].any()
    uncond = qwen.uncond(3)
    assert uncond.text.shape == (3, 2, 4) and uncond.text_mask.all()
    # the CFG pair: the shorter half padded to the longer, its padding masked out
    both = Conditions.cat([batch, uncond])
    assert both.text.shape == (6, 3, 4) and both.text_mask[3:].tolist() == [[1, 1, 0]] * 3
    with pytest.raises(ValueError, match="needs text_mask"):
        Conditions.cat([wan.batch([0]), Conditions(text=torch.zeros(1, 3, 4))])


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
