"""Typed training configuration: dataclass defaults < YAML files (in order) < ``key=value`` overrides.

An unknown key is an error that names the key and where it came from (a file and line, or the command
line), with the closest valid key; a key given twice in one YAML file or twice on the command line is an
error too. The resolved config is written to ``<run>/config.yaml`` and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    # ---- data ----
    data: str = ""  # dataset directory written by `ingest`
    dataset: str = ""  # name in reports; default: the manifest's dataset name
    train_split: str = "train"  # official train split, cut into train/val by (val_frac, split_seed)
    test_split: str = "test"
    protocol: str = "single_positive"  # full | single_positive | partial:<fraction> | given
    val_frac: float = 0.2
    split_seed: int = 1200  # Cole et al.'s RandomState(1200) for the 80/20 cut and the label generator
    val_labels: str = "clean"  # clean (truth, as Cole et al.) | observed (the protocol's labels)
    train_fraction: float = 1.0  # use this fraction of the training images (paper Figure 6)
    # ---- model ----
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | small_cnn | efficientnet_lite0
    weights: str = "none"  # none | IMAGENET1K_V1 | IMAGENET1K_V2 | DEFAULT | path/to/weights.pth
    image_size: int = 448
    # ---- optimisation (ARCHITECTURE section 6) ----
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-5  # backbone learning rate
    head_lr_mult: float = 10.0  # the linear head learns at head_lr_mult x lr
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 16  # per process
    epochs: int = 10
    linear_init_epochs: int = 0  # LinearInit: backbone frozen for this many epochs, then end to end
    early_stop_drop: float = 3.0  # stop when validation mAP falls this many points below the best
    # ---- loss (train/losses.py) ----
    method: str = "an"
    delta_rel: float | None = None  # percent per epoch; None: taken from delta_rel_table[method]
    delta_rel_table: dict = field(default_factory=dict)  # per-dataset defaults {ll_r: .., ll_ct: .., ll_cp: ..}
    r0: float | None = None  # absolute variants (ll_r_abs, ll_ct_abs): threshold R(t) = r0 - t * delta_abs
    delta_abs: float | None = None
    ls_coef: float = 0.1  # LSAN label smoothing
    epr_num_pos: float | None = None  # EPR: expected number of positives per image (set per dataset)
    global_topk: bool = False  # LL top-k over the batch gathered from all ranks instead of per rank
    # ---- evaluation ----
    map_convention: str = "exclude"  # exclude | cole
    eval_batch_size: int = 64
    # ---- runtime ----
    seed: int = 0
    loader: str = "auto"  # auto | cpu | dali
    num_workers: int = 2
    out: str = "runs"  # parent of run directories
    run_name: str = ""  # default: <dataset>-<method>-s<seed>
    resume: str = ""  # a run directory to continue
    deterministic: bool = True  # deterministic algorithms (bit-exact resume on CPU)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    cpu: bool = False  # force CPU even when a GPU is present
    cpu_threads: int = 0  # torch threads per process on CPU; 0 = auto: cores / processes - loader workers, >= 1
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 for smoke tests
    progress: bool = True
    analysis_entries: int = 0  # memorization tracker: number of training entries to follow (0 = off)
    log_every: int = 20
    debug_dump: bool = False  # tests: each rank writes its trained sample ids and a weight checksum per epoch


_METHOD_FAMILY = {"ll_r_abs": "ll_r", "ll_ct_abs": "ll_ct"}


def _field_types() -> dict[str, Any]:
    return get_type_hints(Config)


def coerce(key: str, value: Any, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key and source."""
    t = _field_types()[key]
    if value is None:
        if "None" in str(t):
            return None
        raise ConfigError(f"{where}: {key} may not be null")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: {key} must be true/false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return int(value)
    if t is float or str(t).startswith("float"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
    if t is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if t is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {t} for {key}")


def _unknown(key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a mapping key given twice (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{key_node.start_mark.name}:{line}: key {key!r} given twice (first on line {seen[key]})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> list[tuple[str, Any, str]]:
    """Return (key, value, "file:line") triples of a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}: a config file must be a mapping of key: value")
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return [(k, v, f"{path}:{lines.get(k, '?')}") for k, v in data.items()]


def parse_overrides(items: list[str]) -> list[tuple[str, Any, str]]:
    out = []
    seen = set()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command line: {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"command line: key {key!r} given twice")
        seen.add(key)
        out.append((key, value, "command line"))
    return out


def build_config(config_files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    cfg = Config()
    names = {f.name for f in dataclasses.fields(Config)}
    entries: list[tuple[str, Any, str]] = []
    for path in config_files:
        entries.extend(load_yaml(path))
    entries.extend(parse_overrides(list(overrides)))
    for key, value, where in entries:
        if key not in names:
            raise _unknown(key, where)
        setattr(cfg, key, coerce(key, value, where))
    return resolve(cfg)


def resolve(cfg: Config) -> Config:
    """Fill derived values and check ranges; returns a new Config (the input is not changed)."""
    cfg = dataclasses.replace(cfg, delta_rel_table=dict(cfg.delta_rel_table))
    if cfg.delta_rel is None:
        family = _METHOD_FAMILY.get(cfg.method, cfg.method)
        cfg.delta_rel = float(cfg.delta_rel_table.get(family, 0.2))
    if not cfg.data:
        raise ConfigError("config: `data` (the dataset directory written by `ingest`) is not set")
    if cfg.val_labels not in ("clean", "observed"):
        raise ConfigError(f"config: val_labels must be clean|observed, got {cfg.val_labels!r}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ConfigError(f"config: optimizer must be adam|sgd, got {cfg.optimizer!r}")
    if cfg.loader not in ("auto", "cpu", "dali"):
        raise ConfigError(f"config: loader must be auto|cpu|dali, got {cfg.loader!r}")
    if cfg.map_convention not in ("exclude", "cole"):
        raise ConfigError(f"config: map_convention must be exclude|cole, got {cfg.map_convention!r}")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"config: mixed_precision must be auto|no|bf16|fp16, got {cfg.mixed_precision!r}")
    if not (0.0 < cfg.train_fraction <= 1.0):
        raise ConfigError(f"config: train_fraction must be in (0, 1], got {cfg.train_fraction}")
    if not (0.0 <= cfg.val_frac < 1.0):
        raise ConfigError(f"config: val_frac must be in [0, 1), got {cfg.val_frac}")
    for k in ("batch_size", "epochs", "image_size", "eval_batch_size"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"config: {k} must be positive, got {getattr(cfg, k)}")
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ConfigError(f"config: lr must be positive, got {cfg.lr}")
    try:
        loss_config(cfg)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    return cfg


def loss_config(cfg: Config):
    """The loss's own typed config (train/losses.py), built from the flat run config."""
    from largeloss.train.losses import LossConfig

    return LossConfig(
        method=cfg.method, delta_rel=cfg.delta_rel, r0=cfg.r0, delta_abs=cfg.delta_abs, ls_coef=cfg.ls_coef,
        expected_num_pos=cfg.epr_num_pos, global_topk=cfg.global_topk,
    )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(d: dict[str, Any], where: str = "checkpoint") -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config()
    for k, v in d.items():
        if k not in names:
            raise _unknown(k, where)
        setattr(cfg, k, coerce(k, v, where))
    return cfg
