"""Tests for the training data pipeline (recursify.data), on a tiny offline tokenizer."""

from __future__ import annotations

import json
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from recursify.data import (
    DataConfig,
    DataError,
    PackedDataset,
    batches,
    build_datasets,
    is_heldout,
    iter_documents,
    overlap_report,
)

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]
UNK, EOS = 0, 1
ID = {w: i + 2 for i, w in enumerate(WORDS)}  # the=2, cat=3, sat=4, on=5, mat=6, a=7, dog=8, ...


def make_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level: one id per whitespace-separated word, so expected streams can be written by hand."""
    vocab = {"<unk>": UNK, "<eos>": EOS, **ID}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "<eos>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **kwargs)


def ids(text: str) -> list[int]:
    return [ID.get(w, UNK) for w in text.split()]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def count_calls(monkeypatch, tok):
    """Counts tokenizer calls (patched on the class: `tok(...)` looks __call__ up on the type)."""
    cls = type(tok)
    original = cls.__call__
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return calls


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    return write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def split_docs(stream: np.ndarray) -> list[tuple[int, ...]]:
    """Inverse of packing: the documents between EOS tokens."""
    docs, cur = [], []
    for t in stream.tolist():
        if t == EOS:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    docs.append(tuple(cur))
    return docs


def cfg_for(tmp_path: Path, sources, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(sources=[str(s) for s in sources], **kw)


# ------------------------------------------------------------------------------ packing


def test_packing_puts_eos_between_documents(tmp_path, tok):
    corpus = tmp_path / "corpus"
    write(corpus / "01.txt", "the cat sat")
    write(corpus / "02.md", "on the mat")
    write_jsonl(corpus / "sub" / "03.jsonl", ["a dog", "   ", "ran far away"])  # blank doc skipped
    write(corpus / "notes.csv", "ignored")
    write(corpus / ".hidden.txt", "ignored too")

    train, heldout = build_datasets(cfg_for(tmp_path, [corpus], seq_len=4, heldout_fraction=0.0), tok)

    expected = ids("the cat sat") + [EOS] + ids("on the mat") + [EOS] + ids("a dog") + [EOS] + ids("ran far away")
    assert expected == [2, 3, 4, 1, 5, 2, 6, 1, 7, 8, 1, 9, 10, 11]
    assert train.num_tokens == len(expected) == 14
    assert len(train) == 3  # 14 // 4; the incomplete tail (2 tokens) is dropped
    got = torch.cat([train[i]["input_ids"] for i in range(len(train))])
    assert got.dtype == torch.long
    assert got.tolist() == expected[:12]
    assert train[0]["input_ids"].shape == (4,)
    assert len(heldout) == 0 and heldout.num_tokens == 0


def test_stream_is_identical_across_shards_and_seq_len_reuses_cache(tmp_path, tok, count_calls):
    docs = [" ".join(random.Random(i).choices(WORDS, k=7)) for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", docs)
    one = build_datasets(cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=5, heldout_fraction=0.0), tok)[0]
    many = build_datasets(
        cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=5, heldout_fraction=0.0, shard_tokens=6,
                cache_dir=str(tmp_path / "cache2")),
        tok,
    )[0]
    assert len(one.shards) == 1 and len(many.shards) > 5
    assert np.array_equal(one.read_tokens(), many.read_tokens())
    assert all(torch.equal(one[i]["input_ids"], many[i]["input_ids"]) for i in range(len(one)))

    calls_before = len(count_calls)
    other_len = build_datasets(cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=7, heldout_fraction=0.0), tok)[0]
    assert len(count_calls) == calls_before  # seq_len is cut at read time: same cache
    assert other_len.seq_len == 7 and np.array_equal(other_len.read_tokens(), one.read_tokens())


def test_max_tokens_truncates_training_stream(tmp_path, tok):
    docs = [" ".join(random.Random(i).choices(WORDS, k=6)) for i in range(10)]
    write_jsonl(tmp_path / "d.jsonl", docs)
    full = build_datasets(cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=4, heldout_fraction=0.0), tok)[0]
    cut = build_datasets(
        cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=4, heldout_fraction=0.0, max_tokens=17,
                tokenize_batch_docs=3),
        tok,
    )[0]
    assert cut.num_tokens == 17 and len(cut) == 4
    assert np.array_equal(cut.read_tokens(), full.read_tokens()[:17])


def test_special_token_text_in_corpus_is_not_a_real_eos(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", ["the <eos> cat", "sat"])
    train, _ = build_datasets(cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=2, heldout_fraction=0.0), tok)
    stream = train.read_tokens().tolist()
    assert stream.count(EOS) == 1 and stream[-2:] == [EOS, ID["sat"]]


# ------------------------------------------------------------------------------ sources


def test_all_source_kinds_are_read(tmp_path, tok):
    import datasets

    write(tmp_path / "a.txt", "the cat")
    write(tmp_path / "b.rst", "on the mat")
    write_jsonl(tmp_path / "c.jsonl", ["a dog", "ran far"])
    datasets.Dataset.from_dict({"text": ["dog sat", "cat ran"], "n": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["not used"]}),
            "train": datasets.Dataset.from_dict({"text": ["the dog"]}),
        }
    ).save_to_disk(str(tmp_path / "hfdict"))
    datasets.DatasetDict({"only": datasets.Dataset.from_dict({"text": ["far away"]})}).save_to_disk(
        str(tmp_path / "nested" / "hfsplit")
    )
    sources = [tmp_path / "a.txt", tmp_path / "b.rst", tmp_path / "c.jsonl", tmp_path / "hf",
               tmp_path / "hfdict", tmp_path / "nested"]

    assert list(iter_documents(sources)) == [
        "the cat", "on the mat", "a dog", "ran far", "dog sat", "cat ran", "the dog", "far away",
    ]
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["the cat"]  # a single source is fine

    train, _ = build_datasets(cfg_for(tmp_path, sources, seq_len=2, heldout_fraction=0.0), tok)
    # several sources are interleaved (next test), so only the documents are compared here
    assert sorted(split_docs(train.read_tokens())) == sorted(
        tuple(ids(t)) for t in ["the cat", "on the mat", "a dog", "ran far", "dog sat", "cat ran", "the dog", "far away"]
    )


def test_a_capped_stream_of_several_sources_holds_each_in_proportion_to_its_size(tmp_path, tok):
    """Read in turn, a cap inside the first source would drop the second one entirely."""
    big = [" ".join(random.Random(i).choices(["the", "cat", "sat", "mat"], k=4)) for i in range(30)]
    small = [" ".join(random.Random(i).choices(["dog", "ran", "far"], k=4)) for i in range(10)]
    write_jsonl(tmp_path / "big.jsonl", big)
    write_jsonl(tmp_path / "small.jsonl", small)  # every line as long as big's: a third of its bytes
    assert len({len(line) for line in (tmp_path / "big.jsonl").read_text().splitlines()}
               | {len(line) for line in (tmp_path / "small.jsonl").read_text().splitlines()}) == 1
    sources = [tmp_path / "big.jsonl", tmp_path / "small.jsonl"]

    def docs(max_tokens):
        train, _ = build_datasets(cfg_for(tmp_path, sources, seq_len=4, heldout_fraction=0.0, max_tokens=max_tokens), tok)
        return split_docs(train.read_tokens())

    capped = docs(20 * 4 + 19)  # 20 whole documents of 4 tokens, EOS between them
    assert len(capped) == 20
    from_small = sum(doc[0] in (ID["dog"], ID["ran"], ID["far"]) for doc in capped)
    assert from_small == 5  # 20 documents in the 30:10 ratio of the sizes
    assert sorted(docs(None)) == sorted(tuple(ids(t)) for t in big + small)  # uncut: every document once


# ------------------------------------------------------------------------------ held-out split


def test_heldout_documents_never_leak_into_train(tmp_path, tok):
    rng = random.Random(0)
    docs = sorted({" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(300)})
    dups = docs[:40]  # exact duplicates, in another file: must land on the same side as the original
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b.jsonl", dups)

    train, heldout = build_datasets(cfg_for(tmp_path, [tmp_path], seq_len=12, heldout_fraction=0.3), tok)

    train_docs = {hash(d) for d in split_docs(train.read_tokens())}
    held_docs = {hash(d) for d in split_docs(heldout.read_tokens())}
    assert train_docs and held_docs
    assert not train_docs & held_docs
    expected_held = {hash(tuple(ids(d))) for d in docs if is_heldout(d, 0.3)}
    assert held_docs == expected_held
    assert 0.15 < len(expected_held) / len(docs) < 0.45
    assert overlap_report(train, heldout) == 0  # 12-grams over 10 words: no chance collisions


def test_overlap_report_counts_shared_sequences():
    train = PackedDataset.from_tokens(np.arange(40, dtype=np.uint16), seq_len=4)  # 10 sequences
    heldout = PackedDataset.from_tokens(
        np.array([0, 1, 2, 3, 9, 9, 9, 9, 36, 37, 38, 39, 1, 2, 3, 4], dtype=np.uint32), seq_len=4
    )
    assert overlap_report(train, heldout) == 2
    hashes = train.sequence_hashes()
    assert hashes.shape == (10,) and len(set(hashes.tolist())) == 10


def test_explicit_heldout_sources_drop_duplicates_from_train(tmp_path, tok):
    write_jsonl(tmp_path / "train" / "t.jsonl", ["the cat sat", "a dog ran", "on the mat"])
    write_jsonl(tmp_path / "held" / "h.jsonl", ["a dog ran", "far away"])
    cfg = cfg_for(tmp_path, [tmp_path / "train"], heldout_sources=[str(tmp_path / "held")], seq_len=2)
    train, heldout = build_datasets(cfg, tok)
    assert split_docs(train.read_tokens()) == [tuple(ids("the cat sat")), tuple(ids("on the mat"))]
    assert split_docs(heldout.read_tokens()) == [tuple(ids("a dog ran")), tuple(ids("far away"))]


def many_files(folder: Path, n: int = 120, words: int = 12) -> list[str]:
    """n small text files whose first few are all training documents, as in a sorted docs folder."""
    docs = [" ".join(random.Random(i).choices(WORDS, k=words)) for i in range(n)]
    for i, doc in enumerate(docs):
        write(folder / f"{i:04d}.txt", doc)
    return docs


def test_heldout_split_does_not_depend_on_max_tokens(tmp_path, tok):
    docs = many_files(tmp_path / "docs")
    held = [d for d in docs if is_heldout(d, 0.05)]
    first_held = next(i for i, d in enumerate(docs) if is_heldout(d, 0.05))
    assert 2 <= len(held) < 20 and first_held * 13 > 20  # the 20-token budget fills before any held-out document
    expected = []
    for d in held:
        expected += ([EOS] if expected else []) + ids(d)

    streams = []
    for max_tokens in (20, 400, None):
        train, heldout = build_datasets(
            cfg_for(tmp_path, [tmp_path / "docs"], seq_len=8, heldout_fraction=0.05, max_tokens=max_tokens,
                    tokenize_batch_docs=4),
            tok,
        )
        assert len(heldout) > 0
        assert heldout.read_tokens().tolist() == expected
        if max_tokens is not None:
            assert train.num_tokens == max_tokens
        streams.append(train.read_tokens())
    assert np.array_equal(streams[0], streams[2][:20]) and np.array_equal(streams[1], streams[2][:400])
    assert not {tuple(ids(d)) for d in held} & set(split_docs(streams[2]))


def test_heldout_tokens_caps_the_heldout_stream_whatever_max_tokens_is(tmp_path, tok):
    docs = many_files(tmp_path / "docs", n=200)
    full = build_datasets(cfg_for(tmp_path, [tmp_path / "docs"], seq_len=8, heldout_fraction=0.1), tok)[1]
    assert full.num_tokens > 30
    for max_tokens in (40, 1000):
        heldout = build_datasets(
            cfg_for(tmp_path, [tmp_path / "docs"], seq_len=8, heldout_fraction=0.1, max_tokens=max_tokens,
                    heldout_tokens=30),
            tok,
        )[1]
        assert np.array_equal(heldout.read_tokens(), full.read_tokens()[:30])
    tiny = build_datasets(
        cfg_for(tmp_path, [tmp_path / "docs"], seq_len=8, heldout_fraction=0.1, max_tokens=40, heldout_tokens=3), tok
    )[1]
    assert tiny.num_tokens == 8 and len(tiny) == 1  # never less than one sequence


# ------------------------------------------------------------------------------ cache


def test_second_build_reuses_cache_without_tokenizing(tmp_path, tok, count_calls):
    write_jsonl(tmp_path / "c" / "d.jsonl", [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(50)])
    cfg = cfg_for(tmp_path, [tmp_path / "c"], seq_len=4, heldout_fraction=0.2)

    train1, held1 = build_datasets(cfg, tok)
    assert count_calls, "first build must tokenise"
    n_first = len(count_calls)
    train2, held2 = build_datasets(cfg, tok)
    assert len(count_calls) == n_first, "second build must come from the cache"
    assert np.array_equal(train1.read_tokens(), train2.read_tokens())
    assert np.array_equal(held1.read_tokens(), held2.read_tokens())
    assert all(isinstance(s, np.memmap) for s in train2.shards)
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []

    write_jsonl(tmp_path / "c" / "d.jsonl", ["the cat sat on the mat"] * 3)  # edit => new key
    build_datasets(cfg_for(tmp_path, [tmp_path / "c"], seq_len=4, heldout_fraction=0.0), tok)
    assert len(count_calls) > n_first


def test_interrupted_build_is_never_trusted(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(30)])
    cfg = cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=4, heldout_fraction=0.0, tokenize_batch_docs=5,
                  shard_tokens=10)
    cls = type(tok)
    original = cls.__call__
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(cfg, tok)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial cache left behind

    monkeypatch.setattr(cls, "__call__", original)
    train, _ = build_datasets(cfg, tok)
    assert train.num_tokens == 30 * 8 + 29


# ------------------------------------------------------------------------------ batches


def seq_ids(batch: dict) -> list[int]:
    """Sequence index of each row (the toy stream is arange, so row[0] // seq_len)."""
    return (batch["input_ids"][:, 0] // 4).tolist()


@pytest.fixture(scope="module")
def toy():
    return PackedDataset.from_tokens(np.arange(10 * 4 + 3, dtype=np.uint16), seq_len=4)  # 10 sequences


def test_batches_are_seeded_and_reshuffle_each_epoch(toy):
    first = list(islice(batches(toy, batch_size=5, seed=1), 4))  # 2 epochs exactly
    assert all(b["input_ids"].shape == (5, 4) and b["input_ids"].dtype == torch.long for b in first)
    epoch0 = seq_ids(first[0]) + seq_ids(first[1])
    epoch1 = seq_ids(first[2]) + seq_ids(first[3])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    again = list(islice(batches(toy, batch_size=5, seed=1), 4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    other = list(islice(batches(toy, batch_size=5, seed=2), 4))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


@pytest.mark.parametrize("k", [0, 1, 3, 7, 11])
def test_batches_resume_from_step_matches_uninterrupted_run(toy, k):
    fresh = list(islice(batches(toy, batch_size=4, seed=7), 14))  # batch 4 over 10 seqs straddles epochs
    resumed = list(islice(batches(toy, batch_size=4, seed=7, start_step=k), 14 - k))
    assert len(resumed) == 14 - k
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(fresh[k:], resumed))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_global_batch(toy, world_size):
    single = list(islice(batches(toy, batch_size=8, seed=3, start_step=2), 6))
    per_rank = [
        list(islice(batches(toy, batch_size=8, seed=3, start_step=2, rank=r, world_size=world_size), 6))
        for r in range(world_size)
    ]
    for step in range(6):
        parts = [per_rank[r][step]["input_ids"] for r in range(world_size)]
        assert all(p.shape == (8 // world_size, 4) for p in parts)
        assert torch.equal(torch.cat(parts), single[step]["input_ids"])


def test_batches_reject_bad_arguments(toy):
    with pytest.raises(DataError, match="divisible"):
        next(batches(toy, batch_size=6, seed=0, world_size=4))
    with pytest.raises(DataError, match="empty"):
        next(batches(PackedDataset.from_tokens(np.arange(3), seq_len=4), batch_size=1, seed=0))


# ------------------------------------------------------------------------------ errors


def assert_one_line_error(cfg_or_call, tok, match: str):
    with pytest.raises(DataError, match=match) as info:
        if isinstance(cfg_or_call, DataConfig):
            build_datasets(cfg_or_call, tok)
        else:
            cfg_or_call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_error_missing_path(tmp_path, tok):
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "nope"]), tok, "data source not found: .*nope")


def test_error_folder_without_supported_files(tmp_path, tok):
    write(tmp_path / "f" / "data.csv", "a,b")
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "f"]), tok, "no supported files in .*f")
    write(tmp_path / "g.csv", "a,b")
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "g.csv"]), tok, "unsupported data file")


def test_error_unreadable_files(tmp_path, tok):
    (tmp_path / "bad.txt").write_bytes(b"the cat \xff\xfe sat")
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "bad.txt"]), tok, r"cannot read .*bad.txt: not valid UTF-8")
    write(tmp_path / "bad.jsonl", '{"text": "the cat"}\n{"text": oops\n')
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "bad.jsonl"]), tok, r"bad.jsonl:2: invalid JSON")
    write(tmp_path / "notext.jsonl", '{"body": "the cat"}\n')
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "notext.jsonl"]), tok, r"notext.jsonl:1: no 'text' field")


def test_error_dataset_without_text_column(tmp_path, tok):
    import datasets

    datasets.Dataset.from_dict({"body": ["the cat"]}).save_to_disk(str(tmp_path / "hf"))
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "hf"]), tok, "no 'text' column")


def test_error_empty_corpus(tmp_path, tok):
    write(tmp_path / "c" / "a.txt", "  \n\n ")
    write_jsonl(tmp_path / "c" / "b.jsonl", ["", "\t"])
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "c"]), tok, "corpus is empty")


def test_error_corpus_too_small_for_one_training_sequence(tmp_path, tok):
    write(tmp_path / "a.txt", "the cat sat")
    msg = assert_one_line_error(
        cfg_for(tmp_path, [tmp_path / "a.txt"], seq_len=8, heldout_fraction=0.0), tok, "corpus too small"
    )
    assert "training split has 3 tokens" in msg and "at least 8" in msg


def test_error_corpus_too_small_for_one_heldout_sequence(tmp_path, tok):
    candidates = [f"the cat sat on the mat {w}" for w in WORDS] + [f"a dog {w}" for w in WORDS]
    held = next(t for t in candidates if t.startswith("a dog") and is_heldout(t, 0.5))
    kept = [t for t in candidates if t.startswith("the cat") and not is_heldout(t, 0.5)]
    write_jsonl(tmp_path / "d.jsonl", kept + [held])
    msg = assert_one_line_error(
        cfg_for(tmp_path, [tmp_path / "d.jsonl"], seq_len=4, heldout_fraction=0.5), tok, "corpus too small"
    )
    assert "held-out split has 3 tokens" in msg and "at least 4" in msg


def test_error_heldout_too_small_gives_the_real_corpus_size_whatever_max_tokens_is(tmp_path, tok):
    docs = [f"the cat sat on the mat {w}" for w in WORDS]
    kept = [t for t in docs if not is_heldout(t, 0.05)]
    assert len(kept) >= 8
    for i, doc in enumerate(kept):
        write(tmp_path / "c" / f"{i}.txt", doc)
    for max_tokens, size in ((None, f"{7 * len(kept)} tokens"), (10, "at least 14 tokens")):
        msg = assert_one_line_error(
            cfg_for(tmp_path, [tmp_path / "c"], seq_len=4, heldout_fraction=0.05, max_tokens=max_tokens), tok,
            "corpus too small",
        )
        assert f"held-out split has 0 tokens (0 of the corpus's {len(kept)} documents, {size} in all" in msg
        assert "heldout_fraction=0.05" in msg and "at least 4 for one sequence" in msg

    write_jsonl(tmp_path / "h.jsonl", ["a", "far"])
    msg = assert_one_line_error(
        cfg_for(tmp_path, [tmp_path / "c"], heldout_sources=[str(tmp_path / "h.jsonl")], seq_len=4, max_tokens=10),
        tok, "corpus too small",
    )
    assert "held-out split has 3 tokens (all 2 documents of the held-out sources)" in msg and "at least 4" in msg


def test_error_tokenizer_without_eos(tmp_path):
    write(tmp_path / "a.txt", "the cat sat")
    assert_one_line_error(cfg_for(tmp_path, [tmp_path / "a.txt"]), make_tokenizer(eos=False), "no EOS token")


def test_error_bad_config():
    with pytest.raises(DataError, match="heldout_fraction"):
        DataConfig(sources=["x"], heldout_fraction=1.0)
    with pytest.raises(DataError, match="seq_len"):
        DataConfig(sources=["x"], seq_len=1)
    with pytest.raises(DataError, match="heldout_tokens"):
        DataConfig(sources=["x"], heldout_tokens=0)
