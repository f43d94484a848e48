"""TokenLoader: deterministic, resumable, data-parallel batches from a prepared folder.

The data is one endless global sequence of *slots* (rows of seq_len + 1 tokens),
fixed by (seed, data, settings) alone. Each call hands out the next
micro_batch_size * dp_world slots: rank r takes its contiguous micro_batch_size
of them. A slot is a synthetic task row with the configured rate (decided by a
hash of the slot number) and otherwise the next row of the current epoch plan
(mixing.py); an epoch that runs out continues into the next one, reshuffled.

So the state is three integers (slot, epoch, row) shared by all ranks. Resuming
with another world size re-splits the same global sequence: nothing is skipped
or repeated. Shapes (B = micro_batch_size, S = seq_len):
  window mode, or packed with doc_masking=False: [B, S], cu_seqlens None
  packed mode with doc_masking: [1, B*S], cu_seqlens int32 [n_segments + 1]
labels are already shifted (labels[t] is the target of position t) and are
-100 wherever the next token belongs to another document (or is padding).
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch

from . import synthetic
from .errors import DataError
from .mixing import EpochPlan, doc_multipliers
from .shards import SplitData
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)
_SLOT_TAG, _TASK_TAG = 0x51A7, 0x7A5C
STATE_VERSION = 1


def parse_synthetic(rates: dict) -> list[tuple[str, float]]:
    """{task: rate} -> [(task, cumulative rate)], checked."""
    out, total = [], 0.0
    for task, rate in sorted((rates or {}).items()):
        if task not in synthetic.TASKS:
            raise DataError(f"data.synthetic has unknown task '{task}'; use {', '.join(synthetic.TASKS)}")
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise DataError(f"data.synthetic.{task}={rate!r} must be a fraction in [0, 1]")
        total += float(rate)
        if rate > 0:
            out.append((task, total))
    if total > 1:
        raise DataError(f"data.synthetic rates add up to {total:g} > 1; lower them")
    return out


class TokenLoader:
    """Endless batches for one data-parallel rank; state_dict() resumes the exact next batch."""

    def __init__(self, data_cfg, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_world: int,
                 seed: int, split: str | None = None, doc_masking: bool = True):
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must be positive")
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world})")
        self.split = split or data_cfg.split
        self.mode = data_cfg.mode
        if self.mode not in ("packed", "window"):
            raise DataError(f"data.mode='{self.mode}' must be packed or window")
        self.seq_len, self.batch, self.rank, self.world, self.seed = seq_len, micro_batch_size, dp_rank, dp_world, seed
        self.doc_masking = doc_masking
        self.data = SplitData(data_cfg.dir, self.split, verify_hashes=getattr(data_cfg, "verify_shards", True))
        self.vocab_size = self.data.vocab_size
        if len(self.data.docs) == 0:
            raise DataError(f"the '{self.split}' split of '{data_cfg.dir}' has no documents; use another "
                            "split or hold out documents (recipe eval_documents)")
        # Mixing and synthetic tasks shape training only; eval reads the natural distribution.
        train = self.split == "train"
        self.mult = doc_multipliers(self.data.lengths, self.data.docs[:, 3], self.data.sources,
                                    data_cfg.source_weights if train else {},
                                    data_cfg.upsample_min_len if train else 0,
                                    data_cfg.upsample_factor if train else 1.0)
        self.tasks = parse_synthetic(data_cfg.synthetic) if train else []
        self._tokenizer = load_tokenizer(data_cfg.dir) if self.tasks else None
        for task, _ in self.tasks:  # fail now, not at some later step, when rows are too short
            try:  # 20 tokens of headroom: keys and fillers vary in length from row to row
                synthetic.training_example(task, self._tokenizer, seq_len + 1 - 20, np.random.default_rng(0))
            except DataError as e:
                raise DataError(f"data.synthetic task '{task}' does not fit seq_len={seq_len} ({e})") from None
        self.fingerprint = self._fingerprint(data_cfg, train)
        self._plans: dict[int, EpochPlan] = {}
        if self._plan(0).rows == 0:
            need = f"a document of at least {seq_len + 1} tokens" if self.mode == "window" \
                else f"at least {seq_len + 1} tokens"
            raise DataError(f"the '{self.split}' split of '{data_cfg.dir}' cannot fill one row: {self.mode} "
                            f"mode needs {need}; use a shorter seq_len or mode packed")
        self.slot = self.epoch = self.row = 0

    def _fingerprint(self, cfg, train: bool) -> dict:
        mix = {"weights": cfg.source_weights, "min_len": cfg.upsample_min_len, "factor": cfg.upsample_factor,
               "synthetic": cfg.synthetic} if train else {}
        mix_hash = hashlib.sha256(json.dumps(mix, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"data_hash": self.data.manifest.get("data_hash", "")[:16], "split": self.split,
                "mode": self.mode, "seq_len": self.seq_len, "seed": self.seed, "mix_hash": mix_hash}

    # ------------------------------------------------------------------ positions
    def _plan(self, epoch: int) -> EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            plan = EpochPlan(self.data.lengths, self.mult, self.seq_len, self.mode, self.seed, epoch)
            self._plans[epoch] = plan
            for old in sorted(self._plans)[:-3]:  # keep a few; epochs only move forward
                del self._plans[old]
        return plan

    def _advance(self, epoch: int, row: int, k: int) -> tuple[int, int]:
        row += k
        while row >= self._plan(epoch).rows:
            row -= self._plan(epoch).rows
            epoch += 1
        return epoch, row

    def _slot_task(self, slot: int) -> str | None:
        if not self.tasks:
            return None
        u = np.random.default_rng([self.seed, _SLOT_TAG, slot]).random()
        return next((task for task, cum in self.tasks if u < cum), None)

    # ------------------------------------------------------------------ rows
    def _data_row(self, epoch: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        toks, segs = [], []
        for doc, start, length, seg in self._plan(epoch).row(row):
            toks.append(self.data.tokens(doc, start, start + length))
            segs.append(np.full(length, seg, dtype=np.int64))
        return np.concatenate(toks), np.concatenate(segs)

    def _synthetic_row(self, task: str, slot: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _TASK_TAG, slot])
        ids = synthetic.training_example(task, self._tokenizer, self.seq_len + 1, rng)
        pad = self.seq_len + 1 - len(ids)
        toks = np.array(ids + [self._tokenizer.pad_id] * pad, dtype=np.int64)
        segs = np.array([0] * len(ids) + [-1] * pad, dtype=np.int64)
        return toks, segs

    def next_batch(self) -> dict:
        B, n = self.batch, self.batch * self.world
        tasks = [self._slot_task(self.slot + j) for j in range(n)]
        epoch, row = self._advance(self.epoch, self.row, sum(t is None for t in tasks[:self.rank * B]))
        rows = []
        for j in range(self.rank * B, self.rank * B + B):
            if tasks[j] is None:
                rows.append(self._data_row(epoch, row))
                epoch, row = self._advance(epoch, row, 1)
            else:
                rows.append(self._synthetic_row(tasks[j], self.slot + j))
        self.epoch, self.row = self._advance(self.epoch, self.row, sum(t is None for t in tasks))
        self.slot += n
        return self._collate(rows)

    def _collate(self, rows) -> dict:
        S = self.seq_len
        tok = np.stack([r[0] for r in rows])  # [B, S+1]
        seg = np.stack([r[1] for r in rows])
        same = (seg[:, :S] == seg[:, 1:]) & (seg[:, :S] >= 0)
        labels = np.where(same, tok[:, 1:], -100)
        inputs, seg = tok[:, :S], seg[:, :S]
        if self.mode == "window" or not self.doc_masking:
            pos = np.broadcast_to(np.arange(S), inputs.shape)
            return {"input_ids": torch.from_numpy(inputs.copy()), "labels": torch.from_numpy(labels),
                    "position_ids": torch.from_numpy(pos.copy()), "cu_seqlens": None}
        starts = np.ones_like(seg, dtype=bool)  # each row starts a segment: no document spans two rows
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        starts = starts.reshape(-1)
        idx = np.arange(starts.size)
        pos = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        cu = np.concatenate([np.nonzero(starts)[0], [starts.size]]).astype(np.int32)
        return {"input_ids": torch.from_numpy(inputs.reshape(1, -1).copy()),
                "labels": torch.from_numpy(labels.reshape(1, -1).copy()),
                "position_ids": torch.from_numpy(pos.reshape(1, -1)), "cu_seqlens": torch.from_numpy(cu)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "slot": self.slot, "epoch": self.epoch, "row": self.row,
                "dp_world": self.world, "micro_batch_size": self.batch, "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError("loader state is missing or from another version; resume from a checkpoint "
                            "written by this code or start the data from the beginning")
        saved = state.get("fingerprint", {})
        diff = [f"{k} {saved.get(k)!r} (saved) vs {v!r} (now)" for k, v in self.fingerprint.items()
                if saved.get(k) != v]
        if diff:
            raise DataError(f"loader state was saved for other data settings: {'; '.join(diff)}; resume with "
                            "the same data, seed and seq_len, or start this stage's data afresh")
        if state["dp_world"] != self.world or state["micro_batch_size"] != self.batch:
            log.info("data loader: re-splitting from %d x %d to %d x %d sequences per step at slot %d",
                     state["dp_world"], state["micro_batch_size"], self.world, self.batch, state["slot"])
        self.slot, self.epoch, self.row = int(state["slot"]), int(state["epoch"]), int(state["row"])
