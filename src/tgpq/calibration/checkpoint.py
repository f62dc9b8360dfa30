"""Block-by-block calibration progress on disk: safetensors (tensors) + JSON (record), no pickle.

A checkpoint is a directory holding

* ``progress.json``: ``{"fingerprint": ..., "done": [block names in order], "block_mse": ...,
  "layers": {layer name: {"in_splits": [...] | null}}, "block_seconds": ..., "gac": {block: [refresh
  records]} (gac only)}``;
* ``tensors.safetensors``: ``layer/<name>/{weight_q,weight_scale,act_scale}`` of finished layers,
  ``weights/<block>/{timesteps,weights}`` and ``logits/<block>`` (the sample logits after the block).

Both files are replaced atomically (write to a temporary name, then ``os.replace``); the tensors
file is written first, so the JSON never lists a block whose tensors are missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..recipe import LayerQState

PROGRESS = "progress.json"
TENSORS = "tensors.safetensors"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class CalibrationCheckpoint:
    """Read and write one calibration's progress (see the module docstring)."""

    def __init__(self, path, fingerprint: dict):
        self.dir = Path(path)
        self.fingerprint = fingerprint
        self.record = {"fingerprint": fingerprint, "done": [], "block_mse": {}, "layers": {}, "block_seconds": {}}
        self.tensors: dict = {}

    def load(self) -> bool:
        """Load an existing checkpoint; False when there is none. Raises if it belongs to another run."""
        pj = self.dir / PROGRESS
        if not pj.is_file():
            return False
        record = json.loads(pj.read_text())
        if record.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {self.dir} was written by a calibration with another config or calibration set "
                f"(saved {record.get('fingerprint')}, now {self.fingerprint}): delete it or use another path")
        tensors = load_file(str(self.dir / TENSORS)) if (self.dir / TENSORS).is_file() else {}
        self.record = record
        self.tensors = tensors
        return True

    @property
    def done(self) -> list:
        return list(self.record["done"])

    def layer(self, name: str) -> LayerQState:
        splits = self.record["layers"][name]["in_splits"]
        return LayerQState(weight_q=self.tensors[f"layer/{name}/weight_q"],
                           weight_scale=self.tensors[f"layer/{name}/weight_scale"],
                           act_scale=self.tensors[f"layer/{name}/act_scale"],
                           in_splits=tuple(splits) if splits is not None else None)

    def logits(self, block: str) -> torch.Tensor | None:
        return self.tensors.get(f"logits/{block}")

    def sample_weights(self, block: str) -> dict | None:
        if f"weights/{block}/weights" not in self.tensors:
            return None
        return {"timesteps": self.tensors[f"weights/{block}/timesteps"], "weights": self.tensors[f"weights/{block}/weights"]}

    def add_block(self, block: str, layers: dict, block_mse: dict, seconds: float,
                  sample_weights: dict | None, logits: torch.Tensor | None, gac_record: list | None = None) -> None:
        """Record a finished block and write both files (``gac_record``: JSON-able refresh records)."""
        for name, lq in layers.items():
            self.tensors[f"layer/{name}/weight_q"] = lq.weight_q.contiguous()
            self.tensors[f"layer/{name}/weight_scale"] = lq.weight_scale.contiguous()
            self.tensors[f"layer/{name}/act_scale"] = lq.act_scale.contiguous()
            self.record["layers"][name] = {"in_splits": list(lq.in_splits) if lq.in_splits is not None else None}
        if sample_weights is not None:
            self.tensors[f"weights/{block}/timesteps"] = sample_weights["timesteps"].contiguous()
            self.tensors[f"weights/{block}/weights"] = sample_weights["weights"].contiguous()
        if logits is not None:
            self.tensors[f"logits/{block}"] = logits.contiguous()
        self.record["done"].append(block)
        self.record["block_mse"][block] = block_mse
        self.record["block_seconds"][block] = seconds
        if gac_record is not None:
            self.record.setdefault("gac", {})[block] = gac_record
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu() for k, v in self.tensors.items()}
        _atomic_write_bytes(self.dir / TENSORS, lambda p: save_file(tensors, str(p)))
        _atomic_write_bytes(self.dir / PROGRESS, lambda p: p.write_text(json.dumps(self.record, indent=1)))
