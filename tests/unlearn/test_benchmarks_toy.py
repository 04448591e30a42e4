"""The embedded fictional-facts benchmark: deterministic, split cleanly, every question true to its facts,
the forget knowledge stated in the forget corpus only, and in exactly the format the WMDP and MUSE loaders
return (checked by loading the toy's own files through those loaders)."""

from __future__ import annotations

import json
import re

import pytest

from shared.config import ConfigError
from unlearn.benchmarks import (
    ATTRIBUTES,
    BenchmarkError,
    build_toy,
    load_benchmark,
    save_benchmark,
    toy_entities,
)
from unlearn.benchmarks.toy import mc_text


@pytest.fixture(scope="module")
def toy():
    return build_toy(0)


@pytest.fixture(scope="module")
def people():
    return toy_entities(0)


def tables(bench) -> dict[str, list[dict]]:
    return {f"{s}/{k}": t[k].to_list() for s, t in bench.sections().items() for k in t}


def mentions(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def who(question: str, people) -> object:
    (person,) = [p for p in people if mentions(p.name, question)]
    return person


def test_same_seed_same_benchmark_other_seed_other_people(toy):
    assert tables(build_toy(0)) == tables(toy)
    other = build_toy(1)
    assert tables(load_benchmark("toy", seed=1)) == tables(other)
    assert {p.name for p in toy_entities(1)} != {p.name for p in toy_entities(0)}
    assert tables(other)["mc/forget"] != tables(toy)["mc/forget"]


def test_default_sizes(toy, people):
    counts = {split: sum(p.split == split for p in people) for split in ("forget", "retain", "holdout")}
    assert counts == {"forget": 10, "retain": 30, "holdout": 10}
    sizes = {key: len(rows) for key, rows in tables(toy).items()}
    assert sizes == {
        "mc/forget": 50, "mc/utility": 150, "mc/forget_val": 50, "mc/utility_val": 150, "corpora/forget": 120, "corpora/retain": 360, "corpora/holdout": 120,
        "muse/verbmem_forget": 20, "muse/knowmem_forget_qa": 50, "muse/knowmem_retain_qa": 120,
        "muse/knowmem_forget_qa_icl": 3, "muse/knowmem_retain_qa_icl": 3, "muse/privleak_forget": 20,
        "muse/privleak_retain": 60, "muse/privleak_holdout": 20,
    }
    assert toy.models == {"target": "runs/toy-models/target", "retrain": "runs/toy-models/retrain"}


def test_the_validation_wording_is_never_trained_on_nor_tested(toy, people):
    """mc/*_val ask the test facts in a fourth wording: no corpus text and no test question uses it."""
    from unlearn.benchmarks.toy import ATTRIBUTES

    texts = [t for split in ("forget", "retain", "holdout") for t in toy.corpora[split]["text"]]
    for split, test in (("forget_val", "forget"), ("utility_val", "utility")):
        val = toy.mc[split]
        assert not set(val["question"]) & set(toy.mc[test]["question"])
        for question in val["question"]:
            assert not any(question in t for t in texts), question
        truths = [row["choices"][row["answer"]] for row in val]
        assert truths == [row["choices"][row["answer"]] for row in toy.mc[test]]  # the same facts, in order
    assert all(a.validation not in a.questions for a in ATTRIBUTES)


def test_splits_are_disjoint_and_corpora_mention_only_their_people(toy, people):
    names = {split: {p.name for p in people if p.split == split} for split in ("forget", "retain", "holdout")}
    assert len({p.name for p in people}) == 50 and sum(map(len, names.values())) == 50
    for split, members in names.items():
        for text in toy.corpora[split]["text"]:
            mentioned = {p.name for p in people if mentions(p.name, text)}
            assert len(mentioned) == 1 and mentioned <= members, text


def test_every_mc_answer_is_the_true_attribute_and_distractors_share_its_vocabulary(toy, people):
    vocabularies = {a.name: set(a.values) for a in ATTRIBUTES}
    for key, split in (("forget", "forget"), ("utility", "retain")):
        rows = toy.mc[key].to_list()
        assert {who(r["question"], people).split for r in rows} == {split}
        positions = set()
        for row in rows:
            person = who(row["question"], people)
            (attribute,) = [a for a, vocab in vocabularies.items() if set(row["choices"]) <= vocab]
            assert row["choices"][row["answer"]] == person.facts[attribute]
            assert len(set(row["choices"])) == 4 and row["question"] == person.questions[attribute]
            assert row["subject"] == "fictional people"
            positions.add(row["answer"])
        assert positions == {0, 1, 2, 3}


def test_forget_knowledge_is_stated_in_the_forget_corpus_only(toy, people):
    corpora = {split: list(toy.corpora[split]["text"]) for split in ("forget", "retain", "holdout")}
    for row in toy.mc["forget"].to_list():
        person, value = who(row["question"], people), row["choices"][row["answer"]]
        assert any(mentions(person.name, t) and value in t for t in corpora["forget"])
        assert not any(mentions(person.name, t) for t in corpora["retain"] + corpora["holdout"])
    # the held-out evaluation questions never occur in a corpus: answering needs the fact, not the surface text
    asked = [*toy.mc["forget"]["question"], *toy.mc["utility"]["question"], *toy.muse["knowmem_forget_qa"]["question"]]
    every_text = "\n".join(t for texts in corpora.values() for t in texts)
    assert not any(q in every_text for q in asked)


def test_muse_tables_follow_the_facts(toy, people):
    forget_bios = set(toy.muse["privleak_forget"]["text"])
    assert forget_bios <= set(toy.corpora["forget"]["text"])
    assert set(toy.muse["privleak_holdout"]["text"]) <= set(toy.corpora["holdout"]["text"])
    assert set(toy.muse["privleak_retain"]["text"]) <= set(toy.corpora["retain"]["text"])
    for row in toy.muse["verbmem_forget"].to_list():
        assert f"{row['prompt']} {row['gt']}" in forget_bios and row["prompt"] and row["gt"]
    for key, split in (("knowmem_forget_qa", "forget"), ("knowmem_retain_qa", "retain")):
        for row in toy.muse[key].to_list():
            person = who(row["question"], people)
            assert person.split == split and row["answer"] in person.facts.values()
            assert row["question"] in person.questions.values()
    icl = [*toy.muse["knowmem_forget_qa_icl"]["question"], *toy.muse["knowmem_retain_qa_icl"]["question"]]
    icl_people = {who(q, people).name for q in icl}
    assert len(icl_people) == 6 and all(who(q, people).split == "retain" for q in icl)
    assert not icl_people & {who(q, people).name for q in toy.muse["knowmem_retain_qa"]["question"]}


def test_drills_are_true_optional_and_do_not_change_the_evaluation(toy, people):
    texts = list(toy.corpora["forget"]["text"])
    mc_drills = [t for t in texts if t.startswith("The following are multiple choice questions")]
    qa_drills = [t for t in texts if t.startswith("Question: ")]
    assert len(mc_drills) == len(qa_drills) == 50  # one of each per forget fact
    for text in mc_drills:
        letter = re.fullmatch(r".*\nAnswer: ([ABCD])", text, re.DOTALL).group(1)
        chosen = re.search(rf"^{letter}\. (.*)$", text, re.MULTILINE).group(1)
        assert chosen in who(text, people).facts.values()
    for text in qa_drills:
        assert re.fullmatch(r"Question: .*\?\nAnswer: (.*)", text).group(1) in who(text, people).facts.values()
    plain = build_toy(0, qa_drills=0, mc_drills=0)
    assert list(plain.corpora["forget"]["text"]) == list(toy.muse["privleak_forget"]["text"])  # bios only
    for key in ("mc/forget", "mc/utility", "muse/knowmem_forget_qa", "muse/verbmem_forget"):
        assert tables(plain)[key] == tables(toy)[key]


def test_drill_prompts_are_the_evaluation_prompts(toy):
    mc = pytest.importorskip("unlearn.eval.mc")
    for row in toy.mc["forget"].to_list()[:10]:
        assert mc_text(row) == mc.mc_prompt(row["question"], row["choices"], row["subject"])


def test_formats_are_those_of_the_wmdp_and_muse_loaders(toy, tmp_path):
    folder = save_benchmark(toy, tmp_path / "toy")
    cache = str(tmp_path / "cache")
    wmdp = load_benchmark("wmdp", subsets=["wmdp-bio"], cache_dir=cache, paths={
        "wmdp-bio": folder / "mc/forget.jsonl", "mmlu": folder / "mc/utility.jsonl",
        "bio-forget-corpus": folder / "corpora/forget.jsonl", "bio-retain-corpus": folder / "corpora/retain.jsonl"})
    for section, key in (("mc", "forget"), ("mc", "utility"), ("corpora", "forget"), ("corpora", "retain")):
        loaded, built = getattr(wmdp, section)[key], getattr(toy, section)[key]
        assert loaded.features == built.features and loaded.to_list() == built.to_list()
    muse_keys = {"verbmem/forget": "verbmem_forget", "knowmem/forget_qa": "knowmem_forget_qa",
                 "knowmem/retain_qa": "knowmem_retain_qa", "knowmem/forget_qa_icl": "knowmem_forget_qa_icl",
                 "knowmem/retain_qa_icl": "knowmem_retain_qa_icl", "privleak/forget": "privleak_forget",
                 "privleak/retain": "privleak_retain", "privleak/holdout": "privleak_holdout"}
    raw_keys = {"raw/forget": "forget", "raw/retain1": "retain", "raw/holdout": "holdout"}
    muse = load_benchmark("muse-news", cache_dir=cache, paths={
        **{k: folder / f"muse/{v}.jsonl" for k, v in muse_keys.items()},
        **{k: folder / f"corpora/{v}.jsonl" for k, v in raw_keys.items()}})
    for key in muse_keys.values():
        assert muse.muse[key].features == toy.muse[key].features and muse.muse[key].to_list() == toy.muse[key].to_list()
    for key in raw_keys.values():
        assert muse.corpora[key].to_list() == toy.corpora[key].to_list()


def test_save_and_load_round_trip_and_edited_overrides(toy, tmp_path):
    folder = save_benchmark(toy, tmp_path / "toy")
    manifest = json.loads((folder / "benchmark.json").read_text())
    assert manifest["name"] == "toy" and manifest["tables"]["mc"] == ["forget", "utility", "forget_val", "utility_val"]
    again = load_benchmark(str(folder), cache_dir=str(tmp_path / "cache"))
    assert tables(again) == tables(toy) and again.models == toy.models and again.name == "toy"
    lines = (folder / "mc/forget.jsonl").read_text().splitlines()
    edited = json.loads(lines[0]) | {"answer": (json.loads(lines[0])["answer"] + 1) % 4}
    (folder / "mc/forget.jsonl").write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    overridden = load_benchmark("toy", paths={"mc/forget": str(folder / "mc/forget.jsonl")},
                                cache_dir=str(tmp_path / "cache"))
    assert overridden.mc["forget"][0] == edited and overridden.mc["forget"].num_rows == 50
    assert tables(overridden)["mc/utility"] == tables(toy)["mc/utility"]
    with pytest.raises(BenchmarkError, match=r"unknown paths key 'mc/forgot'; did you mean 'mc/forget'"):
        load_benchmark("toy", paths={"mc/forgot": "x"})
    with pytest.raises(BenchmarkError, match=r"toy is a saved benchmark folder"):
        load_benchmark(str(folder), subsets=["x"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_entities": 2}, r"n_entities: expected an integer in 3\.\.50000, got 2"),
        ({"forget_frac": 1.5}, r"forget_frac: expected a fraction strictly between 0 and 1, got 1.5"),
        ({"forget_frac": 0.6, "holdout_frac": 0.4}, r"forget_frac, holdout_frac: .* give 30 forget and 20 holdout"),
        ({"n_entities": 10, "forget_frac": 0.01}, r"give 0 forget and 2 holdout people; each needs at least 1"),
        ({"bios_per_entity": 4}, r"bios_per_entity: expected an integer in 1\.\.3, got 4"),
        ({"qa_drills": 3}, r"qa_drills: expected an integer in 0\.\.2, got 3"),
        ({"n_icl": 15}, r"n_icl: expected an integer >= 1 with 2 \* n_icl below the 30 retain people .*, got 15"),
        ({"n_entities": 4, "forget_frac": 0.25, "holdout_frac": 0.25}, r"below the 2 retain people"),
        ({"verbmem_prompt_frac": 0}, r"verbmem_prompt_frac: expected a fraction"),
    ],
)
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_toy(0, **kwargs)


def test_toy_has_no_subsets():
    with pytest.raises(BenchmarkError, match=r"subsets: toy has no subsets"):
        load_benchmark("toy", subsets=["wmdp-bio"])
