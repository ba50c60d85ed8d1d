"""CalibrationDataModule / load_calibration_tokens: sources, shapes, determinism, errors (offline)."""

from __future__ import annotations

import json

import pytest
import torch

from diep_lightning.data import BUNDLED_C4_PATH, CalibrationDataModule, load_calibration_tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory with one .jsonl and one .txt file cut from the bundled sample."""
    d = tmp_path_factory.mktemp("corpus")
    rows = [json.loads(line) for line in BUNDLED_C4_PATH.read_text(encoding="utf-8").splitlines()]
    with (d / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows[:40]:
            fh.write(json.dumps({"content": r["text"], "id": r["url"]}) + "\n")
    with (d / "text.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows[40:80]:
            fh.write(json.dumps({"text": r["text"]}) + "\n")
    (d / "book.txt").write_text("\n\n".join(r["text"] for r in rows[80:120]), encoding="utf-8")
    sub = d / "dir"
    sub.mkdir()
    (sub / "a.txt").write_text(rows[120]["text"] * 5, encoding="utf-8")
    (sub / "b.jsonl").write_text("\n".join(json.dumps({"text": r["text"]}) for r in rows[121:140]), encoding="utf-8")
    (sub / "ignored.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    return d


def _dm(tok, **kw):
    kw.setdefault("num_samples", 8)
    kw.setdefault("seq_len", 32)
    kw.setdefault("batch_size", 3)
    dm = CalibrationDataModule(**kw)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    return dm


def test_bundled_shape_and_batches(tiny_tokenizer):
    dm = _dm(tiny_tokenizer, val_samples=2)
    assert dm.train_tokens.shape == (8, 32) and dm.train_tokens.dtype == torch.long
    assert dm.val_tokens.shape == (2, 32)
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(3, 32), (3, 32), (2, 32)]
    assert all(b["attention_mask"].dtype == torch.long and bool(b["attention_mask"].all()) for b in batches)
    assert len(list(dm.val_dataloader())) == 1
    assert int(dm.train_tokens.max()) < len(tiny_tokenizer)
    # validation windows are disjoint from training windows
    train_rows = {tuple(r) for r in dm.train_tokens.tolist()}
    assert not any(tuple(r) in train_rows for r in dm.val_tokens.tolist())


def test_tokenizer_by_path_matches_object(tiny_tokenizer):
    by_obj = _dm(tiny_tokenizer).train_tokens
    by_path = CalibrationDataModule(tokenizer=tiny_tokenizer.name_or_path, num_samples=8, seq_len=32)
    by_path.setup()
    assert torch.equal(by_obj, by_path.train_tokens)
    assert torch.equal(by_obj, load_calibration_tokens(tiny_tokenizer, num_samples=8, seq_len=32))
    assert by_path.val_dataloader() == []


def test_determinism_and_seed(tiny_tokenizer):
    a = load_calibration_tokens(tiny_tokenizer, num_samples=16, seq_len=24, seed=3)
    b = load_calibration_tokens(tiny_tokenizer, num_samples=16, seq_len=24, seed=3)
    c = load_calibration_tokens(tiny_tokenizer, num_samples=16, seq_len=24, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # train samples do not depend on the number of validation samples
    assert torch.equal(_dm(tiny_tokenizer, val_samples=0).train_tokens, _dm(tiny_tokenizer, val_samples=5).train_tokens)
    # the shuffled train loader is seeded too
    first = lambda: next(iter(_dm(tiny_tokenizer).train_dataloader()))["input_ids"]  # noqa: E731
    assert torch.equal(first(), first())


@pytest.mark.parametrize(
    "source, extra",
    [("docs.jsonl", {"text_field": "content"}), ("text.jsonl", {}), ("book.txt", {}), ("dir", {})],
)
def test_local_sources(tiny_tokenizer, corpus, source, extra):
    dm = _dm(tiny_tokenizer, sources=str(corpus / source), **extra)
    assert dm.train_tokens.shape == (8, 32)
    text = tiny_tokenizer.decode(dm.train_tokens[0])
    assert len(text) > 20


def test_mix_with_weights(tiny_tokenizer, corpus):
    srcs = ["bundled", str(corpus / "book.txt")]
    t = load_calibration_tokens(tiny_tokenizer, srcs, weights=[3, 1], num_samples=12, seq_len=32)
    assert t.shape == (12, 32)
    only_bundled = {tuple(r) for r in load_calibration_tokens(tiny_tokenizer, srcs, [1, 0], 40, 32).tolist()}
    only_book = {tuple(r) for r in load_calibration_tokens(tiny_tokenizer, srcs, [0, 1], 40, 32).tolist()}
    assert only_bundled.isdisjoint(only_book)
    # 3:1 -> 9 rows from the bundled sample's windows, 3 from the book's (same per-source seeds)
    bundled9 = {tuple(r) for r in load_calibration_tokens(tiny_tokenizer, srcs, [1, 0], 9, 32).tolist()}
    rows = [tuple(r) for r in t.tolist()]
    assert sum(r in bundled9 for r in rows) == 9
    dm = _dm(tiny_tokenizer, sources=srcs, weights=[0.5, 0.5], num_samples=6)
    assert dm.train_tokens.shape == (6, 32)


def test_document_sampling(tiny_tokenizer, corpus):
    t = load_calibration_tokens(tiny_tokenizer, str(corpus / "dir"), num_samples=6, seq_len=64, sampling="document")
    assert t.shape == (6, 64)
    with pytest.raises(ValueError, match="seq_len"):
        load_calibration_tokens(tiny_tokenizer, str(corpus / "text.jsonl"), num_samples=2, seq_len=10**6, sampling="document")


@pytest.mark.parametrize(
    "kwargs, exc, arg",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"seq_len": -1}, ValueError, "seq_len"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"sources": ["bundled", "bundled"], "weights": [1.0]}, ValueError, "weights"),
        ({"sources": ["bundled", "bundled"], "weights": [1.0, -1.0]}, ValueError, "weights"),
        ({"sources": "wikipedia"}, ValueError, "sources"),
        ({"sources": "/nonexistent/file.jsonl"}, FileNotFoundError, "sources"),
        ({"sampling": "random"}, ValueError, "sampling"),
        ({"val_samples": -1}, ValueError, "val_samples"),
    ],
)
def test_init_errors(kwargs, exc, arg):
    with pytest.raises(exc) as ei:
        CalibrationDataModule(**kwargs)
    msg = str(ei.value)
    assert arg in msg and "\n" not in msg


def test_c4_offline_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"sources\[0\]='c4'.*offline|OFFLINE"):
        CalibrationDataModule(sources="c4")


def test_setup_errors(tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sources\[0\].*empty") as ei:
        _dm(tiny_tokenizer, sources=str(empty))
    assert "\n" not in str(ei.value)

    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        _dm(tiny_tokenizer, sources=str(empty_txt))

    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"content": "hello there", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"text_field='text'.*\['content', 'id'\].*text_field='content'"):
        _dm(tiny_tokenizer, sources=str(nofield))

    small = tmp_path / "small.txt"
    small.write_text("just a few words of text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"found \d+ tokens but 8 x seq_len=32 = 256 are needed.*num_samples") as ei:
        _dm(tiny_tokenizer, sources=str(small))
    assert "\n" not in str(ei.value)

    dm = CalibrationDataModule(num_samples=2, seq_len=8)
    with pytest.raises(ValueError, match="tokenizer"):
        dm.setup()


def test_each_rank_keeps_its_samples_every_epoch():
    """The teacher cache holds a rank's own samples only if the rank sees the same ones each epoch; with one
    replica the order is DistributedSampler's, so single-process runs are unchanged."""
    from torch.utils.data import DistributedSampler

    from diep_lightning.data import RankShardSampler, TokenBlockDataset

    data = TokenBlockDataset(torch.zeros(10, 4, dtype=torch.long))
    for epoch in range(3):
        ours, stock = (cls(data, num_replicas=1, rank=0, shuffle=True, seed=7) for cls in (RankShardSampler,
                                                                                           DistributedSampler))
        ours.set_epoch(epoch)
        stock.set_epoch(epoch)
        assert list(ours) == list(stock)
    shards = {}
    for rank in range(3):
        seen = []
        for epoch in range(3):
            sampler = RankShardSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) == len(sampler) == 4  # equal lengths, as DistributedSampler pads
            seen.append(order)
        assert len({tuple(sorted(set(o))) for o in seen}) == 1, "a rank's samples changed between epochs"
        assert seen[0] != seen[1] or seen[1] != seen[2], "the order within a shard is shuffled per epoch"
        shards[rank] = set(seen[0])
    assert set().union(*shards.values()) == set(range(10))
    assert not shards[0] & shards[1] and not shards[1] & shards[2] and not shards[0] & shards[2]
