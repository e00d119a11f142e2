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


def test_dp_ranks_get_disjoint_shards_and_no_draw_repeats_a_prompt(tmp_path):
    dataset = dataset_of(13, tmp_path)  # not divisible by the draw (3 ranks x 2): each epoch skips one prompt
    streams = [PromptStream(dataset, 2, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    single = PromptStream(dataset, 6, seed=1)  # the same global order as one rank drawing it all
    steps = []
    for _ in range(12):  # two draws per epoch -> 6 epochs
        step = [uids(s.next_batch()) for s in streams]
        assert len(set(sum(step, []))) == 6  # disjoint across ranks, nothing twice in a step
        everyone = uids(single.take(6))
        assert [everyone[r::3] for r in range(3)] == step
        steps.append(sum(step, []))
    for epoch in range(6):
        assert len(set(steps[2 * epoch] + steps[2 * epoch + 1])) == 12  # every prompt at most once per epoch
    assert streams[0].epoch == 5  # at the end of epoch 5 (the next draw starts epoch 6)


def test_a_draw_across_an_epoch_end_starts_the_next_epoch(tmp_path):
    dataset = dataset_of(10, tmp_path)
    stream = PromptStream(dataset, 4, seed=0)
    draws = [uids(stream.next_batch()) for _ in range(30)]
    assert all(len(set(d)) == 4 for d in draws)  # with wrap-around, some draw would repeat a prompt
    assert stream.position == 30 * 4 + 14 * 2  # two prompts skipped at each of the 14 epoch ends passed


def test_build_refuses_a_dataset_smaller_than_one_batch(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", addition_records(3))
    cfg = SimpleNamespace(train_files=[path], prompt_key="prompt", answer_key="answer", max_prompt_length=512,
                          train_batch_size=4, gen_batch_size=0, shuffle=True)  # fmt: skip
    with pytest.raises(UserError, match=r"data.train_batch_size=4 is larger than the training set \(3 prompts in .*small.jsonl\)"):
        build_train_data(cfg, encode)
    cfg.train_batch_size, cfg.gen_batch_size = 2, 6
    with pytest.raises(UserError, match=r"data.gen_batch_size=6 .*lower data.gen_batch_size or add prompts"):
        build_train_data(cfg, encode)


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


# --- bad records fail at load time, naming the file and the line -------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "", "answer": "0"}\n', r"line 2: 'prompt' is empty"),
        (b'{"prompt": "a", "answer": "2"}\n{"prompt": "  \\n ", "answer": "0"}\n', r"line 2: 'prompt' is empty"),
        (b'{"prompt": [], "answer": "0"}\n', r"line 1: 'prompt' has no message with text"),
        (b'{"prompt": [{"role": "user", "content": ""}], "answer": "0"}\n', r"line 1: 'prompt' has no message with text"),
        (b'{"prompt": ["hi"], "answer": "0"}\n', r"line 1: 'prompt' message 0 must be an object"),
        (b'{"prompt": 3, "answer": "0"}\n', r"line 1: 'prompt' must be a string or a list"),
        (b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n', r"line 2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
        (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', r"line 2: invalid JSON"),
        (b'[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]', r"line 2: invalid JSON"),
        (b'[{"prompt": "a", "answer": "1"},\n {"prompt": "\xff", "answer": "2"}]', r"line 2: not valid UTF-8"),
        (b'{"prompt": "\\u0001", "answer": "1"}\n', r"line 1: 'prompt' encodes to no tokens"),
    ],
    ids=["empty", "blank", "no_messages", "empty_message", "bad_message", "number", "latin1", "bad_json",
         "bad_json_list", "latin1_list", "no_tokens"],  # fmt: skip
)
def test_bad_prompt_records_are_one_line_errors_at_load(tmp_path, content, message):
    path = tmp_path / ("bad.json" if content.startswith(b"[") else "bad.jsonl")
    path.write_bytes(content)
    drop_control = lambda p: [t for t in encode(p) if t >= 32]  # noqa: E731 ("\x01" encodes to nothing)
    with pytest.raises(UserError, match=message) as e:
        load_prompts(str(path), drop_control)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "answer": "1"}\n')
    assert load_prompts(str(path), encode)[0].text == "caf\u00e9"


def test_damaged_parquet_is_a_user_error(tmp_path):
    pytest.importorskip("pyarrow")
    good = write_parquet(tmp_path / "good.parquet", addition_records(50))
    data = open(good, "rb").read()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    for name in ("cut.parquet", "junk.parquet"):
        with pytest.raises(UserError, match=rf"{name} row 0: not a readable Parquet file"):
            load_prompts(str(tmp_path / name), encode)
