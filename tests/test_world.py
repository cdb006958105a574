import json

from miniglm.world import FACTS, build_world, make_characters


def test_world_is_deterministic_and_complete(tmp_path):
    s1 = build_world(tmp_path / "a", characters=80, bios_per_character=4, seed=5)
    s2 = build_world(tmp_path / "b", characters=80, bios_per_character=4, seed=5)
    for name in ["characters.jsonl", "corpus.jsonl", "sft_train.jsonl", "sft_test.jsonl"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert s1 == s2 and s1.characters == 80 and s1.biographies == 320
    chars = [json.loads(x) for x in (tmp_path / "a" / "characters.jsonl").read_text().splitlines()]
    bios = [json.loads(x) for x in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "a" / "sft_train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "a" / "sft_test.jsonl").read_text().splitlines()]
    assert len({c["name"] for c in chars}) == 80
    # every biography states every fact of its character
    by_name = {c["name"]: c for c in chars}
    for b in bios:
        c = by_name[b["character"]]
        assert all(c[f] in b["text"] for f in FACTS)
    # held-out characters are in pretraining but not in SFT training
    train_names, test_names = {r["character"] for r in train}, {r["character"] for r in test}
    assert not train_names & test_names and len(test_names) == 40
    assert test_names <= {b["character"] for b in bios}
    assert len(test) == 40 * len(FACTS)
    for r in train + test:
        assert r["answer"] == by_name[r["character"]][r["fact"]] and r["character"] in r["question"]


def test_fact_types_and_phrasings():
    assert len(FACTS) >= 8
    for bio_phrasings, questions in FACTS.values():
        assert len(bio_phrasings) >= 5 and len(questions) >= 2


def test_relations_and_scale():
    chars = make_characters(20000, seed=1)
    assert len({c["name"] for c in chars}) == 20000
    for c in chars[:500]:
        assert c["name"] not in (c["师父"], c["好友"], c["仇人"]) and c["好友"] != c["仇人"]
