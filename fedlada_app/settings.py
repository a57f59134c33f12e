"""The Flower-only knobs of a run (the ``flower.*`` keys of Flower's run config) and the split of a run config.

Flower hands the ServerApp one flat ``run_config`` (``{"lada.budget": 0.4, "flower.timeout": 3600.0, ...}``).
Keys under ``flower.`` configure the engine, not the method, so they are parsed here into :class:`FlowerConfig` and
stripped before the rest goes to :func:`fedlada.config.load_config` (which rejects unknown keys).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlada.config import RunConfig, load_config, toml_string
from fedlada.errors import ConfigError

PREFIX = "flower."

# The environment of every Flower engine: Flower and Ray must not phone home or install anything at run time, and
# Ray must not hide the GPUs from workers that reserve none (its default until now, with a FutureWarning on every
# run): an SLM on device "auto" then finds a GPU in a ClientApp as in-process.
QUIET_FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@dataclass(frozen=True)
class FlowerConfig:
    """How the Flower engine runs a LaDa run (none of it changes the method's numbers)."""

    timeout: float = 3600.0  # seconds the server waits for a step's replies; a node without a reply by then failed
    connect_timeout: float = 300.0  # seconds to wait for the SuperNodes of all partitions before round 1
    telemetry: bool = True  # clients also send their local log (metrics, filter selections) for the run directory
    model_cache: int = 8  # prepared SLMs (with their data) kept per ClientApp process; 0 = prepare on every message
    # simulation only: CPUs Ray reserves per ClientApp worker; 0 = the run's torch threads (``threads``, resolved),
    # so workers take turns and each computes as the in-process runner does, never oversubscribing the cores
    client_cpus: float = 0.0
    # simulation only: GPUs Ray reserves per ClientApp worker (0.5 = two workers share a GPU); 0 = none reserved,
    # the workers still see the machine's GPUs, so an SLM with device "auto" uses one as in-process
    client_gpus: float = 0.0

    def __post_init__(self):
        for key in ("timeout", "connect_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'flower.{key}': expected a number > 0, found {getattr(self, key)!r}")
        if not self.client_cpus >= 0:
            raise ConfigError(f"config key 'flower.client_cpus': expected a number >= 0 (0 = the run's threads), "
                              f"found {self.client_cpus!r}")
        if not self.client_gpus >= 0:
            raise ConfigError(f"config key 'flower.client_gpus': expected a number >= 0 (0 = none reserved), "
                              f"found {self.client_gpus!r}")
        if self.model_cache < 0:
            raise ConfigError(f"config key 'flower.model_cache': expected an integer >= 0, found {self.model_cache!r}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(value, str) and not isinstance(default, bool):  # from the command line: `--set flower.timeout=60`
        try:
            value = int(value.strip())
        except ValueError:
            try:
                value = float(value.strip())
            except ValueError:
                pass
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"config key '{key}': expected true or false, found {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, found {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"config key '{key}': expected a number, found {value!r}")


def flower_config(values: Mapping[str, Any]) -> FlowerConfig:
    """``{"timeout": 60, ...}`` (keys without the ``flower.`` prefix) -> FlowerConfig; unknown keys are an error."""
    defaults = FlowerConfig()
    names = {f.name for f in dataclasses.fields(FlowerConfig)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{PREFIX}{k}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(PREFIX + k, v, getattr(defaults, k))
    return FlowerConfig(**kwargs)


def split_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerConfig]:
    """Flower's flat run config -> (the typed LaDa config, the engine knobs). Unknown keys: ConfigError."""
    flower = {k[len(PREFIX):]: v for k, v in run_config.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in run_config.items() if not k.startswith(PREFIX)}
    return load_config(overrides=rest), flower_config(flower)


def as_run_config(fcfg: FlowerConfig) -> dict[str, Any]:
    """The ``flower.*`` keys of a FlowerConfig, flat, as they appear in Flower's run config."""
    return {PREFIX + f.name: getattr(fcfg, f.name) for f in dataclasses.fields(FlowerConfig)}


def pyproject_section(cfg: RunConfig | None = None, fcfg: FlowerConfig | None = None) -> str:
    """``[tool.flwr.app.config]`` for ``cfg`` (default: the app's defaults) as TOML.

    Flower's run config holds scalars only, and ``flwr run --run-config`` may set only keys that exist here, so
    every key is spelled out: list-of-table entries as ``models.slms.N`` tables, string lists as one
    comma-separated string, ``data.clients`` as a JSON string (empty: the built-in benchmark). ``python -m
    fedlada_app.settings`` prints it (to refresh ``pyproject.toml`` after the config gains a key)."""
    import json

    from fedlada.config import to_dict

    cfg = cfg or dataclasses.replace(RunConfig(), out_dir="runs/flower", engine="flower")
    fcfg = fcfg or FlowerConfig()

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return toml_string(v)
        if isinstance(v, list):  # string lists (lora_target_modules) and data.clients
            return toml_string(",".join(v) if all(isinstance(x, str) for x in v) else json.dumps(v, ensure_ascii=False))
        return repr(v)

    lines: list[str] = []

    def table(d: dict, name: str) -> None:
        lines.append(f"\n[{name}]")
        for k, v in d.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)
                                                and k != "clients"):
                lines.append(f"{k} = {val(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, f"{name}.{k}")
            elif isinstance(v, list) and v and isinstance(v[0], dict) and k != "clients":
                for i, item in enumerate(v):
                    table(item, f"{name}.{k}.{i}")

    table(to_dict(cfg), "tool.flwr.app.config")
    table(dataclasses.asdict(fcfg), "tool.flwr.app.config.flower")
    return "\n".join(lines).lstrip() + "\n"


def absolute_paths(cfg: RunConfig, base: str | os.PathLike) -> tuple[RunConfig, list[str]]:
    """``cfg`` with its relative file paths (``out_dir``, the data files, model folders and plug-in files that exist
    under ``base``) made absolute against ``base``, and the keys changed. The ServerApp and the ClientApps run in the SuperLink's and
    SuperNodes' working directories, where a path relative to the experimenter's directory means something else."""
    base = Path(base).resolve()
    changed: list[str] = []

    def fix(key: str, value: str, *, only_existing: bool = False) -> str:
        if not value or os.path.isabs(value) or (only_existing and not (base / value).exists()):
            return value
        changed.append(key)
        return str(base / value)

    data = cfg.data
    clients = tuple(dataclasses.replace(c, train=fix(f"data.clients.{i}.train", c.train),
                                        test=fix(f"data.clients.{i}.test", c.test))
                    for i, c in enumerate(data.clients))
    data = dataclasses.replace(data, clients=clients, public=fix("data.public", data.public),
                               general=fix("data.general", data.general))

    def spec(key: str, s):  # a hub id ("Qwen/Qwen2.5-0.5B") stays as it is; a folder or file here becomes absolute
        return s if s.source == "tiny" else dataclasses.replace(s, source=fix(f"{key}.source", s.source,
                                                                              only_existing=True))

    models = dataclasses.replace(cfg.models, llm=spec("models.llm", cfg.models.llm),
                                 slms=tuple(spec(f"models.slms.{i}", s) for i, s in enumerate(cfg.models.slms)))
    out_dir = fix("out_dir", cfg.out_dir)
    plugins = tuple(fix(f"lada.plugins.{i}", p, only_existing=True) if p.endswith(".py") else p
                    for i, p in enumerate(cfg.lada.plugins))  # a module name stays as it is
    lada = dataclasses.replace(cfg.lada, plugins=plugins)
    return dataclasses.replace(cfg, data=data, models=models, out_dir=out_dir, lada=lada), changed


def run_config_file(cfg: RunConfig) -> str:
    """A ``flwr run --run-config FILE`` file for ``cfg`` (e.g. one of ``configs/``, loaded with ``load_config``):
    the keys whose value differs from the app's defaults, as dotted keys in the run config's spelling. Flower
    accepts only keys the app lists, so a key it does not list (a fourth SLM spec) is a ConfigError. Paths are
    written as ``cfg`` holds them: see :func:`absolute_paths`."""
    import json
    import tomllib

    from flwr.common.config import flatten_dict

    def flat(text: str) -> dict[str, Any]:  # as Flower flattens the app's section
        return flatten_dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])

    base = flat(pyproject_section())
    slms, n = cfg.models.slms, cfg.data.n_clients
    if len(slms) < max(n, _slm_count(base)) and n <= _slm_count(base):
        # specs shared in turn: spelled out for every slot the app lists, so a client added later by raising
        # data.num_clients in the file shares them as `fedlada run` does (not the app's default spec of its slot)
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            cfg.models, slms=tuple(slms[k % len(slms)] for k in range(_slm_count(base)))))
    if len(cfg.models.slms) < min(n, _slm_count(base)):
        raise ConfigError(f"this config's {len(slms)} SLM spec(s) are shared by {n} clients in turn; a flwr run "
                          f"config gives each client its own spec, and the app lists {_slm_count(base)}: give one "
                          f"spec per client")
    mine = flat(pyproject_section(dataclasses.replace(cfg, engine="flower")))
    unknown = sorted(set(mine) - set(base))
    if unknown:
        raise ConfigError(f"flwr run accepts only the keys of pyproject.toml's [tool.flwr.app.config]; this config "
                          f"needs {', '.join(unknown[:5])} (the app lists models.slms.0..{_slm_count(base) - 1})")
    lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else toml_string(v, k) if isinstance(v, str) else json.dumps(v)}"
             for k, v in mine.items() if base.get(k) != v]
    return "".join(line + "\n" for line in lines)


def _slm_count(flat: dict[str, Any]) -> int:
    return len({k.split(".")[2] for k in flat if k.startswith("models.slms.")})


if __name__ == "__main__":
    import argparse

    from fedlada.errors import FedLadaError

    parser = argparse.ArgumentParser(description="print the app's [tool.flwr.app.config] section, or with "
                                                 "--run-config FILE a flwr run --run-config file for that config")
    parser.add_argument("--run-config", metavar="FILE", help="a fedlada config (TOML), e.g. configs/smoke.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --run-config: override a config key (repeatable), as fedlada run --set")
    args = parser.parse_args()
    if args.set and args.run_config is None:
        parser.error("--set goes with --run-config FILE")
    if args.run_config is None:
        print(pyproject_section(), end="")
    else:
        import sys

        try:
            cfg, changed = absolute_paths(load_config(args.run_config, args.set), Path.cwd())
            text = run_config_file(cfg)
        except FedLadaError as e:
            raise SystemExit(f"error: {e}") from None
        if changed:
            print(f"note: relative paths made absolute against {Path.cwd()} ({', '.join(changed)}): the ServerApp "
                  f"and ClientApps run in the SuperLink's and SuperNodes' working directories", file=sys.stderr)
        print(text, end="")
