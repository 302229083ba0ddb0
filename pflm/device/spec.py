"""Everything a device needs to train and clip one round, and nothing else: the device half of the recipe.

The server builds one `DeviceSpec` from the recipe (`DeviceSpec.from_recipe`) and hands it to every device with
the round plan; a device (in-process or on a Flower SuperNode) never sees the recipe itself. The spec is plain
data (JSON round trip in `to_json` / `from_json`), so the Flower message carries it instead of the whole recipe,
and a node caches its trainer by the spec's digest.

What the spec does NOT decide: anything a device must not take from the server on trust (its randomness, its
secure-aggregation floors). A Flower node takes those from its own policy (`pflm.flower.policy`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pflm.config import DeviceConfig, DPSGDConfig, RecipeConfig
from pflm.schema import from_dict
from pflm.model.options import ModelConfig


@dataclass(frozen=True)
class DeviceSpec:
    """The model a device trains, how it trains it, and what it reports (all public to the cohort)."""

    model: ModelConfig
    vocab_size: int  # rows of the global vocabulary (ids a device's sentences use)
    local_vocab_size: int  # rows of the device model: vocab_size, or the PEU row count k
    training: DeviceConfig = field(default_factory=DeviceConfig)  # optimiser, loss, batches, epochs
    dpsgd: DPSGDConfig = field(default_factory=DPSGDConfig)  # on-device DP-SGD (Opacus)
    max_sentences: int = 0  # sentences a device trains on (0 = all of its user's)
    max_tokens: int = 20  # tokens per sentence (longer ones are truncated)
    weighting: Literal["uniform", "tokens"] = "uniform"  # device weight: 1, or its token count
    report_unclipped: bool = False  # the device reports the adaptive-clipping bit "update was within C"
    # True only in `privacy.reproducible` runs: the in-process simulator's device keys are then seed-derived.
    # A Flower node honours it only if its own policy allows (a server must not switch devices to public keys).
    reproducible: bool = False

    @classmethod
    def from_recipe(cls, cfg: RecipeConfig, vocab_size: int) -> DeviceSpec:
        return cls(
            model=cfg.model,
            vocab_size=int(vocab_size),
            local_vocab_size=int(vocab_size) if cfg.peu.mode == "all" else int(cfg.peu.k),
            training=cfg.device,
            dpsgd=cfg.dpsgd,
            max_sentences=cfg.data.max_sentences_per_device,
            max_tokens=cfg.data.max_tokens,
            weighting=cfg.server.weighting,
            report_unclipped=cfg.privacy.adaptive_clipping.enabled,
            reproducible=cfg.privacy.reproducible,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        return from_dict(cls, json.loads(text), "device-spec")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()
