"""One resolution of a run's settings, for ``elm train`` and every sweep point alike.

A run's settings are layers, each later one winning: the task's default run for the
model family the run asks for (``registry.default_run``), then what the user wrote, in
order (a run file or a sweep file's ``[base]``; a ``--model-config`` file; flags or a
sweep point's overrides). ``model`` and ``task_options`` merge field by field, so
``--set num_memory=8`` keeps the other model fields of the layers below.

The family is that of the ``model.version`` the user's layers name (none: the single
neuron): a run that asks for ``version = "elm_network"`` starts from the task's network
run, never from the single neuron's memory sizes and time constants.

Every setting keeps the name of the layer that gave it, so a run can say where each
non-default setting came from (:func:`describe_sources`).
"""

import dataclasses

from elmcore.errors import ELMError

# The tables that merge field by field across layers.
SECTIONS = ("model", "task_options")


@dataclasses.dataclass
class ResolvedSettings:
    settings: object   # TrainSettings
    sources: dict      # {"lr" | "model.num_memory" | "task_options.length": layer name}
    family: str        # the model family whose default run the settings start from
    layers: list       # the layers' names, the task's default run first


def _check_layer(name, layer):
    if not isinstance(layer, dict):
        raise ELMError(f"run settings ({name}) must be a JSON object / TOML table, got {type(layer).__name__}")
    for key in SECTIONS:
        if key in layer and not isinstance(layer[key], dict):
            raise ELMError(f"training setting '{key}' must be a table of KEY = VALUE, got "
                           f"{type(layer[key]).__name__} {str(layer[key])[:60]} ({name})")


def merge_layers(layers):
    """(settings, sources) of ``layers`` [(name, dict)], later layers winning, sections field by field."""
    merged, sources = {}, {}
    for name, layer in layers:
        _check_layer(name, layer)
        for key, value in layer.items():
            if key in SECTIONS:
                merged[key] = {**merged.get(key, {}), **value}
                sources.update({f"{key}.{field}": name for field in value})
            else:
                merged[key] = value
                sources[key] = name
    return merged, sources


def requested_family(layers):
    """The model family the user's ``layers`` ask for, by the last ``model.version`` they name."""
    from elmcore.data.registry import DEFAULT_FAMILY, model_family
    merged, _ = merge_layers(layers)
    version = merged.get("model", {}).get("version")
    return model_family(version) if version is not None else DEFAULT_FAMILY


def default_layer_name(task, family):
    return f"task {task}'s default {family} run"


def resolve_layers(layers, source=None) -> ResolvedSettings:
    """The run settings of the user's ``layers`` [(name, dict)] on top of the task's default run.

    ``source`` names the settings in error messages (default: the layers' names).
    """
    from elmcore.data.registry import DEFAULT_TASK, default_run, task_spec
    from elmcore.training.train import TrainSettings
    layers = list(layers)
    user, _ = merge_layers(layers)
    family = requested_family(layers)
    task = user.get("task", DEFAULT_TASK)
    base = default_run(task, user.get("data_dir"), family)
    task_name = task_spec(task).name
    merged, sources = merge_layers([(default_layer_name(task_name, family), base)] + layers)
    where = source or ", ".join(name for name, _ in layers) or None
    names = [default_layer_name(task_name, family)] + [name for name, _ in layers]
    return ResolvedSettings(TrainSettings.from_dict(merged, source=where), sources, family, names)


def non_default(settings):
    """{setting: value} of ``settings`` (a TrainSettings) that differ from TrainSettings' defaults;
    every model field and task option counts (they replace the model's / the task's own defaults)."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name in SECTIONS:
            out.update({f"{field.name}.{k}": v for k, v in value.items()})
        elif field.default is not dataclasses.MISSING and value != field.default:
            out[field.name] = value
    return out


def describe_sources(resolved: ResolvedSettings):
    """One line: every non-default setting, grouped by the layer it came from (in layer order)."""
    groups = {}
    for key, value in non_default(resolved.settings).items():
        groups.setdefault(resolved.sources.get(key, "?"), []).append(f"{key}={value}")
    if not groups:
        return "settings: the training defaults (no setting differs from them)"
    order = {name: i for i, name in enumerate(resolved.layers)}
    return "settings: " + "; ".join(f"{', '.join(groups[name])} (from {name})"
                                    for name in sorted(groups, key=lambda n: order.get(n, len(order))))
