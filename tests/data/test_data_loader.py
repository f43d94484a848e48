"""TokenLoader: batch semantics, determinism, resume, data-parallel splits, mixing shares."""
import json

import numpy as np
import pytest
import torch

from moetrain.config import DataConfig
from moetrain.data import DataError, TokenLoader
from moetrain.data.mixing import doc_multipliers, expected_share


def ranged_docs(lengths, sources=None):
    """Documents of consecutive ids with a gap between documents: label == input + 1 iff same document."""
    docs, base = [], 10
    for i, n in enumerate(lengths):
        docs.append((np.arange(base, base + n), 0 if sources is None else sources[i]))
        base += n + 1
    return docs, base


def loader(d, seq=32, B=2, rank=0, world=1, seed=0, split=None, doc_masking=True, **cfg):
    return TokenLoader(DataConfig(dir=d, recipe=None, **cfg), seq_len=seq, micro_batch_size=B, dp_rank=rank,
                       dp_world=world, seed=seed, split=split, doc_masking=doc_masking)


def rows(batch, B, S):
    """input_ids as [B, S] numpy, whatever the layout."""
    return batch["input_ids"].reshape(B, S).numpy()


LENGTHS = [40, 300, 77, 1200, 5, 640, 90, 2000, 33, 410]


@pytest.fixture
def folder(token_folder):
    docs, vocab = ranged_docs(LENGTHS)
    ev, _ = ranged_docs([500])
    return token_folder({"train": docs, "eval": ev}, vocab=vocab, shard_tokens=1500)


def test_packed_batch_semantics(folder):
    S, B = 32, 4
    L = loader(folder, seq=S, B=B)
    firsts = {10 + sum(LENGTHS[:i]) + i for i in range(len(LENGTHS))}
    lasts = {f + n - 1 for f, n in zip(sorted(firsts), LENGTHS)}
    for _ in range(30):
        b = L.next_batch()
        inp, lab, pos, cu = (b[k][0].numpy() if k != "cu_seqlens" else b[k].numpy() for k in
                             ("input_ids", "labels", "position_ids", "cu_seqlens"))
        assert b["input_ids"].shape == (1, B * S) and b["cu_seqlens"].dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == B * S and set(range(0, B * S + 1, S)) <= set(cu.tolist())
        valid = lab != -100
        assert (lab[valid] == inp[valid] + 1).all()          # next token of the same document
        assert set(inp[~valid].tolist()) <= lasts            # -100 only where a document ends
        for a, z in zip(cu[:-1], cu[1:]):
            assert (pos[a:z] == np.arange(z - a)).all()
            assert (np.diff(inp[a:z]) == 1).all()            # one contiguous document piece
            assert a % S == 0 or inp[a] in firsts            # inner boundaries start documents


def test_window_and_unmasked_shapes(folder):
    S, B = 64, 3
    b = loader(folder, seq=S, B=B, mode="window").next_batch()
    assert b["cu_seqlens"] is None and b["input_ids"].shape == (B, S)
    assert (b["labels"] == b["input_ids"] + 1).all()          # windows never cross documents
    assert (b["position_ids"] == np.arange(S)).all()
    b = loader(folder, seq=S, B=B, doc_masking=False).next_batch()
    assert b["cu_seqlens"] is None and b["input_ids"].shape == (B, S)
    assert (b["position_ids"] == np.arange(S)).all()
    lab, inp = b["labels"], b["input_ids"]
    assert ((lab == -100) | (lab == inp + 1)).all()


def test_epoch_covers_every_token_once_and_reshuffles(folder):
    S = 32
    L = loader(folder, seq=S, B=1)
    n_rows = L._plan(0).rows
    assert n_rows == (sum(LENGTHS) - 1) // S
    epoch0 = np.concatenate([rows(L.next_batch(), 1, S)[0] for _ in range(n_rows)])
    assert len(np.unique(epoch0)) == len(epoch0) == n_rows * S
    assert L.state_dict()["epoch"] == 1 and L.state_dict()["row"] == 0
    epoch1 = np.concatenate([rows(L.next_batch(), 1, S)[0] for _ in range(n_rows)])
    assert not np.array_equal(epoch0, epoch1)                 # reshuffled from seed + epoch
    again = loader(folder, seq=S, B=1)
    assert np.array_equal(np.concatenate([rows(again.next_batch(), 1, S)[0] for _ in range(n_rows)]), epoch0)
    other = loader(folder, seq=S, B=1, seed=1)
    assert not np.array_equal(rows(other.next_batch(), 1, S), epoch0[:S][None])


def test_two_ranks_cover_what_one_rank_covers(folder):
    S, steps = 32, 20
    one = loader(folder, seq=S, B=2, world=1)
    r0, r1 = (loader(folder, seq=S, B=1, rank=r, world=2) for r in (0, 1))
    for _ in range(steps):
        expect = rows(one.next_batch(), 2, S)
        got = np.concatenate([rows(r0.next_batch(), 1, S), rows(r1.next_batch(), 1, S)])
        assert np.array_equal(got, expect)
    assert r0.state_dict() == r1.state_dict()


def test_ranks_disjoint_over_an_epoch(folder):
    S, B, W = 32, 2, 3
    ls = [loader(folder, seq=S, B=B, rank=r, world=W) for r in range(W)]
    n_rows = ls[0]._plan(0).rows
    seen = []
    for _ in range(-(-n_rows // (B * W))):
        seen += [rows(x.next_batch(), B, S) for x in ls]
    flat = np.concatenate(seen)[:n_rows]                      # step by step, rank by rank = global order
    assert len(np.unique(flat)) == flat.size == n_rows * S


@pytest.mark.parametrize("mode", ["packed", "window"])
def test_resume_gives_identical_next_batches(folder, mode):
    S, B = 32, 2
    a = loader(folder, seq=S, B=B, mode=mode, upsample_min_len=500, upsample_factor=2.5)
    for _ in range(37):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))            # what a checkpoint stores
    expect = [a.next_batch() for _ in range(60)]              # crosses an epoch boundary
    b = loader(folder, seq=S, B=B, mode=mode, upsample_min_len=500, upsample_factor=2.5)
    b.load_state_dict(state)
    for e in expect:
        g = b.next_batch()
        for k in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(g[k], e[k])


def test_resume_with_another_world_size_resplits(folder):
    S, steps = 32, 9
    whole = loader(folder, seq=S, B=2)
    ref = [rows(whole.next_batch(), 2, S) for _ in range(2 * steps)]
    r0, r1 = (loader(folder, seq=S, B=1, rank=r, world=2) for r in (0, 1))
    first = [np.concatenate([rows(r0.next_batch(), 1, S), rows(r1.next_batch(), 1, S)]) for _ in range(steps)]
    assert all(np.array_equal(x, y) for x, y in zip(first, ref[:steps]))
    single = loader(folder, seq=S, B=2)
    single.load_state_dict(r0.state_dict())                   # 2 ranks -> 1 rank
    rest = [rows(single.next_batch(), 2, S) for _ in range(steps)]
    assert all(np.array_equal(x, y) for x, y in zip(rest, ref[steps:]))


def test_state_from_other_settings_is_refused(folder):
    a = loader(folder, seq=32)
    a.next_batch()
    with pytest.raises(DataError, match="seq_len 32 .saved. vs 64"):
        loader(folder, seq=64).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="mix_hash"):
        loader(folder, seq=32, upsample_min_len=100, upsample_factor=2).load_state_dict(a.state_dict())


def test_eval_split_and_errors(folder):
    b = loader(folder, seq=32, B=2, split="eval", synthetic={"passkey": 0.5}).next_batch()
    assert b["input_ids"].min() >= 10 and b["input_ids"].max() < 10 + 500   # only the held-out document
    with pytest.raises(DataError, match="window mode needs a document of at least 2001"):
        loader(folder, seq=2000, mode="window")
    with pytest.raises(DataError, match="no 'test' split"):
        loader(folder, split="test")
    with pytest.raises(DataError, match="unknown source 'nope'"):
        loader(folder, source_weights={"nope": 1.0})
    with pytest.raises(DataError, match="dp_rank=2"):
        loader(folder, rank=2, world=2)


def _measure(L, n_rows, S, B, owner):
    counts = np.zeros(owner.max() + 1)
    for _ in range(n_rows // B):
        counts += np.bincount(owner[rows(L.next_batch(), B, S).ravel()], minlength=len(counts))
    return counts / counts.sum()


@pytest.mark.parametrize("factor", [3.0, 2.5])
def test_upsampling_share_matches_expected(token_folder, factor):
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(2000, 6000, 6), rng.integers(50, 900, 40)])
    docs, vocab = ranged_docs(lengths)
    d = token_folder({"train": docs}, vocab=vocab)
    owner = np.zeros(vocab, dtype=np.int64)
    for ids, _ in docs:
        owner[ids] = 1 if len(ids) > 1000 else 0               # 1 = long document
    S, B = 64, 8
    L = loader(d, seq=S, B=B, upsample_min_len=1000, upsample_factor=factor)
    mult = doc_multipliers(lengths, np.zeros(len(lengths), int), ["s0"], {}, 1000, factor)
    want = expected_share(lengths, mult, lengths > 1000)
    natural = lengths[lengths > 1000].sum() / lengths.sum()
    got = _measure(L, L._plan(0).rows, S, B, owner)[1]
    assert abs(got - want) < 0.02 and want > natural + 0.1


def test_source_weights_keep_mixture_and_upsample_within_source(token_folder):
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(3000, 5000, 4), rng.integers(100, 600, 30), rng.integers(100, 3000, 20)])
    srcs = np.array([0] * 34 + [1] * 20)
    docs, vocab = ranged_docs(lengths, srcs)
    d = token_folder({"train": docs}, sources=("books", "web"), vocab=vocab)
    owner = np.zeros(vocab, dtype=np.int64)
    for (ids, s) in docs:
        owner[ids] = 2 * s + (len(ids) > 1000)                # books-short, books-long, web-short, web-long
    S, B = 64, 8
    L = loader(d, seq=S, B=B, source_weights={"books": 0.3, "web": 0.7}, upsample_min_len=1000, upsample_factor=4)
    share = _measure(L, L._plan(0).rows, S, B, owner)
    assert abs(share[0] + share[1] - 0.3) < 0.02
    mult = doc_multipliers(lengths, srcs, ["books", "web"], {"books": 0.3, "web": 0.7}, 1000, 4)
    want_books_long = expected_share(lengths, mult, (srcs == 0) & (lengths > 1000))
    assert abs(share[1] - want_books_long) < 0.02
