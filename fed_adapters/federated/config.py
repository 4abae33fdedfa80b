"""The schema of a federated run: one TOML file, validated, resolved and written beside the results.

Every value is a scalar in a named table, because Flower's run config (`flwr run --run-config X.toml`,
`[tool.flwr.app.config]`) carries only flat `table.key` scalars; the same files drive
`fed-adapters simulate`. Empty strings and zeros mean "not set" where a field is optional.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterConfig, AdapterConfigError
from ..configuration import ConfigError, from_mapping, load_toml, to_toml
from ..data import TextColumns
from ..modeling import DEFAULT_MODEL, POOLINGS, TASKS
from ..training import Optimization

# "nodes": a deployment; every SuperNode brings its own data file (node config data-path).
PARTITIONERS = ("iid", "dirichlet", "inner_dirichlet", "pathological", "natural", "nodes")
PERSONALIZATION_MODES = ("none", "finetune", "split", "ditto", "fusion")
PRIVATE_PARTS = ("head", "top_layers", "stacked")
DP_MODES = ("none", "central")
LR_SCHEDULES = ("per_round", "across_rounds")
CALIBRATION_METHODS = ("none", "lda")
# uniform: Flower's draw, independent every round; shuffled: every client once per pass over the clients.
SAMPLINGS = ("uniform", "shuffled")
SERVER_LR_SCHEDULES = ("constant", "linear")
# Where each strategy keeps its server step (strategy.server_lr); only these can follow a server lr schedule.
SERVER_STEP_ATTRIBUTES = {"fedavgm": "server_learning_rate", "fedadam": "eta", "fedyogi": "eta", "fedadagrad": "eta",
                          "scaffold": "server_lr"}
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
              "scaffold")


@dataclass
class ModelSection:
    name: str = DEFAULT_MODEL  # Hub id or local directory
    task: str = "classification"
    num_labels: int = 2
    pooling: str = "mean"
    max_length: int = 128

    def __post_init__(self) -> None:
        _choice("model.task", self.task, TASKS)
        _choice("model.pooling", self.pooling, POOLINGS)
        _at_least("model.num_labels", self.num_labels, 2)
        _at_least("model.max_length", self.max_length, 8)


DEFAULT_BOTTLENECK = 16


@dataclass
class AdapterSection:
    """AdapterConfig fields; "" / 0 leave a field to the preset or the library default."""

    preset: str = "houlsby"
    bottleneck_size: int = 0  # 0 = 16, unless reduction_factor sets the size (give one of the two)
    reduction_factor: int = 0
    non_linearity: str = ""
    location: str = ""
    placement: str = ""
    scaling: float = 0.0
    init: str = ""
    dropout: float = 0.0
    layers: str = ""  # comma-separated layer indices, "" = all
    leave_out: int = 0
    train_head: bool = True
    target_modules: str = ""  # comma-separated names or regexes, "" = the architecture's mapping

    def __post_init__(self) -> None:
        try:
            self.to_adapter_config()
        except AdapterConfigError as error:
            raise ConfigError(f"adapter: {error}") from None

    def to_adapter_config(self) -> AdapterConfig:
        fields: dict[str, Any] = {"dropout": self.dropout, "leave_out": self.leave_out, "train_head": self.train_head}
        for key in ("non_linearity", "location", "placement", "init"):
            if getattr(self, key):
                fields[key] = getattr(self, key)
        if self.bottleneck_size or not self.reduction_factor:
            fields["bottleneck_size"] = self.bottleneck_size or DEFAULT_BOTTLENECK
        if self.reduction_factor:
            fields["reduction_factor"] = self.reduction_factor
        if self.scaling:
            fields["scaling"] = self.scaling
        if self.layers.strip():
            try:
                fields["layers"] = [int(i) for i in self.layers.split(",")]
            except ValueError:
                raise AdapterConfigError(f"layers must be comma-separated integers like '0,1,2', got {self.layers!r}") from None
        if self.target_modules.strip():
            fields["target_modules"] = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if self.preset:
            return AdapterConfig.preset(self.preset, **fields)
        return AdapterConfig(**fields)


@dataclass
class DataSection:
    source: str = "sst2"  # Hub id, file, or folder (also under data_root / FED_ADAPTERS_DATA_ROOT)
    data_root: str = ""
    subset: str = ""  # Hub configuration name, e.g. "sst2" of "nyu-mll/glue"
    train_split: str = "train"
    test_split: str = "validation"  # the held-out split the server evaluates on
    text: str = "text"
    text_pair: str = ""
    label: str = "label"
    train_size: int = 0  # 0 = every training example
    test_size: int = 0  # 0 = the whole held-out split

    def __post_init__(self) -> None:
        _at_least("data.train_size", self.train_size, 0)  # 0 = all
        _at_least("data.test_size", self.test_size, 0)
        if self.test_split == self.train_split:
            raise ConfigError(f"data.test_split = data.train_split = {self.train_split!r}: the server would evaluate on "
                              "the very examples the clients train on; name a held-out split (e.g. 'validation' or 'test')")

    @property
    def columns(self) -> TextColumns:
        return TextColumns(self.text, self.text_pair or None, self.label)


@dataclass
class PartitionSection:
    method: str = "iid"
    num_clients: int = 10  # "natural": ignored (one client per value of `column`); "nodes": SuperNodes to wait for
    alpha: float = 0.5  # Dirichlet concentration (dirichlet: over clients per label; inner_dirichlet: over labels per client)
    labels_per_client: int = 2  # pathological
    column: str = "client_id"  # natural
    min_client_size: int = 2  # dirichlet redraws (up to 2,000 times) until every client holds at least this many
    local_test_fraction: float = 0.2  # 0: clients keep every example for training (no client-side evaluation)

    def __post_init__(self) -> None:
        _choice("partition.method", self.method, PARTITIONERS)
        _at_least("partition.num_clients", self.num_clients, 1)
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ConfigError(f"partition.local_test_fraction must lie in [0, 1), got {self.local_test_fraction}")
        if self.alpha <= 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        _at_least("partition.labels_per_client", self.labels_per_client, 1)
        _at_least("partition.min_client_size", self.min_client_size, 0)


@dataclass
class StrategySection:
    name: str = "fedavg"
    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 2
    # Which clients train in a round when fraction_train < 1. "uniform": a fresh seeded draw every round, so over
    # a run some clients train far more often than others; "shuffled": passes over all clients in a new seeded
    # order each pass, every client training once per pass - the federated counterpart of a centralized epoch.
    sampling: str = "uniform"
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    proximal_mu: float = 0.0  # FedProx
    # Server-side step of FedAvgM / FedAdam / FedYogi / FedAdagrad; 0 = Flower's default for the strategy
    # (FedAvgM 1.0, FedAdam and FedAdagrad 0.1, FedYogi 0.01).
    server_lr: float = 0.0
    # constant: the same server step every round; linear: round r of R steps server_lr x (R - r + 1) / R, large
    # moves while the model is far off, small ones where late rounds' client mixes would swing it.
    server_lr_schedule: str = "constant"
    server_momentum: float = 0.9  # FedAvgM
    tau: float = 1e-3  # FedAdam / FedYogi / FedAdagrad: adaptivity
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    krum_malicious: int = 0  # Krum / MultiKrum: assumed malicious clients
    krum_select: int = 0  # MultiKrum: updates averaged; 0 = the clients sampled per round minus krum_malicious
    round_timeout: float = 3600.0
    # How long the server waits for enough connected nodes (every client before the first round, then
    # min_train_clients; a node that died is not waited for) before it stops the run with an error.
    node_wait_timeout: float = 600.0
    max_update_norm: float = 0.0  # reject client updates longer than this (L2, all shared tensors); 0 = no bound

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, STRATEGIES)
        _choice("strategy.sampling", self.sampling, SAMPLINGS)
        _choice("strategy.server_lr_schedule", self.server_lr_schedule, SERVER_LR_SCHEDULES)
        if self.server_lr_schedule != "constant" and self.name not in SERVER_STEP_ATTRIBUTES:
            raise ConfigError(f"strategy.server_lr_schedule = {self.server_lr_schedule!r} needs a server step, which "
                              f"strategy {self.name!r} has not: use one of {sorted(SERVER_STEP_ATTRIBUTES)} or 'constant'")
        _at_least("strategy.num_rounds", self.num_rounds, 1)
        _at_least("strategy.min_train_clients", self.min_train_clients, 1)
        _at_least("strategy.min_evaluate_clients", self.min_evaluate_clients, 1)
        _at_least("strategy.krum_malicious", self.krum_malicious, 0)
        _at_least("strategy.krum_select", self.krum_select, 0)
        if self.max_update_norm < 0:
            raise ConfigError(f"strategy.max_update_norm must be >= 0 (0 = no bound), got {self.max_update_norm}")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"strategy.{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.fraction_train == 0:
            raise ConfigError("strategy.fraction_train = 0 trains no client; give the fraction of clients each round trains")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"strategy.trim_beta (the fraction FedTrimmedAvg cuts at each end) must lie in [0, 0.5), "
                              f"got {self.trim_beta}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"strategy.server_momentum must lie in [0, 1), got {self.server_momentum}")
        for key, value in (("proximal_mu", self.proximal_mu), ("server_lr", self.server_lr)):
            if value < 0:
                raise ConfigError(f"strategy.{key} must be >= 0, got {value}")
        for key, value in (("tau", self.tau), ("round_timeout", self.round_timeout),
                           ("node_wait_timeout", self.node_wait_timeout)):
            if value <= 0:
                raise ConfigError(f"strategy.{key} must be > 0, got {value}")


@dataclass
class TrainSection(Optimization):
    local_epochs: float = 1.0
    local_steps: int = 0  # > 0 overrides local_epochs
    # per_round: every round's local training warms up and decays on its own; across_rounds: the rounds are
    # slices of one warmup/decay curve over all num_rounds (the client lr decays from round to round).
    lr_schedule: str = "per_round"
    # Classification: tau x log(the client's own label frequencies) added to the logits in local training
    # (logit adjustment / FedLC, for label-skewed clients; pair with optimizer = "sgd"); 0 = off, 1 = the usual strength.
    logit_adjustment: float = 0.0
    # AdamW's moments survive between a client's rounds (in its private state) instead of starting afresh each
    # round, when a fresh AdamW's first steps move every coordinate by about lr, whatever its gradient.
    keep_optimizer_state: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _at_least("train.local_steps", self.local_steps, 0)  # 0 = local_epochs decides
        if self.local_steps == 0 and self.local_epochs <= 0:
            raise ConfigError(f"train.local_epochs must be > 0 (or train.local_steps >= 1), got {self.local_epochs}")
        if self.keep_optimizer_state and self.optimizer != "adamw":
            raise ConfigError(f"train.keep_optimizer_state keeps AdamW's moments, but train.optimizer = {self.optimizer!r} "
                              "keeps no state: set it to false or use optimizer 'adamw'")
        if self.logit_adjustment < 0:
            raise ConfigError(f"train.logit_adjustment must be >= 0 (0 = off), got {self.logit_adjustment}")


@dataclass
class PersonalizationSection:
    """What each client keeps for itself; see `personalization.py` for how every mode trains."""

    mode: str = "none"
    finetune_steps: int = 20  # finetune: local steps on a copy of the global adapter before the personal evaluation
    private: str = "head"  # split: the head, the top `private_layers` layers' adapters (+ head), or a stacked adapter (+ head)
    private_layers: int = 1
    private_bottleneck: int = 0  # stacked / fusion: the private adapter's bottleneck, 0 = the shared one's
    ditto_lambda: float = 0.1  # ditto: proximal pull of the private adapter toward the global one
    fusion_dim: int = 64  # fusion: width of the attention's query and key
    state_dir: str = ""  # where clients keep private tensors; "" = <run dir>/clients

    def __post_init__(self) -> None:
        _choice("personalization.mode", self.mode, PERSONALIZATION_MODES)
        _choice("personalization.private", self.private, PRIVATE_PARTS)
        _at_least("personalization.finetune_steps", self.finetune_steps, 1)
        _at_least("personalization.private_layers", self.private_layers, 1)
        _at_least("personalization.private_bottleneck", self.private_bottleneck, 0)
        _at_least("personalization.fusion_dim", self.fusion_dim, 1)
        if self.ditto_lambda < 0:
            raise ConfigError(f"personalization.ditto_lambda must be >= 0, got {self.ditto_lambda}")
        if self.mode == "ditto" and self.private_bottleneck:
            raise ConfigError("personalization.mode = 'ditto' pulls the private adapter toward the global one weight by "
                              "weight, so both need one shape: leave personalization.private_bottleneck at 0")

    @property
    def keeps_private_part(self) -> bool:
        """Whether each client's personal model holds tensors of its own (split, ditto, fusion), kept in its store."""
        return self.mode not in ("none", "finetune")


@dataclass
class PrivacySection:
    """Differential privacy of the aggregate (see `privacy.py`)."""

    # "central": each client clips its adapter update to `clipping_norm` (L2, client side), the server averages
    # the clipped updates uniformly and adds Gaussian noise of std noise_multiplier x clipping_norm / clients.
    dp: str = "none"
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_delta: float = 1e-5  # the delta at which the accountant reports epsilon
    # SecAgg+ (see `secure_aggregation.py`): the server sees only masked updates and their sum.
    secure_aggregation: bool = False
    secagg_shares: int = 0  # key shares per client, > 2; 0 = every other sampled client
    secagg_threshold: int = 2  # shares needed to reconstruct a dropped client's mask
    secagg_max_weight: float = 1000.0  # >= the largest client's num_examples (weights are scaled by it)
    secagg_clipping_range: float = 8.0  # >= the largest |adapter value| x weight / max_weight
    secagg_quantization_range: int = 4194304  # 2^22 levels; x clients must stay below 2^32

    def __post_init__(self) -> None:
        _choice("privacy.dp", self.dp, DP_MODES)
        if self.secagg_shares and self.secagg_shares <= 2:
            raise ConfigError(f"privacy.secagg_shares must be 0 (all clients) or > 2, got {self.secagg_shares}")
        _at_least("privacy.secagg_threshold", self.secagg_threshold, 2)
        if self.secagg_shares and self.secagg_threshold >= self.secagg_shares:
            raise ConfigError(f"privacy.secagg_threshold = {self.secagg_threshold} must be below privacy.secagg_shares = "
                              f"{self.secagg_shares}")
        for key in ("secagg_max_weight", "secagg_clipping_range"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"privacy.{key} must be > 0, got {getattr(self, key)}")
        if self.clipping_norm <= 0:
            raise ConfigError(f"privacy.clipping_norm must be > 0, got {self.clipping_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.target_delta < 1:
            raise ConfigError(f"privacy.target_delta must lie in (0, 1), got {self.target_delta}")


@dataclass
class HeadCalibrationSection:
    """After the last round, the server refits the task head from the clients' class feature statistics
    (`head_calibration.py`): a remedy for a head biased by label skew. `initial` also fits it before round 1,
    on the frozen base's features: a linear probe that training then starts from (LP-FT; FedNCM's head init)."""

    method: str = "none"  # "lda": the shared-covariance Gaussian classifier on the pooled features
    fraction: float = 1.0  # of the clients asked for their statistics (a seeded draw)
    shrinkage: float = 0.1  # of the feature covariance toward a multiple of the identity, in [0, 1]
    initial: bool = False  # also fit the head before round 1 (round 0's evaluation is then the linear probe's)

    def __post_init__(self) -> None:
        _choice("head_calibration.method", self.method, CALIBRATION_METHODS)
        if self.initial and self.method == "none":
            raise ConfigError("head_calibration.initial = true fits the head with head_calibration.method, which is "
                              "'none'; set head_calibration.method = 'lda'")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"head_calibration.fraction must lie in (0, 1], got {self.fraction}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError(f"head_calibration.shrinkage must lie in [0, 1], got {self.shrinkage}")


@dataclass
class SimulationSection:
    num_cpus: float = 1.0  # per virtual client (Ray actor)
    num_gpus: float = 0.0  # per virtual client; 0.25 puts four clients on one GPU
    ray_num_cpus: int = 0  # CPUs Ray may use in all, 0 = every core
    ray_num_gpus: int = -1  # GPUs Ray may use in all, -1 = every visible GPU

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ConfigError(f"simulation.num_cpus must be > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError(f"simulation.num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ConfigError(f"simulation.num_gpus = {self.num_gpus} per client: Ray shares a GPU only in fractions "
                              "of one, so above 1 it must be a whole number (e.g. 0.5 or 2)")
        _at_least("simulation.ray_num_cpus", self.ray_num_cpus, 0)
        _at_least("simulation.ray_num_gpus", self.ray_num_gpus, -1)


@dataclass
class RunConfig:
    run_name: str = "run"
    results_dir: str = "results"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    train: TrainSection = field(default_factory=TrainSection)
    personalization: PersonalizationSection = field(default_factory=PersonalizationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    head_calibration: HeadCalibrationSection = field(default_factory=HeadCalibrationSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        p = self.personalization
        _at_least("seed", self.seed, 0)  # numpy's generators take no negative seed
        parts = self.run_name.replace("\\", "/").split("/")
        if not self.run_name.strip() or self.run_name.startswith(("/", "\\")) or {".", ".."} & set(parts):
            # --overwrite clears the run directory's result files: it must lie inside results_dir
            raise ConfigError(f"run_name = {self.run_name!r} must name a folder inside results_dir: not empty, not "
                              "absolute, no '.' or '..' in it (results_dir says where results go)")
        if self.privacy.secure_aggregation and (self.privacy.dp != "none" or self.strategy.name != "fedavg"):
            raise ConfigError(
                "privacy.secure_aggregation = true computes FedAvg's sum through SecAgg+; it combines with neither "
                f"strategy.name = {self.strategy.name!r} (use 'fedavg') nor privacy.dp = {self.privacy.dp!r} (use 'none')"
            )
        if self.privacy.secure_aggregation and self.strategy.sampling != "uniform":
            raise ConfigError(
                "privacy.secure_aggregation = true runs Flower's SecAgg+ workflow, which draws each round's clients "
                f"itself; strategy.sampling = {self.strategy.sampling!r} cannot apply there: use 'uniform'"
            )
        if self.privacy.secure_aggregation and self.strategy.min_train_clients < 3:
            raise ConfigError(
                f"privacy.secure_aggregation needs strategy.min_train_clients >= 3, got {self.strategy.min_train_clients}: "
                "with 2 clients each learns the other's update from the sum"
            )
        if self.privacy.dp != "none" and self.strategy.name not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"privacy.dp = {self.privacy.dp!r} adds noise to a uniform mean of clipped updates, which "
                f"strategy.name = {self.strategy.name!r} does not compute; use 'fedavg' or 'fedprox'"
            )
        if self.strategy.name == "scaffold" and self.train.optimizer != "sgd":
            raise ConfigError(
                f"strategy.name = 'scaffold' corrects each local gradient step, which train.optimizer = "
                f"{self.train.optimizer!r} rescales; set train.optimizer = 'sgd'"
            )
        if self.strategy.name == "scaffold" and p.keeps_private_part:
            raise ConfigError(
                f"strategy.name = 'scaffold' keeps a control variate per client beside the global adapter; "
                f"personalization.mode = {p.mode!r} keeps private tensors too and is not supported with it: "
                "use 'none' or 'finetune', or another strategy"
            )
        if p.mode == "split" and p.private != "stacked" and not self.adapter.train_head:
            raise ConfigError(
                f"personalization.private = {p.private!r} keeps the head private, but adapter.train_head = false "
                "never trains it; set adapter.train_head = true or personalization.private = 'stacked'"
            )
        if self.train.logit_adjustment and self.model.task != "classification":
            raise ConfigError(
                f"train.logit_adjustment shifts class logits by the client's label frequencies; model.task = "
                f"{self.model.task!r} has no classes: set train.logit_adjustment = 0"
            )
        if self.train.logit_adjustment and p.keeps_private_part:
            raise ConfigError(
                f"train.logit_adjustment keeps the client's label prior out of what it trains, but personalization.mode = "
                f"{p.mode!r} trains private parts in the same pass, which should learn it: use one or the other"
            )
        if self.train.keep_optimizer_state and p.keeps_private_part:
            raise ConfigError(
                f"train.keep_optimizer_state keeps the moments of the shared adapter's training, but personalization.mode = "
                f"{p.mode!r} trains private parts in the same pass: use one or the other"
            )
        self._check_head_calibration()
        if self.partition.local_test_fraction == 0 and p.mode != "none":
            raise ConfigError(
                f"personalization.mode = {p.mode!r} is judged on each client's local test split, but "
                "partition.local_test_fraction = 0 leaves none; set it above 0"
            )
        if self.partition.local_test_fraction == 0 and self.strategy.fraction_evaluate > 0:
            raise ConfigError(
                "partition.local_test_fraction = 0 leaves clients no local test split, but strategy.fraction_evaluate = "
                f"{self.strategy.fraction_evaluate} asks them to evaluate; set one of them differently"
            )

    def _check_head_calibration(self) -> None:
        if self.head_calibration.method == "none":
            return
        method = f"head_calibration.method = {self.head_calibration.method!r}"
        if self.model.task != "classification" or self.model.pooling == "model":
            raise ConfigError(
                f"{method} refits the pooled-feature classifier of model.task = 'classification' with model.pooling "
                f"'mean' or 'first'; this run has task {self.model.task!r}, pooling {self.model.pooling!r}: "
                "set head_calibration.method = 'none'"
            )
        if not self.adapter.train_head or self.personalization.keeps_private_part:
            raise ConfigError(
                f"{method} refits the shared task head, but adapter.train_head = {self.adapter.train_head} / "
                f"personalization.mode = {self.personalization.mode!r} keep the head off the wire: use "
                "adapter.train_head = true with personalization.mode 'none' or 'finetune'"
            )
        if self.privacy.dp != "none" or self.privacy.secure_aggregation:
            raise ConfigError(
                f"{method} has clients send class feature statistics in the clear, outside the protection of "
                "privacy.dp / privacy.secure_aggregation: turn those off or set head_calibration.method = 'none'"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.run_name

    @property
    def keeps_client_state(self) -> bool:
        """Whether clients keep tensors of their own between rounds (private parts, SCAFFOLD's control variates,
        optimizer moments)."""
        return self.personalization.mode != "none" or self.strategy.name == "scaffold" or self.train.keep_optimizer_state

    @property
    def private_state_dir(self) -> Path:
        return Path(self.personalization.state_dir) if self.personalization.state_dir else self.run_dir / "clients"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """`table.key` -> value, the shape of Flower's run config."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{name}": item for name, item in value.items()})
            else:
                flat[key] = value
        return flat


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return load_toml(path, RunConfig, overrides)


def load_run_dir_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run directory was started with, pointing at that directory wherever it now lies
    (its checkpoints, private states and results are read there, never at the path it was first written to)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml); give the directory a run wrote")
    config = load_run_config(run_dir / "config.toml")
    return dataclasses.replace(config, results_dir=str(run_dir.parent), run_name=run_dir.name)


def run_config_from_flat(flat: dict[str, Any]) -> RunConfig:
    """Rebuilds a RunConfig from Flower's flat `table.key` run config."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        table, _, name = key.partition(".")
        if name:
            nested.setdefault(table, {})[name] = value
        else:
            nested[table] = value
    return from_mapping(RunConfig, nested)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
