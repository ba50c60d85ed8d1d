"""The tiny-model training tool's data preparation (``tools/train_tiny_moe.py``): short pieces and windows that
start at them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools import train_tiny_moe

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-mixtral"


@pytest.fixture(scope="module")
def script():
    return train_tiny_moe


def test_book_text_is_cut_at_blank_lines_only(script):
    paragraph = "It was a dark and\nstormy night; the rain fell\nin torrents."  # hard-wrapped lines
    doc = "\n\n".join([paragraph] * 6)
    pieces = script.split_short_pieces(doc, max_chars=130)
    assert len(pieces) == 3
    assert all(p.startswith("It was a dark") and p.endswith("torrents.") for p in pieces)
    assert "\n\n".join(pieces) == doc


def test_web_text_without_blank_lines_is_cut_at_line_breaks(script):
    doc = "\n".join(f"Line number {i} of a web page." for i in range(10))
    pieces = script.split_short_pieces(doc, max_chars=70)
    assert len(pieces) == 5
    assert pieces[1] == "Line number 2 of a web page.\nLine number 3 of a web page."


def test_a_long_paragraph_stays_whole(script):
    doc = "short.\n\n" + "x" * 500 + "\n\nend."
    assert script.split_short_pieces(doc, max_chars=100) == ["short.", "x" * 500, "end."]


def test_aligned_windows_start_at_every_piece_and_cover_every_token(script):
    piece_starts = torch.tensor([0, 3, 20, 21, 40])
    starts = script.aligned_window_starts(piece_starts, stream_len=60, seq_len=8)
    assert set(piece_starts.tolist()) <= set(starts.tolist())
    assert (starts + 8 <= 60).all()
    covered = torch.zeros(60, dtype=torch.bool)
    for s in starts.tolist():
        covered[s : s + 8] = True
    assert covered[:56].all()  # the last piece's final window would run past the end
    assert {29, 37} <= set(starts.tolist())  # the 19-token piece at 21 gets windows 8 and 16 tokens later


def test_sampler_windows_begin_with_the_separator(script):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    docs = ["First paragraph here.\n\nSecond one.\n\nThird.", "A web page\nwith two lines", "Last document text."]
    stream = script.tokenize_stream(tok, docs)
    n_train = len(stream) - 3
    ids, piece_starts = script.short_piece_stream(tok, docs, n_train, max_chars=15)
    eot = tok.convert_tokens_to_ids(script.EOT)
    assert (ids[piece_starts] == eot).all()
    assert len(piece_starts) == 5 + 1  # 3 + 2 pieces, and the split-off document's training-side tokens
    assert tok.decode(ids[piece_starts[1] + 1 : piece_starts[2]]) == "Second one."
    assert ids[piece_starts[-1] :].tolist() == stream[len(stream) - len(ids[piece_starts[-1] :]) - 3 : -3].tolist()
    sampler = script.BatchSampler(ids, 4, 2, torch.Generator().manual_seed(0), piece_starts)
    for _ in range(4):
        batch = sampler.next()
        assert batch.shape == (2, 4)
        assert (batch[:, 0] == eot).any()


def test_negative_piece_chars_is_refused_with_the_flag_named(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "/tmp/unused", "--piece-chars", "-5"])
    assert "--piece-chars must be 0 (off) or a positive" in capsys.readouterr().err
