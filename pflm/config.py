"""The recipe: one typed, self-validating dataclass per pipeline stage, loaded from YAML plus `k=v` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pflm.aggregator.secagg.options import SecAggConfig
from pflm.schema import apply_overrides, from_dict, load_yaml, to_dict
from pflm.errors import ConfigError
from pflm.model.options import ModelConfig


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    dir: str = ""  # a `pflm prepare` output directory
    max_tokens: int = 20  # sentences are truncated to this many tokens (plus <s> and </s>)
    max_sentences_per_device: int = 0  # 0 = all of the user's sentences
    val_users: int = 0  # evaluate on at most this many validation users (0 = all)
    test_users: int = 0  # evaluate on at most this many test users (0 = all)
    train_users: int = 0  # use at most this many training users (0 = all); the population for accounting

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "data.max_tokens must be >= 1")
        for name in ("max_sentences_per_device", "val_users", "test_users", "train_users"):
            _check(getattr(self, name) >= 0, f"data.{name} must be >= 0 (0 means all)")


@dataclass
class DeviceConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.5
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    loss: Literal["full", "sampled_softmax", "nce"] = "full"
    num_samples: int = 256  # noise words per batch for sampled_softmax / nce
    unigram_alpha: float = 0.75  # noise distribution ∝ count^alpha
    train_embeddings: bool = True  # with LoRA: also train (the selected rows of) the embeddings/output
    vectorize: int = 1  # devices trained as one batched computation (pflm.device.vectorized); 1 = one at a time
    accelerator: Literal["cpu", "cuda"] = "cpu"  # where the device trainer computes (cuda: needs a CUDA torch + GPU)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "device.epochs must be >= 1")
        _check(self.batch_size >= 1, "device.batch_size must be >= 1")
        _check(self.lr > 0, "device.lr must be > 0")
        _check(0 <= self.momentum < 1, "device.momentum must be in [0, 1)")
        _check(self.num_samples >= 1, "device.num_samples must be >= 1")
        _check(0 <= self.unigram_alpha <= 1, "device.unigram_alpha must be in [0, 1]")
        _check(self.vectorize >= 1, "device.vectorize must be >= 1 (1 = one device at a time)")


@dataclass
class DPSGDConfig:
    """On-device DP-SGD (sample-level DP) through Opacus."""

    enabled: bool = False
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    grad_sample_mode: Literal["ghost", "hooks", "functorch", "ew"] = "hooks"
    accountant: Literal["rdp", "prv"] = "rdp"
    delta: float = 1e-5
    sample_rate: float = 0.0  # Poisson rate for each local step; 0 = batch_size / user's sentences
    # ghost/hooks: run the LSTM fused with whole-sequence Linears (pflm.model.fused_dplstm; same per-sample
    # gradients as Opacus' step-by-step DPLSTM, several times faster); false = Opacus' DPLSTM forward
    fused_lstm: bool = True
    # ghost: output layer at valid positions only, its clipped sum book-kept (pflm.device.dp_fast; same clipping,
    # noise and accounting); false, or a tied output layer = Opacus' two-pass ghost clipping on the padded head
    fast_ghost: bool = True

    def __post_init__(self) -> None:
        _check(self.max_grad_norm > 0, "dpsgd.max_grad_norm must be > 0")
        _check(self.noise_multiplier >= 0, "dpsgd.noise_multiplier must be >= 0")
        _check(0 < self.delta < 1, "dpsgd.delta must be in (0, 1)")
        _check(0 <= self.sample_rate <= 1, "dpsgd.sample_rate must be in [0, 1]")
        _check(isinstance(self.fused_lstm, bool), "dpsgd.fused_lstm must be true or false")
        _check(isinstance(self.fast_ghost, bool), "dpsgd.fast_ghost must be true or false")


@dataclass
class PEUConfig:
    """Partial Embedding Updates: which embedding rows devices receive, train and send each round."""

    mode: Literal["all", "topk", "sampled"] = "all"
    k: int = 0  # rows per round (topk/sampled); the special tokens are always included
    prior: Literal["uniform", "frequency"] = "frequency"  # row distribution for `sampled`

    def __post_init__(self) -> None:
        if self.mode != "all":
            _check(self.k >= 8, "peu.k must be >= 8 when peu.mode is topk or sampled")


@dataclass
class AdaptiveClipConfig:
    enabled: bool = False
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0  # σ_b: std of the noise on the clipped-count sum (0 = noise cohort / 20, the paper default)

    def __post_init__(self) -> None:
        _check(0 < self.target_quantile < 1, "privacy.adaptive_clipping.target_quantile must be in (0, 1)")
        _check(self.learning_rate > 0, "privacy.adaptive_clipping.learning_rate must be > 0")
        _check(self.count_noise_std >= 0, "privacy.adaptive_clipping.count_noise_std must be >= 0")


@dataclass
class DistributedDPConfig:
    """Distributed DP (`privacy.mechanism: distributed_*`): devices add discrete noise shares inside the secure sum."""

    bits: int = 18  # bits per coordinate of the deployment's modular sum (what each device sends per value)
    dropout_tolerance: float = 0.05  # devices add enough noise for the sum to stay private if this fraction drops
    k_stddevs: float = 4.0  # standard deviations of the rotated noisy sum kept inside the modular range
    beta: float = 0.6065306597126334  # conditional rounding: retry probability bound β = e^-0.5 (Kairouz et al.)
    rotation_block: int = 131072  # randomised Hadamard block size (a power of 2); the vector is padded to a multiple

    def __post_init__(self) -> None:
        _check(isinstance(self.bits, int) and 8 <= self.bits <= 62,
               "privacy.distributed.bits must be an integer in [8, 62] (16-20 is the usual range)")
        _check(0 <= self.dropout_tolerance < 1, "privacy.distributed.dropout_tolerance must be a fraction in [0, 1)")
        _check(self.k_stddevs > 0, "privacy.distributed.k_stddevs must be > 0 (e.g. 4)")
        _check(0 < self.beta < 1, "privacy.distributed.beta must be in (0, 1), e.g. 0.6065 (e^-0.5)")
        _check(self.rotation_block >= 2 and self.rotation_block & (self.rotation_block - 1) == 0,
               "privacy.distributed.rotation_block must be a power of 2, e.g. 131072")


@dataclass
class DPFTRLConfig:
    """DP-FTRL correlated noise (`privacy.mechanism: dpftrl`, docs/dpftrl.md): the strategy matrix C."""

    kind: Literal["blt", "banded_mf", "tree"] = "blt"
    buffers: int = 4  # blt: number of buffers (memory: buffers × release length floats)
    bands: int = 0  # banded_mf: bands p (0 = server.min_separation; 1 = independent noise, i.e. DP-FedAvg)

    def __post_init__(self) -> None:
        _check(1 <= self.buffers <= 16, "privacy.dpftrl.buffers must be in [1, 16]")
        _check(self.bands >= 0, "privacy.dpftrl.bands must be >= 0 (0 = server.min_separation)")


@dataclass
class PrivacyConfig:
    """User-level DP at the aggregator: clip each device update to C, Gaussian noise σ·C on the sum."""

    clip_bound: float = 1.0
    noise_multiplier: float | None = 0.0  # σ (0 = no noise); calibrated instead when target_epsilon is given
    target_epsilon: float | None = None  # calibrate σ at start-up and stop before exceeding it
    delta: float = 1e-6
    accountant: Literal["rdp", "prv"] = "rdp"
    population: int = 0  # N for q = noise_cohort / N; 0 = number of training users
    noise_cohort: int = 0  # M: noise calibrated as if M users were sampled; 0 = the cohort size
    # False (default): the noise, cohort and device keys come from a fresh OS-CSPRNG run key kept in the run
    # directory (owner-only). True: they are derived from the public `seed` — bit-reproducible research runs
    # whose guarantee does NOT hold against anyone who knows the seed (summary.json and the CLI say so).
    reproducible: bool = False
    adaptive_clipping: AdaptiveClipConfig = field(default_factory=AdaptiveClipConfig)
    # How the noise is added. "gaussian": central Gaussian on the sum by the server (after secure aggregation).
    # Other mechanisms extend this Literal (one value per mechanism; see docs/privacy.md).
    mechanism: Literal["gaussian", "dpftrl", "distributed_skellam", "distributed_dgauss"] = "gaussian"
    # K > 1: this run is one of K runs on the same users released together (an ensemble, `pflm rescore
    # --ensemble`): σ is calibrated so that K such runs compose to target_epsilon; the summary prints both.
    ensemble_members: int = 1
    dpftrl: DPFTRLConfig = field(default_factory=DPFTRLConfig)  # used when mechanism is dpftrl
    distributed: DistributedDPConfig = field(default_factory=DistributedDPConfig)  # distributed_* mechanisms only

    def __post_init__(self) -> None:
        _check(self.clip_bound > 0, "privacy.clip_bound must be > 0 (the L2 bound C on each device's update)")
        _check(
            self.noise_multiplier is None or self.noise_multiplier >= 0,
            "privacy.noise_multiplier must be >= 0 (0 disables noise)",
        )
        _check(0 < self.delta < 1, "privacy.delta must be in (0, 1), e.g. 1e-6 or 1/population")
        if self.target_epsilon is not None:
            _check(self.target_epsilon > 0, "privacy.target_epsilon must be > 0")
            _check(
                math.isfinite(self.target_epsilon),
                "privacy.target_epsilon must be finite; for a non-private run set privacy.target_epsilon=null "
                "privacy.noise_multiplier=0 (`pflm sweep` grids accept inf for that)",
            )
            _check(
                not self.noise_multiplier,
                "give privacy.target_epsilon or a non-zero privacy.noise_multiplier, not both (σ is calibrated from ε)",
            )
        _check(
            self.noise_multiplier is not None or self.target_epsilon is not None,
            "set privacy.noise_multiplier or privacy.target_epsilon",
        )
        _check(self.population >= 0, "privacy.population must be >= 0 (0 = number of training users)")
        _check(self.ensemble_members >= 1, "privacy.ensemble_members must be >= 1 (runs released together)")
        _check(self.ensemble_members == 1 or (self.mechanism == "gaussian" and not self.adaptive_clipping.enabled),
               "privacy.ensemble_members > 1 needs privacy.mechanism=gaussian without adaptive clipping; "
               "set privacy.ensemble_members=1")
        _check(self.noise_cohort >= 0, "privacy.noise_cohort must be >= 0 (0 = cohort size)")


@dataclass
class AggregationConfig:
    kind: Literal["plain", "secure"] = "plain"
    secagg: SecAggConfig = field(default_factory=SecAggConfig)  # typed and validated with the rest of the recipe


@dataclass
class ServerConfig:
    rounds: int = 10
    cohort_size: int = 10
    sampling: Literal["fixed", "poisson", "available"] = "poisson"  # DP runs need poisson (what the accountants analyse)
    # sampling=available (DP-FTRL): each round every device is available with probability `availability`; the
    # cohort is drawn from the available devices that joined fewer than `max_participations` rounds and not in
    # the last `min_separation` − 1 rounds (pflm/server/participation.py). No secrecy of the cohort is assumed.
    availability: float = 1.0
    min_separation: int = 1  # b: rounds between two participations of one device (1 = no limit)
    max_participations: int = 0  # k: rounds one device may join (0 = as many as min_separation allows)
    weighting: Literal["uniform", "tokens"] = "uniform"
    optimizer: Literal["fedavg", "fedadam"] = "fedavg"
    lr: float = 1.0
    # Public, step-indexed server lr: cosine decays lr → lr_final over server.rounds steps (Loshchilov & Hutter
    # 2017); it costs no ε (a function of the step count alone).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final: float = 0.0
    # fedavg only: heavy-ball server momentum (FedAvgM): m ← momentum·m + Δ̄, w ← w + lr·m (0 = plain FedAvg).
    # Linear in the noised updates, so DP-FTRL's correlated noise still cancels in the model (docs/dpftrl.md).
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-3
    init_output_bias: Literal["prior", "zero"] = "prior"  # start the output bias at log of the public prior
    zero_output_weight: bool = False  # start the output weights at 0: rows no device trains keep exactly the prior
    init_from: str = ""  # start from public pretrained weights (`pflm pretrain` OUT/model.safetensors; pflm/model/pretrained.py)
    lora_merge_every: int = 0  # with LoRA: fold adapters into the base weights every N rounds (0 = never)
    # Release the exponential moving average of the server iterates (decay per round; 0 = the last iterate).
    # Post-processing of the DP releases: same ε; devices still train from the raw iterate (pflm/server/ema.py).
    ema_decay: float = 0.0
    eval_every: int = 5  # validation perplexity every N rounds (and at the end)
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "server.rounds must be >= 1")
        _check(self.cohort_size >= 1, "server.cohort_size must be >= 1")
        _check(self.lr > 0, "server.lr must be > 0")
        _check(0 <= self.lr_final <= self.lr, "server.lr_final must be in [0, server.lr]")
        _check(self.lr_final == 0 or self.lr_schedule == "cosine",
               "server.lr_final applies to server.lr_schedule=cosine; set server.lr_schedule=cosine or remove it")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "server.beta1/beta2 must be in [0, 1)")
        _check(0 <= self.momentum < 1, "server.momentum must be in [0, 1) (0 = plain FedAvg)")
        _check(self.momentum == 0 or self.optimizer == "fedavg",
               "server.momentum applies to server.optimizer=fedavg (fedadam has beta1); set server.momentum=0")
        _check(self.adam_eps > 0, "server.adam_eps must be > 0")
        _check(self.eval_every >= 1, "server.eval_every must be >= 1")
        _check(self.lora_merge_every >= 0, "server.lora_merge_every must be >= 0 (0 = never)")
        _check(self.checkpoint_every >= 1, "server.checkpoint_every must be >= 1")
        _check(0 <= self.ema_decay < 1, "server.ema_decay must be in [0, 1) (0 = release the last iterate; "
               "0.99 averages over ~100 rounds)")
        _check(self.ema_decay == 0 or self.lora_merge_every == 0,
               "server.ema_decay cannot average across LoRA folds (server.lora_merge_every); set one of them to 0")
        _check(0 < self.availability <= 1, "server.availability must be a probability in (0, 1]")
        _check(self.min_separation >= 1, "server.min_separation must be >= 1 (1 = no separation limit)")
        _check(self.max_participations >= 0, "server.max_participations must be >= 0 (0 = no limit beyond min_separation)")
        _check(self.sampling == "available" or (self.min_separation, self.max_participations, self.availability)
               == (1, 0, 1.0), "server.min_separation/max_participations/availability apply only to "
               "server.sampling=available (they would be ignored); set server.sampling=available or remove them")


@dataclass
class FlowerConfig:
    num_supernodes: int = 2
    cpus_per_client: float = 1.0


@dataclass
class FaultsConfig:
    """Simulated device faults of the in-process backend: each faulty device is dropped and counted, the round goes on.

    Probabilities per (round, device), drawn from the run key. A dropped device never lowers the noise (its std
    follows the expected cohort), so accounting is unchanged; the server rejects corrupt uploads it can inspect."""

    device_crash: float = 0.0  # the device raises during local training (nothing is uploaded)
    straggler: float = 0.0  # the device misses the round deadline: its upload never counts (its training is skipped)
    corrupt_update: float = 0.0  # the device uploads a corrupt vector: NaN, wrong length or an oversized norm, in turn

    def __post_init__(self) -> None:
        for name in ("device_crash", "straggler", "corrupt_update"):
            _check(0 <= getattr(self, name) < 1, f"faults.{name} must be a probability in [0, 1)")
        _check(self.device_crash + self.straggler + self.corrupt_update < 1,
               "faults.device_crash + faults.straggler + faults.corrupt_update must stay below 1")


@dataclass
class LoggingConfig:
    """Extra sinks for the released per-round metrics (the same values as metrics.jsonl's RELEASED keys)."""

    tensorboard: bool = False  # also write them as TensorBoard scalars under RUN_DIR/tensorboard


@dataclass
class RecipeConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    backend: Literal["inprocess", "flower"] = "inprocess"
    threads: int = 0  # CPU threads the run may use (0 = every CPU this process may run on)
    device_workers: int = 1  # simulated devices trained at once, each with threads/device_workers torch threads (0 = one per thread)
    diagnostics: bool = False  # also write NOT-PRIVATE exact per-round values (train loss, clip counts) to diagnostics.jsonl
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    dpsgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    peu: PEUConfig = field(default_factory=PEUConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name must be a non-empty run name without '/'")
        _check(self.threads >= 0, "threads must be >= 0 (0 = every CPU)")
        _check(self.device_workers >= 0, "device_workers must be >= 0 (0 = one simulated device per thread)")
        _check(self.device.vectorize == 1 or self.backend == "inprocess",
               "device.vectorize > 1 batches simulated devices in-process; set device.vectorize=1 with backend=flower")
        if self.privacy.mechanism == "dpftrl":
            _check(self.server.sampling == "available",
                   "privacy.mechanism=dpftrl assumes no secret sampling: set server.sampling=available (cohorts from "
                   "available devices under server.min_separation / server.max_participations)")
            _check(self.peu.mode != "sampled",
                   "privacy.mechanism=dpftrl needs the same released rows every round (correlated noise cancels per "
                   "coordinate across rounds): use peu.mode=all or peu.mode=topk")
            _check(self.server.lr_schedule == "constant",
                   "privacy.mechanism=dpftrl's strategy is optimised for a constant server lr (docs/dpftrl.md): "
                   "set server.lr_schedule=constant")
        if self.private:
            _check(
                self.server.sampling == "poisson" or self.privacy.mechanism != "gaussian",
                f"server.sampling={self.server.sampling} is not allowed with Gaussian DP noise: the accountant "
                "analyses Poisson sampling; use server.sampling=poisson (or privacy.mechanism=dpftrl)",
            )
            _check(
                self.server.weighting == "uniform",
                "server.weighting=tokens is not allowed with DP noise (sensitivity would depend on token counts); "
                "use server.weighting=uniform",
            )

        mech = self.privacy.mechanism
        if mech.startswith("distributed_"):  # distributed DP (docs/distributed_dp.md)
            _check(self.aggregation.kind == "secure",
                   f"privacy.mechanism={mech} needs aggregation=secure: with the plain sum the server would see each "
                   "device's update with only its own small noise share")
            _check(self.aggregation.secagg.rounding == "urandom",
                   f"privacy.mechanism={mech} needs secret device randomness: set aggregation.secagg.rounding=urandom")
            _check(not self.privacy.adaptive_clipping.enabled,
                   f"privacy.mechanism={mech} does not support adaptive clipping: set privacy.adaptive_clipping.enabled=false")
            _check(self.privacy.accountant == "rdp", f"privacy.mechanism={mech} is accounted with RDP: set privacy.accountant=rdp")
            _check(self.server.sampling == "poisson", f"privacy.mechanism={mech} is accounted with Poisson sampling: "
                   "set server.sampling=poisson")
            _check(self.backend == "inprocess" or self.aggregation.secagg.mode == "full",
                   f"privacy.mechanism={mech} on Flower needs aggregation.secagg.mode=full (the device half, with its "
                   "noise share, runs on the nodes; mode=simulate would send the server plain updates)")
        if self.aggregation.kind == "secure" and self.server.weighting == "tokens":
            _check(
                self.aggregation.secagg.max_weight > 1,
                "aggregation=secure with server.weighting=tokens needs aggregation.secagg.max_weight "
                "(the largest token count a device may report) so weights are not clamped",
            )

    @property
    def private(self) -> bool:
        """True when the recipe adds DP noise (a non-zero σ or a target ε)."""
        return self.privacy.noise_multiplier not in (None, 0.0) or self.privacy.target_epsilon is not None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# Short aliases accepted on the command line (the contract: `rounds=3`, `data.dir=DIR`, `output_dir=DIR`).
ALIASES = {
    "rounds": "server.rounds",
    "cohort": "server.cohort_size",
    "cohort_size": "server.cohort_size",
    "noise_multiplier": "privacy.noise_multiplier",
    "clip_bound": "privacy.clip_bound",
    "target_epsilon": "privacy.target_epsilon",
    "aggregation": "aggregation.kind",
}


def load_recipe(path: str | None, overrides: list[str] | None = None) -> RecipeConfig:
    data = load_yaml(path) if path else {}
    if "aggregation" in data and isinstance(data["aggregation"], str):
        data["aggregation"] = {"kind": data["aggregation"]}
    data = apply_overrides(data, list(overrides or []), ALIASES)
    return from_dict(RecipeConfig, data)


def recipe_to_dict(cfg: RecipeConfig) -> dict:
    return to_dict(cfg)
