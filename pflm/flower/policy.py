"""What a SuperNode's devices trust, set by whoever runs the node and never by the server's messages.

A Flower ServerApp can send a node anything. The values a malicious server could use against the node's users are
therefore read from the node's own policy, not from the round message:
- the secure-aggregation floors (threshold fraction, neighbour-degree floor and the Bell et al. assumptions behind
  it, malicious-server variant, secret stochastic rounding): the server's session must meet them or the devices
  refuse (`SecAggClient`);
- whether seed-derived device keys (`privacy.reproducible`) are acceptable: a server that could switch them on
  would know every device's DP-SGD noise and rounding draws;
- which long-term device keys exist (malicious-server variant): with `trusted_keys` (the enrolled devices' Ed25519
  public keys, from a PKI outside the server) a round whose key registry holds any other key is refused, so the
  server cannot impersonate a device by swapping its key; without it the devices trust the ServerApp's registry
  (keys pinned on first use);
- what distributed DP it accepts (`distributed`: mechanisms, a floor on the noise the devices' own shares add to
  any sum the server can unmask, a floor on the modular range, whether it insists on distributed DP): a server that
  asks for no noise share, for shares shrunk by a false dropout tolerance or cohort, or for a wrap-around-certain
  modulus is refused (pflm.flower.ddp_node);
- where the node's data lives.

Sources, first found wins: the node config key `policy="FILE"` (`flower-supernode --node-config`), the environment
variable PFLM_NODE_POLICY=FILE, else the built-in strict policy (`NodePolicy()`): SecAgg+ floors from Bell et al.
for 5% colluders / 5% dropouts / 2^-20, semi-honest server, fresh OS-CSPRNG keys only. FILE is YAML/JSON:
`{secagg: {...aggregation.secagg keys...}, allow_reproducible: bool, data_dir: str, trusted_keys: [base64, ...],
distributed: {mechanisms: [...], min_noise_multiplier: z, min_range_stddevs: k, required: bool}}`.

In a Flower *simulation* one person runs the server and every node, so `pflm train backend=flower` writes a policy
from the recipe itself (`write_node_policy`) and points the simulated nodes at it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pflm.aggregator.secagg.options import SecAggConfig
from pflm.config import RecipeConfig
from pflm.schema import from_dict, to_dict
from pflm.errors import ConfigError, PflmError

POLICY_KEY = "policy"
POLICY_ENV = "PFLM_NODE_POLICY"
# The SecAgg options that protect the node's users: always the node's own, whatever the server's message says.
TRUSTED_SECAGG = ("threshold", "neighbours", "corrupt_fraction", "dropout_fraction", "failure_log2", "grinding_log2",
                  "malicious", "min_neighbours", "rounding")


DDP_MECHANISMS = ("distributed_skellam", "distributed_dgauss")


def _strict_secagg() -> SecAggConfig:
    return SecAggConfig(neighbours="log")


@dataclass
class DistributedPolicy:
    """What a node's devices accept when the server asks for distributed DP (checked in pflm.flower.ddp_node).

    `min_noise_multiplier`: the devices refuse unless the honest devices' shares in the smallest sum the session
    lets the server unmask give noise std ≥ this × the rounded sensitivity Δ₂ (0: only a zero share is refused,
    the setting for simulated nodes, which the operator runs anyway). The default 0.5 is met by a deployment of
    the default recipe (z = 0.84 over 95% of the cohort, threshold 0.6: 0.64). `min_range_stddevs`: the modulus
    must hold this many standard deviations of a coordinate of the sum. `required`: refuse plain fixed-point
    rounds (the server would then add the noise itself after seeing the exact sum)."""

    mechanisms: list[str] = field(default_factory=lambda: list(DDP_MECHANISMS))
    min_noise_multiplier: float = 0.5
    min_range_stddevs: float = 2.0
    required: bool = False

    def __post_init__(self) -> None:
        bad = sorted(set(self.mechanisms) - set(DDP_MECHANISMS))
        if bad:
            raise ConfigError(f"policy.distributed.mechanisms {bad} are unknown: use {list(DDP_MECHANISMS)}")
        if not (self.min_noise_multiplier >= 0 and self.min_range_stddevs >= 0):
            raise ConfigError("policy.distributed.min_noise_multiplier and min_range_stddevs must be ≥ 0")


@dataclass
class NodePolicy:
    """A node's trusted settings (see the module docstring)."""

    secagg: SecAggConfig = field(default_factory=_strict_secagg)
    allow_reproducible: bool = False  # accept privacy.reproducible (seed-derived device keys): simulations only
    data_dir: str = ""  # the node's prepared data (node config `data-dir` overrides it)
    # base64 Ed25519 public keys of every enrolled device (the PKI, from outside the server); [] = trust the
    # ServerApp's registry (pinned on first use)
    trusted_keys: list[str] = field(default_factory=list)
    distributed: DistributedPolicy = field(default_factory=DistributedPolicy)

    def trusted_key_set(self) -> frozenset[bytes] | None:
        if not self.trusted_keys:
            return None
        try:
            return frozenset(base64.b64decode(k, validate=True) for k in self.trusted_keys)
        except (ValueError, TypeError):
            raise ConfigError("policy.trusted_keys must be base64 Ed25519 public keys") from None

    def session_config(self, requested: SecAggConfig) -> SecAggConfig:
        """The server's requested SecAgg options with every trusted field replaced by this policy's."""
        return dataclasses.replace(requested, **{k: getattr(self.secagg, k) for k in TRUSTED_SECAGG})

    def check_reproducible(self, requested: bool) -> bool:
        """Whether devices use seed-derived keys: only if the server asks AND the node allows it."""
        if requested and not self.allow_reproducible:
            raise PflmError("the server asks for reproducible (seed-derived, public) device keys and this node's "
                            "policy does not allow it; set allow_reproducible: true in the node's policy file only "
                            "for simulations")
        return requested


def load_policy(path: str | Path) -> NodePolicy:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"node policy {p} cannot be read ({e.strerror}); fix the path in --node-config "
                          f"'{POLICY_KEY}=\"FILE\"' or {POLICY_ENV}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"node policy {p} must be a mapping with keys secagg, allow_reproducible, data_dir")
    return from_dict(NodePolicy, raw, "policy")


def node_policy(node_config: dict) -> NodePolicy:
    """This node's policy: node config `policy`, else $PFLM_NODE_POLICY, else the strict default."""
    path = node_config.get(POLICY_KEY) or os.environ.get(POLICY_ENV)
    return load_policy(str(path)) if path else NodePolicy()


def policy_from_recipe(cfg: RecipeConfig) -> NodePolicy:
    """The policy a simulation's nodes get: the recipe's own SecAgg options and reproducibility, its data dir, and
    for distributed DP the recipe's mechanism with no noise floor beyond a non-zero share (the operator runs every
    simulated node; with a noise cohort above the simulated cohort each simulated sum carries only a fraction of
    the deployment's noise)."""
    data = str(Path(cfg.data.dir).expanduser().resolve()) if cfg.data.dir else ""
    mech = cfg.privacy.mechanism
    ddp = DistributedPolicy(mechanisms=[mech] if mech in DDP_MECHANISMS else list(DDP_MECHANISMS),
                            min_noise_multiplier=0.0, required=mech in DDP_MECHANISMS)
    return NodePolicy(secagg=cfg.aggregation.secagg, allow_reproducible=cfg.privacy.reproducible, data_dir=data,
                      distributed=ddp)


def write_node_policy(cfg: RecipeConfig, path: str | Path) -> Path:
    """Write `policy_from_recipe(cfg)` as JSON to `path` (for simulated nodes); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(policy_from_recipe(cfg)), sort_keys=True))
    return path
