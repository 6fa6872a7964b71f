"""One resolved training configuration, saved beside every run (``config.json``).

A config comes from defaults, then a YAML/TOML/JSON file (``--config``), then explicit CLI flags; the
resolved result reproduces the run (``sparsekit train --config runs/x/config.json``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsekit.errors import InputError, close_matches

OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip-batch")
SPARSE_INITS = ("scaled", "dense")


@dataclass
class TrainConfig:
    """Every knob of a training run. Method-specific knobs live in ``method_options``."""

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    val_fraction: float = 0.2
    label_column: int | str | None = None
    image_size: int | None = None
    channels: int | None = None
    seq_len: int | None = None  # text data: window length (default 128)
    vocab: str | None = None  # text data: byte (default, 256 symbols) | char
    method: str = "rigl"
    method_options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.9
    distribution: str = "erk"
    dense_first_layer: bool = True
    erk_power_scale: float = 1.0
    layer_density: dict[str, float] = field(default_factory=dict)
    sparse_embeddings: bool | None = None  # None/False: nn.Embedding tables stay dense (None keeps old configs equal)
    sparse_init: str = "scaled"
    granularity: str = "unstructured"  # mask structure: unstructured | N:M | RxC | fanin | fanin+ablate[=γ]
    epochs: int = 60
    steps: int | None = None  # total optimizer steps at 1x; overrides epochs (LM recipes count steps)
    train_multiplier: float = 1.0
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_milestones: list[float] | None = None  # step schedule: fractions of training (None: 0.3, 0.6, 0.9)
    clip_grad: float | None = None
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    threads: int = 0  # CPU intra-op threads; 0 = auto (1 for small models, see training.choose_threads)
    nan_policy: str = "stop"
    workers: int = 0  # DataLoader worker processes building training batches (0: in the training process)
    augment: str | None = None  # none | crop-flip (images); None = none, keeps older configs equal
    eval_batch_size: int = 1024
    init_from: str | None = None  # a run directory, .safetensors or torch state dict file (sparsekit.start)
    init_mask: str | None = None  # magnitude | random; None: magnitude with init_from, else random
    dist_timeout: float = 300.0  # seconds a collective may wait under torchrun before the job fails

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        def bad(what: str, flag: str, fix: str) -> InputError:
            return InputError(what, where=flag, fix=fix)

        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
                raise bad(f"{name} must be a number, got {value!r}", f"--{name.replace('_', '-')}",
                          "give a number")
            return float(value)

        if not 0.0 <= number("sparsity", self.sparsity) < 1.0:
            raise bad(f"sparsity {self.sparsity} is outside [0, 1)", "--sparsity",
                      "give the fraction of prunable weights removed, e.g. 0.9")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise bad(f"epochs must be a positive integer, got {self.epochs!r}", "--epochs", "e.g. --epochs 30")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad(f"batch size must be a positive integer, got {self.batch_size!r}", "--batch-size",
                      "e.g. --batch-size 128")
        if number("lr", self.lr) <= 0:
            raise bad(f"learning rate must be > 0, got {self.lr}", "--lr", "e.g. --lr 0.1")
        if number("momentum", self.momentum) < 0 or self.momentum >= 1:
            raise bad(f"momentum {self.momentum} is outside [0, 1)", "--momentum", "e.g. --momentum 0.9")
        if number("weight_decay", self.weight_decay) < 0:
            raise bad(f"weight decay must be >= 0, got {self.weight_decay}", "--weight-decay", "e.g. 5e-4")
        if number("train_multiplier", self.train_multiplier) <= 0:
            raise bad(f"train multiplier must be > 0, got {self.train_multiplier}", "--train-multiplier",
                      "e.g. 1, 2 or 5")
        if number("warmup_epochs", self.warmup_epochs) < 0 or self.warmup_epochs >= self.epochs * self.train_multiplier:
            raise bad(f"warm-up of {self.warmup_epochs} epochs does not fit in the run", "--warmup-epochs",
                      "give fewer warm-up epochs than training epochs")
        if not 0.0 < number("val_fraction", self.val_fraction) < 1.0:
            raise bad(f"validation fraction {self.val_fraction} is outside (0, 1)", "--val-fraction", "e.g. 0.2")
        if self.clip_grad is not None and number("clip_grad", self.clip_grad) <= 0:
            raise bad(f"gradient clipping norm must be > 0, got {self.clip_grad}", "--clip-grad", "e.g. 10")
        if number("erk_power_scale", self.erk_power_scale) < 0:
            raise bad("ERK power scale must be >= 0", "--erk-power-scale", "e.g. 1.0")
        from sparsekit.data.batches import AUGMENTS
        from sparsekit.distributions import DISTRIBUTIONS
        from sparsekit.schedules import LR_SCHEDULES

        for name, choices in (("optimizer", OPTIMIZERS), ("device", DEVICES), ("nan_policy", NAN_POLICIES),
                              ("distribution", DISTRIBUTIONS), ("lr_schedule", LR_SCHEDULES),
                              ("sparse_init", SPARSE_INITS)):
            value = getattr(self, name)
            if value not in choices:
                raise bad(f"unknown {name.replace('_', ' ')} {value!r}", f"--{name.replace('_', '-')}",
                          close_matches(str(value), choices))
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise bad(f"threads must be a non-negative integer, got {self.threads!r}", "--threads",
                      "e.g. --threads 2, or 0 for automatic")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise bad(f"workers must be a non-negative integer, got {self.workers!r}", "--workers",
                      "e.g. --workers 4, or 0 to build batches in the training process")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise bad(f"unknown augmentation {self.augment!r}", "--augment", close_matches(str(self.augment), AUGMENTS))
        self._validate_milestones()
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise bad("checkpoint interval must be a non-negative integer", "--checkpoint-every", "e.g. 500")
        if number("dist_timeout", self.dist_timeout) <= 0:
            raise bad(f"distributed timeout must be > 0 seconds, got {self.dist_timeout}", "--dist-timeout",
                      "e.g. 300")
        for name in ("steps", "seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}",
                          f"--{name.replace('_', '-')}", "e.g. 2000" if name == "steps" else "e.g. 128")
        if self.vocab is not None and self.vocab not in ("byte", "char"):
            raise bad(f"unknown vocab {self.vocab!r}", "--vocab", close_matches(str(self.vocab), ("byte", "char")))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}", "--seed", "e.g. --seed 0")
        from sparsekit.methods import get_method_class

        get_method_class(self.method).start_mask(self.init_mask, pretrained=bool(self.init_from))
        self._validate_granularity()
        return self

    def _validate_granularity(self) -> None:
        """The canonical granularity spec, refused where the method, sparsity or distribution cannot keep it."""
        from sparsekit.granularity import Granularity, check_method, implied_density
        from sparsekit.methods import get_method_class

        gran = Granularity.parse(self.granularity)
        self.granularity = gran.spec
        implied_density(gran, self.sparsity, self.distribution)
        check_method(gran, get_method_class(self.method), self.method_options)

    def _validate_milestones(self) -> None:
        """``lr_milestones``: increasing fractions of training in (0, 1), for the step schedule only."""
        ms = self.lr_milestones
        if ms is None:
            return
        fix = "give increasing fractions of training, e.g. lr_milestones: [0.3, 0.6, 0.9]"
        if (not isinstance(ms, list) or not ms
                or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in ms)
                or any(b <= a for a, b in itertools.pairwise(ms))):
            raise InputError(f"lr_milestones {ms!r} are not increasing fractions in (0, 1)", where="--config", fix=fix)
        if self.lr_schedule != "step":
            raise InputError(f"lr_milestones apply to the step LR schedule, not {self.lr_schedule}",
                             where="--config", fix="add lr_schedule: step, or drop lr_milestones")


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


PRESET_PREFIX = "preset:"
PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[dict[str, str]]:
    """Shipped presets (``sparsekit/presets/NAME.yaml``): name and the first sentence of their comment."""
    rows = []
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        comment = " ".join(ln.lstrip("# ").strip() for ln in p.read_text(encoding="utf-8").splitlines()
                           if ln.startswith("#"))
        first = comment.split(". ")[0].rstrip(".") + "."
        rows.append({"name": p.stem, "description": first, "usage": f"--config {PRESET_PREFIX}{p.stem}"})
    return rows


def preset_path(name: str) -> Path:
    """The file of shipped preset ``name``; an unknown name lists the close matches."""
    names = [row["name"] for row in list_presets()]
    if name not in names:
        raise InputError(f"unknown preset {name!r}", where=f"--config {PRESET_PREFIX}{name}",
                         fix=close_matches(name, names))
    return PRESETS_DIR / f"{name}.yaml"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config into a dict (keys may use dashes or underscores).
    ``preset:NAME`` reads a preset shipped with sparsekit (``sparsekit/presets/NAME.yaml``)."""
    if isinstance(path, str) and path.startswith(PRESET_PREFIX):
        path = preset_path(path[len(PRESET_PREFIX):])
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} does not exist", where="--config",
                         fix="give the path of a YAML/TOML/JSON file")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml/toml/json raise different types
        raise InputError(f"cannot parse config file {p}: {str(exc).splitlines()[0]}", where="--config",
                         fix="fix the syntax (YAML, TOML or JSON by file extension)") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"config file {p} must hold a mapping of option names to values", where="--config",
                         fix="write e.g. 'method: rigl' lines")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_config(base: dict[str, Any], overrides: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Overlay ``overrides`` on ``base``; unknown keys are an error naming the source."""
    out = dict(base)
    for key, value in overrides.items():
        if key in ("run_dir", "schema_version", "sparsekit_version"):
            continue  # written into saved configs for information
        if key not in _FIELDS:
            raise InputError(f"unknown option {key!r}", where=source, fix=close_matches(key, sorted(_FIELDS)))
        if key == "method_options" and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def imply_from_granularity(data: dict[str, Any], given: set[str]) -> None:
    """N:M fixes the density: sparsity and distribution not given are set to 1 − N/M and uniform, and the
    first layer is N:M too unless ``dense_first_layer`` was given."""
    from sparsekit.granularity import Granularity, implied_density

    gran = Granularity.parse(data.get("granularity"))
    if gran.kind == "nm":
        sparsity, distribution = implied_density(gran, data["sparsity"] if "sparsity" in given else None,
                                                 data["distribution"] if "distribution" in given else None)
        data["sparsity"], data["distribution"] = sparsity, distribution
        if "dense_first_layer" not in given:
            data["dense_first_layer"] = False


def build_config(file_path: str | Path | None, cli: dict[str, Any], cli_method_options: dict[str, Any]) -> TrainConfig:
    """Defaults < config file < CLI flags. Method options from a file that the chosen method does not
    take are dropped (so a saved RigL config can be rerun with ``--method static``); options given on the
    command line must be accepted by the method."""
    from sparsekit.methods import get_method_class

    data = TrainConfig().to_dict()
    file_opts: dict[str, Any] = {}
    given = {k for k, v in cli.items() if v is not None}  # settings given explicitly (file or flags)
    if file_path is not None:
        file_data = read_config_file(file_path)
        given |= set(file_data)
        file_opts = dict(file_data.pop("method_options", {}) or {})
        data = merge_config(data, file_data, source=f"--config {file_path}")
    data = merge_config(data, {k: v for k, v in cli.items() if v is not None}, source="command line")
    imply_from_granularity(data, given)
    cls = get_method_class(str(data["method"]))
    opts = {k: v for k, v in file_opts.items() if k in cls.defaults}
    opts.update(cli_method_options)
    cls(**opts)  # validates names and values
    data["method_options"] = {**cls.defaults, **opts}
    return TrainConfig(**data).validate()
