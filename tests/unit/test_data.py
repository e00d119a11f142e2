"""Data stage: JSONL / Parquet loading, nested keys, chat prompts, length filter, error messages,
and the prompt stream's determinism, DP sharding and exact resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlx.data import PromptStream, batches, build_train_data, build_val_data, load_prompts, shard
from rlx.errors import UserError


def encode(prompt) -> list[int]:
    """A fake chat template: one token per character of the text, messages joined."""
    text = prompt if isinstance(prompt, str) else "|".join(f"{m['role']}:{m['content']}" for m in prompt)
    return [ord(c) for c in text]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def addition_records(n):
    return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]


def test_jsonl_loads_prompts_with_stable_uids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", addition_records(3))
    dataset = load_prompts(path, encode)
    assert [p.uid for p in dataset] == [0, 1, 2]
    assert dataset[1].prompt_ids == encode("1+1=") and dataset[1].ground_truth == "2"
    assert dataset[1].text == "1+1=" and dataset[1].data == {"prompt": "1+1=", "answer": "2"}
    assert load_prompts(path, encode, decode=lambda ids: "<" + "".join(map(chr, ids)) + ">")[0].text == "<0+1=>"


def test_parquet_verl_format_with_nested_keys_and_chat_messages(tmp_path):
    records = [
        {
            "data_source": "gsm8k",
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"{i}*2?"}],
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        }
        for i in range(4)
    ]
    path = write_parquet(tmp_path / "train.parquet", records)
    dataset = load_prompts(path, encode, answer_key="reward_model.ground_truth")
    assert len(dataset) == 4
    assert dataset[3].ground_truth == "6"
    assert dataset[3].prompt_ids == encode(records[3]["prompt"])
    assert dataset[3].text == "3*2?"  # the last message's content, without decode


def test_over_long_prompts_are_filtered_and_counted(tmp_path, caplog):
    records = [{"prompt": "x" * n, "answer": "a"} for n in (5, 50, 10, 60, 8)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level("WARNING", logger="rlx.data.prompts"):
        dataset = load_prompts(path, encode, max_prompt_length=10)
    assert [p.uid for p in dataset] == [0, 2, 4]  # uids stay the record index
    assert dataset.num_filtered == 2 and dataset.metrics() == {"data/filtered_prompts": 2.0}
    assert len(caplog.records) == 1 and "dropped 2 of 5" in caplog.records[0].getMessage()


def test_missing_key_names_file_line_and_available_keys(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    with pytest.raises(UserError) as e:
        load_prompts(path, encode)
    assert "bad.jsonl line 2" in str(e.value) and "'prompt'" in str(e.value) and "['answer', 'question']" in str(e.value)
    ppath = write_parquet(tmp_path / "bad.parquet", [{"prompt": "a", "reward_model": {"style": "rule"}}])
    with pytest.raises(UserError, match=r"bad.parquet row 0: no key 'reward_model.ground_truth' .*reward_model: \['style'\]"):
        load_prompts(ppath, encode, answer_key="reward_model.ground_truth")
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"), encode)
    (tmp_path / "bad.csv").write_text("prompt,answer\n")
    with pytest.raises(UserError, match="unknown format"):
        load_prompts(str(tmp_path / "bad.csv"), encode)


def dataset_of(n, tmp_path):
    return load_prompts(write_jsonl(tmp_path / f"d{n}.jsonl", addition_records(n)), encode)


def uids(batch):
    return [p.uid for p in batch]


def test_stream_is_deterministic_and_reshuffles_each_epoch(tmp_path):
    dataset = dataset_of(10, tmp_path)
    a, b = PromptStream(dataset, 5, seed=3), PromptStream(dataset, 5, seed=3)
    first = [uids(a.next_batch()) for _ in range(6)]
    assert first == [uids(b.next_batch()) for _ in range(6)]
    epoch0, epoch1 = first[0] + first[1], first[2] + first[3]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert a.epoch == 3
    assert uids(PromptStream(dataset, 5, seed=4).next_batch()) != first[0]
    assert uids(PromptStream(dataset, 4, shuffle=False).take(12)) == list(range(10)) + [0, 1]


def test_dp_ranks_get_disjoint_and_complete_shards(tmp_path):
    dataset = dataset_of(13, tmp_path)  # not divisible by dp_size: nothing is dropped
    streams = [PromptStream(dataset, 2, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    drawn = [[] for _ in streams]
    for _ in range(13):  # 13 steps x 3 ranks x 2 prompts = 6 epochs
        for r, s in enumerate(streams):
            drawn[r] += uids(s.next_batch())
    everything = sorted(drawn[0] + drawn[1] + drawn[2])
    assert everything == sorted(list(range(13)) * 6)
    step0 = [set(drawn[r][:2]) for r in range(3)]
    assert not (step0[0] & step0[1] or step0[0] & step0[2] or step0[1] & step0[2])
    single = PromptStream(dataset, 6, seed=1).take(78)  # the same global order as one rank
    assert [uids(single)[i] for i in range(0, 78, 3)] == drawn[0][: 78 // 3]


def test_resume_gives_exactly_the_same_prompts(tmp_path):
    dataset = dataset_of(7, tmp_path)
    uninterrupted = PromptStream(dataset, 3, dp_rank=1, dp_size=2, seed=5)
    expected = [uids(uninterrupted.next_batch()) for _ in range(8)]
    before = PromptStream(dataset, 3, dp_rank=1, dp_size=2, seed=5)
    got = [uids(before.next_batch()) for _ in range(3)]
    state = json.loads(json.dumps(before.state_dict()))  # survives a JSON round trip
    resumed = PromptStream(dataset, 3, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    got += [uids(resumed.next_batch()) for _ in range(5)]
    assert got == expected


def test_build_from_data_config_and_validation_set(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", addition_records(20))
    val = write_jsonl(tmp_path / "val.jsonl", addition_records(9))
    cfg = SimpleNamespace(
        train_files=[train], val_files=[val], prompt_key="prompt", answer_key="answer", max_prompt_length=512,
        train_batch_size=8, gen_batch_size=0, val_batch_size=4, shuffle=True, val_max_samples=6,
    )
    dataset, stream = build_train_data(cfg, encode, dp_rank=1, dp_size=2, seed=0)
    assert len(dataset) == 20 and len(stream.next_batch()) == 4
    with pytest.raises(UserError, match="divisible"):
        build_train_data(cfg, encode, dp_size=3)
    val_set = build_val_data(cfg, encode)
    assert uids(val_set) == [0, 1, 2, 3, 4, 5]  # in order, capped
    assert uids(shard(val_set, 1, 2)) == [1, 3, 5]
    assert [uids(b) for b in batches(val_set, 4)] == [[0, 1, 2, 3], [4, 5]]
    assert build_val_data(SimpleNamespace(**{**vars(cfg), "val_files": []}), encode) is None
