"""Typed training configuration: dataclass defaults < YAML files (in order) < ``key=value`` overrides.

Every key is declared once, with its type: the run's keys in ``Config``, the loss's keys in
``train.losses.LossConfig`` (held as ``Config.loss``; its keys are top-level keys of a config file, with
the same names). Choices are types (``typing.Literal``, or ``Annotated`` with a ``Check``), and the
coercion checks every value against its key's type. An unknown key, also inside ``delta_rel_table``, is an
error naming the key and where it came from (``file:line`` or ``command line``) with the closest valid
key; a key given twice in one YAML file or twice on the command line is an error too.

``resolve`` turns the entries into a frozen ``Config`` and computes the derived values: ``delta_rel``,
when not given, is the ``delta_rel_table`` entry of the method (the absolute variants share their
family's entry), else LossConfig's default. The resolved config is written to ``<run>/config.yaml`` and
into every checkpoint as flat keys (``to_dict``), and read back by ``from_dict`` / ``resume_config``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, get_args, get_origin, get_type_hints

import yaml

from ..eval.metrics import Convention
from ..eval.rundir import TRAINER_STATE, RunDir
from ..shards.protocols import PROTOCOL_FORMS, parse_protocol
from .losses import LossConfig
from .model import Arch


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Check:
    """``Annotated[str, Check(...)]``: a value the coercion passes to ``parse``, which raises ValueError with a
    message naming the key when the value is not one of ``choices`` (a text for ``--list-keys``)."""

    parse: Callable[[str], Any]
    choices: str


Protocol = Annotated[str, Check(parse_protocol, " | ".join(PROTOCOL_FORMS))]
Optimizer = Literal["adam", "sgd"]
ValLabels = Literal["clean", "observed"]  # clean: the truth, as Cole et al.; observed: the protocol's labels
LoaderKind = Literal["auto", "cpu", "dali"]
#: what is checked of the dataset's files before training: size = each file's size against manifest.json (a
#: stat each); full = also its sha256 (reads every byte once, with a progress bar)
Verify = Literal["size", "full"]
#: a sample that cannot be read or decoded: raise = stop with its shard and key; skip = count it and go on
OnError = Literal["raise", "skip"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]  # auto: bf16 on a GPU that has it, none on CPU
TableKey = Literal["ll_r", "ll_ct", "ll_cp"]
#: the delta_rel_table entry a method takes its delta_rel from: the absolute variants share their family's
TABLE_KEY = {"ll_r": "ll_r", "ll_ct": "ll_ct", "ll_cp": "ll_cp", "ll_r_abs": "ll_r", "ll_ct_abs": "ll_ct"}


@dataclass(frozen=True)
class Config:
    # ---- data ----
    data: str = ""  # dataset directory written by `ingest`
    dataset: str = ""  # name in reports; default: the manifest's dataset name
    train_split: str = "train"  # official train split, cut into train/val by (val_frac, split_seed)
    test_split: str = "test"
    protocol: Protocol = "single_positive"
    val_frac: float = 0.2
    split_seed: int = 1200  # Cole et al.'s RandomState(1200) for the 80/20 cut and the label generator
    val_labels: ValLabels = "clean"
    train_fraction: float = 1.0  # use this fraction of the training images (paper Figure 6)
    verify: Verify = "size"  # checked at the start (shards/reader.py open_dataset)
    on_error: OnError = "raise"  # both loaders (shards/loader.py, shards/dali.py)
    # ---- model ----
    arch: Arch = "resnet50"
    weights: str = "none"  # none | IMAGENET1K_V1 | IMAGENET1K_V2 | DEFAULT | path/to/weights.pth (train/model.py)
    image_size: int = 448
    boost_alpha: float = 1.0  # BoostLU (Kim et al., CVPR 2023): positive CAM values x alpha before pooling; 1 = off
    # ---- optimisation (docs/ARCHITECTURE.md section 6) ----
    optimizer: Optimizer = "adam"
    lr: float = 1e-5  # backbone learning rate
    head_lr_mult: float = 10.0  # the linear head learns at head_lr_mult x lr
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 16  # per process
    epochs: int = 10
    linear_init_epochs: int = 0  # LinearInit: backbone frozen for this many epochs, then end to end
    early_stop_drop: float = 3.0  # stop when validation mAP falls this many points below the best
    # ---- loss: the keys of train/losses.py's LossConfig, at the top level of a config file ----
    loss: LossConfig = field(default_factory=LossConfig)
    # per-dataset delta_rel of the large-loss methods, used when delta_rel is not given
    delta_rel_table: Mapping[TableKey, float] = field(default_factory=lambda: types.MappingProxyType({}))
    # ROLE's label estimates learn at the head's learning rate x role_lr_mult (Cole et al.: 10)
    role_lr_mult: float = 10.0
    # ROLE's estimates and EM+APL's pseudo-labels are dense [training images x classes] tables in every
    # process's memory (train/methods.py): larger runs are refused (2**27 entries: 2 GiB with ROLE's Adam state)
    max_state_entries: int = 2**27
    # ---- evaluation (docs/ARCHITECTURE.md section 7; each dataset config names its reference's) ----
    map_convention: Convention = "exclude"
    eval_batch_size: int = 64
    # ---- runtime ----
    seed: int = 0
    loader: LoaderKind = "auto"
    num_workers: int = 2
    out: str = "runs"  # parent of run directories
    run_name: str = ""  # default: <dataset>-<method>-s<seed>
    resume: str = ""  # a run directory to continue
    deterministic: bool = True  # deterministic algorithms (bit-exact resume on CPU)
    mixed_precision: MixedPrecision = "auto"
    cpu: bool = False  # force CPU even when a GPU is present
    cpu_threads: int = 0  # torch threads per process on CPU; 0 = auto: cores / processes - loader workers, >= 1
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 for smoke tests
    progress: bool = True
    analysis_entries: int = 0  # memorization tracker: number of training entries to follow (0 = off)
    log_every: int = 20
    debug_dump: bool = False  # tests: each rank writes its trained sample ids and a weight checksum per epoch
    # ---- throughput (issue 13; none changes what is computed on CPU) ----
    flush_every: int = 100  # LL-Cp: steps whose corrections wait on the device before they go to the label store
    channels_last: bool = False  # the model and its 4-D inputs in channels-last memory format (tensor cores)
    compile: bool = False  # torch.compile the model (inductor, through Accelerate); off: as `accelerate launch` says


def _key_types() -> dict[str, Any]:
    """Every config key -> its type, in the order of ``to_dict`` (the loss keys where ``Config.loss`` is)."""
    run = get_type_hints(Config, include_extras=True)
    loss = get_type_hints(LossConfig, include_extras=True)
    clash = set(run) & set(loss)
    assert not clash, f"keys declared in both Config and LossConfig: {clash}"
    out: dict[str, Any] = {}
    for name, t in run.items():
        out.update(loss if name == "loss" else {name: t})
    return out


KEY_TYPES = _key_types()
LOSS_KEYS = tuple(f.name for f in dataclasses.fields(LossConfig))


# ------------------------------------------------------------------------------------------ coercion


def _choices(t) -> str:
    """The type of a key as ``--list-keys`` shows it."""
    origin = get_origin(t)
    if origin is Literal:
        return " | ".join(map(str, get_args(t)))
    if origin is Annotated:
        return next((a.choices for a in t.__metadata__ if isinstance(a, Check)), _choices(get_args(t)[0]))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_choices(a) for a in get_args(t))
    if origin is Mapping:
        k, v = get_args(t)
        return f"{{{_choices(k)}: {_choices(v)}}}"
    return "null" if t is type(None) else t.__name__


_INT_RE = re.compile(r"[+-]?[0-9]+")


def coerce(key: str, value: Any, where: str, t: Any = None) -> Any:
    """Turn a YAML or command-line value into the key's type, or fail naming the key and source."""
    t = KEY_TYPES[key] if t is None else t
    origin = get_origin(t)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        (inner,) = [a for a in get_args(t) if a is not type(None)]
        return coerce(key, value, where, inner)
    if value is None:
        raise ConfigError(f"{where}: {key} may not be null")
    if origin is Annotated:
        value = coerce(key, value, where, get_args(t)[0])
        for check in (a for a in t.__metadata__ if isinstance(a, Check)):
            try:
                check.parse(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None  # the parser's message names the key
        return value
    if origin is Literal:
        choices = get_args(t)
        if isinstance(value, (dict, list)) or str(value) not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {key} must be {'|'.join(choices)}, got {value!r}{hint}")
        return str(value)
    if origin is Mapping:
        return _coerce_mapping(key, value, where, *get_args(t))
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: {key} must be true/false, got {value!r}")
    if t is int:
        # ASCII digits with one optional sign: str.isdigit() also accepts "²", which int() then refuses
        if isinstance(value, bool) or not (isinstance(value, int)
                                           or (isinstance(value, str) and _INT_RE.fullmatch(value.strip()))):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return int(value)
    if t is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
    if t is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {t} for {key}")


def _coerce_mapping(key: str, value: Any, where: str, key_type: Any, value_type: Any) -> Mapping:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: {key} must be a mapping such as {{ll_ct: 0.2}}, got {value!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
    names = get_args(key_type)
    out = {}
    for k, v in value.items():
        line = value.lines.get(str(k)) if isinstance(value, _LinedDict) else None
        at = where if line is None else f"{where.rsplit(':', 1)[0]}:{line}"
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{at}: {key}: unknown key {k!r}{hint}; the keys are {', '.join(names)}")
        out[k] = coerce(f"{key}.{k}", v, at, value_type)
    return types.MappingProxyType(out)


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(KEY_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


# ------------------------------------------------------------------------------------------- sources


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

Entry = tuple[str, Any, str]  # (key, value, where: "file:line" or "command line")


class _LinedDict(dict):
    """A mapping value of a config file, with the line of each of its keys (for errors inside it)."""

    lines: dict[str, int]  # by the key as written


def load_yaml(path: str | Path) -> list[Entry]:
    """Return (key, value, "file:line") triples of a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as "
                          "UTF-8") from None
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
    for key_node, value_node in node.value:
        if isinstance(value_node, yaml.MappingNode) and isinstance(data.get(key_node.value), dict):
            lined = data[key_node.value] = _LinedDict(data[key_node.value])
            lined.lines = {k.value: k.start_mark.line + 1 for k, _ in value_node.value}
    return [(k, v, f"{path}:{lines.get(k, '?')}") for k, v in data.items()]


def parse_overrides(items: Iterable[str]) -> list[Entry]:
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


# ------------------------------------------------------------------------------------------ resolve


def build_config(config_files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> Config:
    entries: list[Entry] = []
    for path in config_files:
        entries.extend(load_yaml(path))
    return resolve(entries + parse_overrides(overrides))


#: keys added after run directories were first written, with the value that reproduces such a run: a run saved
#: without ``ll_selection`` selected exactly k entries (the rule before ``official`` existed)
KEYS_ADDED_LATER = {"ll_selection": "exact_k"}


#: keys a resume may change on the command line (they do not change what is computed); every other key is
#: the checkpoint's
RESUMABLE_OVERRIDES = ("progress", "num_workers", "log_every", "flush_every")


def resume_config(run_dir: str, overrides: Iterable[str]) -> Config:
    """The config saved in ``run_dir``, continued from there (``resume``), with ``overrides`` (the caller
    restricts them to ``RESUMABLE_OVERRIDES``). A key of ``KEYS_ADDED_LATER`` missing from the saved config
    takes the value the run was trained with, not today's default. The run's newest checkpoint holds the
    config it was trained with: config.yaml must equal it, but for ``RESUMABLE_OVERRIDES``, or resume is
    refused naming the keys that differ."""
    from .checkpoint import latest_checkpoint, read_state

    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise ConfigError(f"resume={run_dir}: {rd.config} not found; is this a run directory?")
    # A run in use is refused here, before its files are read while they change; by the launch's rank 0 only
    # (RANK, set by accelerate/torchrun): the others would race rank 0, which takes the lock for the run
    if os.environ.get("RANK", "0") == "0":
        rd.lock().close()
    cfg = resolve(_saved_entries(load_yaml(rd.config), str(rd.config)) + [("resume", str(run_dir), "command line")]
                  + parse_overrides(overrides))
    latest = latest_checkpoint(rd)
    if latest is not None:
        state_path = latest / TRAINER_STATE
        trained = resolve(_saved_entries([(k, v, str(state_path)) for k, v in read_state(latest)["config"].items()],
                                         str(state_path)))
        now, then = to_dict(cfg), to_dict(trained)
        differ = [k for k in now if k not in ("resume", *RESUMABLE_OVERRIDES) and now[k] != then[k]]
        if differ:
            shown = "; ".join(f"{k}: {now[k]!r} in config.yaml, {then[k]!r} in the checkpoint" for k in differ)
            raise ConfigError(f"resume={run_dir}: {rd.config} differs from the config the run was trained with "
                              f"({state_path}) in {shown}; restore config.yaml, or start a new run (only "
                              f"{', '.join(RESUMABLE_OVERRIDES)} may change on resume, as key=value)")
    return cfg


def _saved_entries(entries: list[Entry], where: str) -> list[Entry]:
    """A saved config's entries without ``resume``, and the ``KEYS_ADDED_LATER`` it lacks."""
    saved = [e for e in entries if e[0] != "resume"]
    keys = {e[0] for e in saved}
    return [(k, v, f"{where} (saved before {k} existed)") for k, v in KEYS_ADDED_LATER.items()
            if k not in keys] + saved


def resolve(entries: Iterable[Entry]) -> Config:
    """Coerce the entries (later ones win), fill the derived values and check ranges: the frozen Config."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value, w in entries:
        if key not in KEY_TYPES:
            raise _unknown(key, w)
        values[key], where[key] = coerce(key, value, w), w
    if "delta_rel" not in values:
        table_key = TABLE_KEY.get(values.get("method", LossConfig.method))
        table = values.get("delta_rel_table", {})
        if table_key in table:
            values["delta_rel"] = table[table_key]
    if values.get("method") == "gr_loss":  # GR-Loss's schedules span the run's epochs after its LinearInit
        if values.get("gr_epochs") is None:
            values["gr_epochs"] = values.get("epochs", Config.epochs)
        if values.get("gr_linear_init") is None:
            values["gr_linear_init"] = values.get("linear_init_epochs", Config.linear_init_epochs)
    try:
        loss = LossConfig(**{k: values.pop(k) for k in LOSS_KEYS if k in values})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.get('method', 'config')}: {e}") from None
    cfg = Config(loss=loss, **values)
    _check_ranges(cfg, lambda k: where.get(k, "config"))
    return cfg


#: int keys that must be >= 1; every other int key must be >= 0 (counts, seeds, sizes: none is negative)
POSITIVE_INTS = ("batch_size", "epochs", "image_size", "eval_batch_size", "log_every", "flush_every")
#: float keys of Config with their allowed interval (as printed, and as a test); any other float key must
#: be finite
FLOAT_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "val_frac": ("(0, 1)", lambda v: 0.0 < v < 1.0),  # 0 leaves no validation cut to choose the best epoch on
    "train_fraction": ("(0, 1]", lambda v: 0.0 < v <= 1.0),
    "lr": ("(0, inf)", lambda v: v > 0.0),
    "head_lr_mult": ("(0, inf)", lambda v: v > 0.0),
    "momentum": ("[0, 1]", lambda v: 0.0 <= v <= 1.0),
    "weight_decay": ("[0, inf)", lambda v: v >= 0.0),
    "early_stop_drop": ("[0, inf)", lambda v: v >= 0.0),
    "boost_alpha": ("(0, inf)", lambda v: v > 0.0),  # BoostLU's factor on positive CAM values; 1 = off
    "role_lr_mult": ("(0, inf)", lambda v: v > 0.0),
}


def _check_ranges(cfg: Config, where: Callable[[str], str]) -> None:
    """Every int and float key of Config against its range (the loss keys are LossConfig's to check)."""
    if not cfg.data:
        raise ConfigError("config: `data` (the dataset directory written by `ingest`) is not set")
    for key, t in get_type_hints(Config).items():
        value = getattr(cfg, key)
        if t is int:
            low = 1 if key in POSITIVE_INTS else 0
            if value < low:
                raise ConfigError(f"{where(key)}: {key} must be {'positive' if low else '>= 0'}, got {value}")
        elif t is float:
            interval, ok = FLOAT_RANGES.get(key, ("(-inf, inf)", lambda v: True))
            if not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"{where(key)}: {key} must be in {interval}, got {value}")
    for k, v in cfg.delta_rel_table.items():
        if not (math.isfinite(v) and 0.0 <= v <= 100.0):
            raise ConfigError(f"{where('delta_rel_table')}: delta_rel_table.{k} must be in [0, 100] (a percent), "
                              f"got {v}")
    if cfg.loss.method == "em_apl" and cfg.loss.apl_warmup >= cfg.epochs:
        raise ConfigError(f"{where('apl_warmup')}: apl_warmup ({cfg.loss.apl_warmup}) must be < epochs ({cfg.epochs}): "
                          "APL spreads its pseudo-labels over the epochs after the warm-up")


# ------------------------------------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict[str, Any]:
    """Flat keys, in ``KEY_TYPES`` order: what a config file holds."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "loss":
            out.update(dataclasses.asdict(value))
        else:
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(d: dict[str, Any], where: str = "checkpoint") -> Config:
    return resolve((k, v, where) for k, v in d.items())


def describe_keys() -> list[str]:
    """One line per key for ``--list-keys``: name, default and type or choices."""
    defaults = to_dict(Config())
    return [f"{name} = {defaults[name]!r}  ({_choices(t)})" for name, t in KEY_TYPES.items()]
