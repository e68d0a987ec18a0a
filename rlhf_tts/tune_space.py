"""Declarative Ray Tune search spaces (`tune_spaces/*.yaml`), validated against the config tree.

No Ray here: this module reads a space file into plain, checked Python objects; `actors.tune_runner`
turns them into Tune objects. A file looks like this::

    name: ablation_k                 # the Tune experiment name (fixed, so `--resume` finds it)
    base:                            # config keys every trial shares (same layout as --config)
      align: {t_range: [0.0, 0.75]}
    space:                           # dotted config key -> one distribution
      align.k: {grid: [2, 4, 8]}
      align.lr: {loguniform: [1.0e-5, 1.0e-3]}
    tune:                            # how to search (every key optional; see SweepSettings)
      metric: emo_sim
      scheduler: asha

Distributions: `grid: [v, ...]` (every value, crossed with the other grids), `choice: [v, ...]`
(one drawn per sample), `uniform: [low, high]`, `loguniform: [low, high]` (low > 0). Only
`align.*` and `distributed.*` keys can be swept: the corpus, the base model, EASPM and the judges are
built once before the trials start and shared by all of them. Every value a distribution can take
(every grid point, every choice, both ends of a range) is validated as a full config before Ray
starts, so a typo or an impossible value is a one-line error naming the file and the key.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_tts.config import ConfigError, RunConfig, load_config

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
SWEEPABLE_SECTIONS = ("align", "distributed")
#: Cross-checking every combination of grid values is cheap up to this many combinations.
MAX_CHECKED_COMBINATIONS = 512
DEFAULT_METRIC_FN = "rlhf_tts.tune:judge_emo_sim"


class SpaceError(ConfigError):
    """A search-space file that cannot run; the message is one line naming the file and the key."""


class SweepSettings(BaseModel):
    """How a sweep searches: the `tune:` section of a space file, overridable on the command line."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("emo_sim", description="the reported metric ASHA and the best-config choice use")
    mode: Literal["max", "min"] = "max"
    metric_fn: str = Field(
        DEFAULT_METRIC_FN,
        description="module:function(cfg, policy, vocab, n_utterances) -> dict of metrics on the validation subset",
    )
    metric_utterances: int = Field(10, ge=1, description="validation utterances the metric is computed on")
    report_every: int = Field(10, ge=1, description="learner updates per Tune iteration (a report and a checkpoint)")
    scheduler: Literal["asha", "none"] = "asha"
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; optuna: trials")
    grace_period: int = Field(1, ge=1, description="ASHA: iterations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor per rung")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as resources allow")
    trial_cpus: float = Field(1.0, ge=0.0, description="the trial's own process (driver loop and metric)")
    trial_gpus: float = Field(0.0, ge=0.0, description="GPU of the trial process (metric synthesis), used when GPUs exist")
    max_failures: int = Field(0, ge=0, description="times Tune restarts a failed trial from its last checkpoint")
    storage_path: str | None = Field(None, description="Tune storage (shared or s3:// on a cluster); None: <output_dir>/tune")
    seed: int = Field(0, description="search algorithm seed (optuna)")


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # grid/choice values, or (low, high)

    def candidates(self) -> list[Any]:
        """Values to validate: every discrete value, or both ends of a range."""
        return list(self.values)


@dataclass
class SearchSpace:
    """A validated space file."""

    path: Path
    name: str
    base: dict[str, Any]  # nested config overrides shared by every trial
    space: dict[str, Distribution]  # dotted key -> distribution
    settings: SweepSettings
    overrides: list[str] = field(default_factory=list)  # command-line key=value, applied after `base`

    def base_overrides(self) -> list[str]:
        """`base` and the command-line overrides as key=value strings for `load_config`."""
        return [*(f"{k}={_dump(v)}" for k, v in _flatten(self.base).items()), *self.overrides]

    def resolve(self, params: dict[str, Any]) -> RunConfig:
        """The config of one trial: base, command-line overrides, then the trial's sampled values."""
        return load_config(None, [*self.base_overrides(), *(f"{k}={_dump(v)}" for k, v in params.items())])

    def base_config(self) -> RunConfig:
        return load_config(None, self.base_overrides())

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")


def _dump(value: Any) -> str:
    # JSON is YAML flow syntax, which OmegaConf's dotlist parser reads back with the right type.
    return json.dumps(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _field_of(key: str) -> None:
    """Check that a dotted key names a leaf of the config tree that may be swept."""
    parts = key.split(".")
    if parts[0] not in SWEEPABLE_SECTIONS:
        if parts[0] in RunConfig.model_fields:
            raise ValueError(f"only {', '.join(s + '.*' for s in SWEEPABLE_SECTIONS)} keys can be swept "
                             "(the corpus, base model, EASPM and judges are built once for all trials; set "
                             "other keys under base:)")
        raise ValueError("unknown key")
    model: type[BaseModel] = RunConfig
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise ValueError(f"unknown key {part!r} (known: {', '.join(sorted(fields))})")
        annotation = fields[part].annotation
        is_last = depth == len(parts) - 1
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if is_last:
                raise ValueError("is a section, not a value; name one of its keys")
            model = annotation
        elif not is_last:
            raise ValueError(f"{part!r} is a value, not a section")


def _distribution(key: str, spec: Any) -> Distribution:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"must be one of {{{', '.join(k + ': ...' for k in DISTRIBUTIONS)}}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r} (use one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{kind}: needs a non-empty list")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{kind}: needs [low, high] numbers, got {values!r}")
        low, high = float(values[0]), float(values[1])
        if not low < high:
            raise ValueError(f"{kind}: low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: low must be positive, got {low}")
        return Distribution(kind, (low, high))
    if len({_dump(v) for v in values}) != len(values):
        raise ValueError(f"{kind}: repeated values in {values!r}")
    return Distribution(kind, tuple(values))


def _one_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_space(path: str | os.PathLike[str], overrides: list[str] | None = None,
               settings_overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a space file; `overrides` are key=value config overrides on top of `base`."""
    import yaml

    file = Path(path)
    where = f"tune space {file}"
    if not file.is_file():
        raise SpaceError(f"{where}: does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{where}: not valid YAML ({_one_line(err)})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: the top level must be a mapping with space: (and optionally name:, base:, tune:)")
    unknown = set(raw) - {"name", "description", "base", "space", "tune"}
    if unknown:
        raise SpaceError(f"{where}: {sorted(unknown)[0]}: unknown key (use name, description, base, space, tune)")
    name = raw.get("name") or file.stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpaceError(f"{where}: name: {name!r} must be letters, digits, - and _ (it names a folder)")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SpaceError(f"{where}: base: must be a mapping of config keys")
    try:
        settings = SweepSettings.model_validate({**(raw.get("tune") or {}), **(settings_overrides or {})})
    except ValidationError as err:
        item = err.errors()[0]
        loc = ".".join(str(p) for p in item["loc"])
        msg = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        raise SpaceError(f"{where}: tune.{loc}: {msg}") from None
    if ":" not in settings.metric_fn:
        raise SpaceError(f"{where}: tune.metric_fn: {settings.metric_fn!r} must be module:function")
    entries = raw.get("space")
    if not isinstance(entries, dict) or not entries:
        raise SpaceError(f"{where}: space: needs at least one key: distribution")
    space: dict[str, Distribution] = {}
    for key, spec in entries.items():
        try:
            _field_of(str(key))
            space[str(key)] = _distribution(str(key), spec)
        except ValueError as err:
            raise SpaceError(f"{where}: space.{key}: {_one_line(err)}") from None
    if settings.search == "optuna" and any(d.kind == "grid" for d in space.values()):
        grid_key = next(k for k, d in space.items() if d.kind == "grid")
        raise SpaceError(f"{where}: space.{grid_key}: grid needs --search grid; with optuna use choice")
    result = SearchSpace(file, name, base, space, settings, list(overrides or []))
    _validate_values(result, where)
    return result


def _validate_values(space: SearchSpace, where: str) -> None:
    """Every value each distribution can take must give a valid config (grids: every combination)."""
    try:
        base = space.base_config()
    except ConfigError as err:
        raise SpaceError(f"{where}: base: {err}") from None
    if space.settings.metric_fn == DEFAULT_METRIC_FN and "judges" not in base.stages:
        raise SpaceError(f"{where}: stages: the default metric ({DEFAULT_METRIC_FN}) needs the judges stage; "
                         "keep it in stages or choose another --metric-fn")
    for key, dist in space.space.items():
        for value in dist.candidates():
            try:
                space.resolve({key: value})
            except ConfigError as err:
                raise SpaceError(f"{where}: space.{key}: value {_dump(value)}: {err}") from None
    grids = {k: d.values for k, d in space.space.items() if d.kind == "grid"}
    if len(grids) > 1 and space.grid_size() <= MAX_CHECKED_COMBINATIONS:
        for combo in itertools.product(*grids.values()):
            params = dict(zip(grids, combo))
            try:
                space.resolve(params)
            except ConfigError as err:
                raise SpaceError(f"{where}: space: combination {_dump(params)}: {err}") from None
